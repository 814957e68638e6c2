"""NF4 weights: bit-identical to bitsandbytes' CPU quantizer, readable both ways.

bitsandbytes is the reference: every comparison is exact (torch.equal), never
a tolerance. Tests that need it import it lazily (importorskip), so the
validation and size tests still run without it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ember.kernels.nf4 as nf4
from ember.kernels.backend import forced_backend, interpreting
from ember.kernels.dynamic_map import dynamic_map
from ember.kernels.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Realistic and awkward: blocks spanning rows (96, 77 columns), a short last
# block (300*77 and 3*5 are not multiples of 64), an odd numel (a padded
# nibble), a single block, a single element.
SHAPES = [(64, 64), (17, 96), (300, 77), (1, 64), (3, 5), (1, 1)]


@pytest.fixture
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    # bnb's fallback dequantizer (odd in_features) is torch.compile'd per
    # shape, seconds each; eager runs the same fp32 multiply and cast.
    with torch.compiler.set_stance("force_eager"):
        yield F


def _weight(shape, dtype, seed=0):
    # Rows of very different scale, so a block read with the wrong absmax shows.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[0]).view(-1, 1)
    return w.to(dtype)


def _assert_same_as_bnb(ours: NF4Weight, packed: torch.Tensor, state) -> None:
    assert ours.shape == tuple(state.shape)
    assert ours.dtype == state.dtype
    assert ours.blocksize == state.blocksize
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.double_quantized == state.nested
    if state.nested:
        assert ours.nested_blocksize == state.state2.blocksize
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert torch.equal(ours.offset, state.offset)


def _bnb_dequantize(F, packed: torch.Tensor, state) -> torch.Tensor:
    """bnb's dequantize_4bit, read through a flat (numel,) shape.

    bnb 0.50's AVX512 CPU kernel indexes absmax per row, as row * (in //
    blocksize) + col // blocksize: wrong when in_features is a multiple of 16
    but not of blocksize, e.g. (17, 96), where rows get other rows' scales. With
    a 1-D shape there is one row and that indexing is the flat one.
    """
    shape = tuple(state.shape)
    flat_state = F.QuantState(
        absmax=state.absmax,
        shape=torch.Size([shape[0] * shape[1]]),
        code=state.code,
        blocksize=state.blocksize,
        quant_type="nf4",
        dtype=state.dtype,
        offset=state.offset,
        state2=state.state2,
    )
    return F.dequantize_4bit(packed.view(-1, 1), flat_state).view(shape)


def _bnb_2d_kernel_is_right(shape, blocksize) -> bool:
    return shape[1] % blocksize == 0 or shape[1] % 16 != 0


# ----------------------------------------------------------------------------
# Same codes and statistics as bitsandbytes
# ----------------------------------------------------------------------------


def test_table_matches_bnb(bnb_functional):
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bnb(bnb_functional, shape, dtype, double_quant):
    F = bnb_functional
    w = _weight(shape, dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    _assert_same_as_bnb(ours, packed, state)
    if double_quant:
        expected = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(ours.block_absmax(), expected)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_quantize_matches_bnb_blocksizes(bnb_functional, blocksize):
    F = bnb_functional
    w = _weight((300, 77), torch.float16)
    for double_quant in (False, True):
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        _assert_same_as_bnb(quantize_nf4(w, blocksize=blocksize, double_quant=double_quant), packed, state)


def test_quantize_in_chunks_matches_bnb(bnb_functional, monkeypatch):
    # Chunks of 8 blocks: many chunk boundaries plus the short last block.
    monkeypatch.setattr(nf4, "_CHUNK_ELEMENTS", 512)
    F = bnb_functional
    for shape, dtype in [((300, 77), torch.bfloat16), ((17, 96), torch.float32)]:
        w = _weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quantize_nf4(w)
        _assert_same_as_bnb(ours, packed, state)
        assert torch.equal(ours.dequantize(), _bnb_dequantize(F, packed, state))


def test_ties_zero_blocks_and_short_block(bnb_functional):
    """Exact midpoints (ties go to the lower code), all-zero blocks, a zero short block."""
    F = bnb_functional
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.zeros(5, 64)
    w[0, 0], w[0, 1:16] = 1.0, midpoints  # absmax 1: the scaled values are the midpoints
    w[1, 0], w[1, 1:16] = -1.0, -midpoints
    w[3] = _weight((1, 64), torch.float32)[0]  # rows 2 and 4 stay zero
    for shape in [(5, 64), (4, 79)]:  # (4, 79): the short last block is all zero
        x = w.view(-1)[: shape[0] * shape[1]].reshape(shape)
        for double_quant in (False, True):
            packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
            ours = quantize_nf4(x, double_quant=double_quant)
            _assert_same_as_bnb(ours, packed, state)
            assert torch.equal(ours.dequantize(), _bnb_dequantize(F, packed, state))
    # bnb stores the clamped absmax (1e-38) for a zero short block, 0 for a full one.
    ours = quantize_nf4(torch.zeros(1, 79), double_quant=False)
    assert torch.equal(ours.absmax, torch.tensor([0.0, 1e-38]))


def test_nested_rounding_is_bnb_grid(bnb_functional):
    """The 8-bit absmax codes follow bnb's 65536-point grid, not the nearest code.

    Inputs: every grid point, every value where the grid index steps, every
    midpoint between codes, each nudged by up to 2 ulps both ways; blocks of
    255 of them plus a 1.0, so that scaling is exact.
    """
    F = bnb_functional
    code = dynamic_map(signed=True)
    steps = torch.arange(65536, dtype=torch.float64)
    values = torch.cat(
        [
            ((2.0 * steps) / 65535 - 1.0).float(),
            ((steps[1:] - 0.5) / 65535 * 2 - 1).float(),
            (code[:-1] + code[1:]) * 0.5,
        ]
    )
    nudged = [values]
    for direction in (2.0, -2.0):
        v = values
        for _ in range(2):
            v = torch.nextafter(v, torch.tensor(direction))
            nudged.append(v)
    x = torch.cat(nudged).clamp(-1, 1)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    n_blocks = -(-x.numel() // 255)
    x = torch.nn.functional.pad(x, (0, n_blocks * 255 - x.numel())).view(n_blocks, 255)
    x = torch.cat([x, torch.ones(n_blocks, 1)], dim=1).view(-1)

    expected_codes, state = F.quantize_blockwise(x, blocksize=256)
    codes, absmax = nf4._quantize_blockwise_dynamic(x, code)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(codes, expected_codes)
    # The grid matters: plain nearest-code rounding disagrees on some of these.
    nearest = torch.bucketize(x, (code[:-1] + code[1:]) * 0.5).to(torch.uint8)
    assert not torch.equal(nearest, expected_codes)


# ----------------------------------------------------------------------------
# Dequantization, both directions
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_bnb(bnb_functional, shape, dtype, double_quant):
    F = bnb_functional
    w = _weight(shape, dtype, seed=1)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize_nf4(w, double_quant=double_quant)
    out = ours.dequantize()
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, dequantize_nf4(ours))
    assert torch.equal(out, _bnb_dequantize(F, packed, state))
    # bnb reads our state as its own.
    assert torch.equal(out, _bnb_dequantize(F, ours.packed, ours.to_bnb_quant_state()))
    if _bnb_2d_kernel_is_right(shape, 64):
        assert torch.equal(out, F.dequantize_4bit(packed, state))
        assert torch.equal(out, F.dequantize_4bit(ours.packed.view(-1, 1), ours.to_bnb_quant_state()))


def test_dequantize_in_chunks(monkeypatch):
    w = _weight((300, 77), torch.bfloat16)
    ours = quantize_nf4(w)
    whole = ours.dequantize()
    monkeypatch.setattr(nf4, "_CHUNK_ELEMENTS", 128)
    assert torch.equal(ours.dequantize(), whole)
    # And it approximates w: within half the widest NF4 gap (0.152) of each
    # block's absmax, plus bf16 rounding.
    plain = quantize_nf4(w, double_quant=False)
    err = (plain.dequantize().float() - w.float()).abs().view(-1)
    bound = plain.absmax.repeat_interleave(64)[: w.numel()] * 0.16
    assert bool((err <= bound).all())


# ----------------------------------------------------------------------------
# bitsandbytes' own parameters, without copies
# ----------------------------------------------------------------------------


def _assert_shares_storage(ours: NF4Weight, param) -> None:
    state = param.quant_state
    assert ours.packed.data_ptr() == param.data_ptr()
    assert ours.absmax.data_ptr() == state.absmax.data_ptr()
    if state.nested:
        assert ours.nested_absmax.data_ptr() == state.state2.absmax.data_ptr()
        assert ours.nested_code.data_ptr() == state.state2.code.data_ptr()
        assert ours.offset.data_ptr() == state.offset.data_ptr()


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_params4bit(bnb_functional, dtype, double_quant, quant_storage):
    import bitsandbytes as bnb

    F = bnb_functional
    w = _weight((48, 100), dtype)
    param = bnb.nn.Params4bit(
        w.clone(),
        requires_grad=False,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=double_quant,
        quant_storage=quant_storage,
    ).to("cpu")  # a Params4bit quantizes when it first moves to a device
    ours = NF4Weight.from_bnb(param)
    _assert_shares_storage(ours, param)
    _assert_same_as_bnb(ours, param.data.view(torch.uint8), param.quant_state)
    _assert_same_as_bnb(quantize_nf4(w, double_quant=double_quant), param.data.view(torch.uint8), param.quant_state)
    assert torch.equal(ours.dequantize(), F.dequantize_4bit(param.data, param.quant_state))


def test_from_linear4bit_round_trip(bnb_functional):
    import bitsandbytes as bnb

    F = bnb_functional
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True).to("cpu")
    ours = NF4Weight.from_bnb(layer.weight)
    _assert_shares_storage(ours, layer.weight)
    assert ours.shape == (64, 128) and ours.dtype == torch.float32 and ours.double_quantized
    # Through bnb's QuantState and back: still the same tensors.
    state = ours.to_bnb_quant_state()
    wrapped = bnb.nn.Params4bit(layer.weight.data, quant_state=state, bnb_quantized=True, requires_grad=False)
    again = NF4Weight.from_bnb(wrapped)
    assert again.packed.data_ptr() == ours.packed.data_ptr() and again.absmax.data_ptr() == ours.absmax.data_ptr()
    assert torch.equal(again.dequantize(), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))

    # Shared storage: a write through one is seen by the other.
    ours.packed[0] = 0x7F
    assert layer.weight.data.view(-1)[0].item() == 0x7F


def test_from_bnb_rejects(bnb_functional):
    import bitsandbytes as bnb

    w = _weight((64, 64), torch.float32)
    with pytest.raises(TypeError, match="param"):
        NF4Weight.from_bnb(bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4"))  # not quantized yet
    with pytest.raises(TypeError, match="param"):
        NF4Weight.from_bnb(w)
    fp4 = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="quant_type"):
        NF4Weight.from_bnb(fp4)
    # Linear4bit.forward on an AVX512-BF16 CPU repacks its weight into another layout.
    repacked = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    repacked.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        NF4Weight.from_bnb(repacked)


# ----------------------------------------------------------------------------
# Size, containers, validation (no bitsandbytes needed)
# ----------------------------------------------------------------------------


def _empty_weight(shape, double_quant):
    # nbytes depends only on the tensor sizes: no need to quantize 16M values.
    numel = shape[0] * shape[1]
    n_blocks = numel // 64
    if not double_quant:
        return NF4Weight(torch.empty(numel // 2, dtype=torch.uint8), torch.empty(n_blocks), shape, torch.bfloat16)
    return NF4Weight(
        torch.empty(numel // 2, dtype=torch.uint8),
        torch.empty(n_blocks, dtype=torch.uint8),
        shape,
        torch.bfloat16,
        nested_absmax=torch.empty(-(-n_blocks // 256)),
        nested_code=torch.empty(256),
        offset=torch.tensor(0.0),
    )


def test_nbytes_per_parameter():
    numel = 4096 * 4096
    assert _empty_weight((4096, 4096), False).nbytes / numel == 0.5 + 4 / 64
    per_param = _empty_weight((4096, 4096), True).nbytes / numel
    assert per_param == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)  # + the 1 KiB table
    assert 0.515 < per_param < 0.52
    # A real one counts the same tensors.
    real = quantize_nf4(_weight((64, 512), torch.float16))
    assert real.nbytes == 64 * 512 // 2 + 512 + 4 * 2 + 4 * 256 + 4


def test_container():
    w = _weight((17, 96), torch.bfloat16)
    ours = quantize_nf4(w)
    assert ours.device == torch.device("cpu")
    moved = ours.to("cpu")
    assert torch.equal(moved.dequantize(), ours.dequantize())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.blocksize = 128
    # A non-contiguous weight quantizes in its logical row-major order.
    wt = w.t()
    assert torch.equal(quantize_nf4(wt).packed, quantize_nf4(wt.contiguous()).packed)
    # Without double quantization the absmax is the fp32 block scale itself.
    plain = quantize_nf4(w, double_quant=False)
    assert plain.block_absmax() is plain.absmax and not plain.double_quantized


def _bytes(n):
    return torch.zeros(n, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda: quantize_nf4(torch.randn(64)), ValueError, "weight"),
        (lambda: quantize_nf4(torch.randn(2, 4, 64)), ValueError, "weight"),
        (lambda: quantize_nf4(torch.zeros(0, 64)), ValueError, "weight"),
        (lambda: quantize_nf4(torch.ones(4, 64, dtype=torch.int32)), TypeError, "weight"),
        (lambda: quantize_nf4(torch.randn(4, 64, dtype=torch.float64)), TypeError, "weight"),
        (lambda: quantize_nf4([[1.0, 2.0]]), TypeError, "weight"),
        (lambda: quantize_nf4(torch.randn(4, 64), blocksize=16), ValueError, "blocksize"),
        (lambda: quantize_nf4(torch.randn(4, 64), blocksize=48), ValueError, "blocksize"),
        (lambda: quantize_nf4(torch.randn(4, 64), blocksize=8192), ValueError, "blocksize"),
        (lambda: quantize_nf4(torch.randn(4, 64), blocksize=64.0), TypeError, "blocksize"),
        (lambda: quantize_nf4(torch.randn(4, 64), double_quant=1), TypeError, "double_quant"),
        (lambda: dequantize_nf4(torch.zeros(32, dtype=torch.uint8)), TypeError, "weight"),
        (lambda: dequantize_nf4(quantize_nf4(torch.randn(4, 64)), dtype=torch.int8), TypeError, "dtype"),
        (lambda: NF4Weight(_bytes(31), torch.zeros(1), (1, 64), torch.float16), ValueError, "packed"),
        (lambda: NF4Weight(_bytes(32).to(torch.int8), torch.zeros(1), (1, 64), torch.float16), TypeError, "packed"),
        (lambda: NF4Weight(_bytes(32), torch.zeros(2), (1, 64), torch.float16), ValueError, "absmax"),
        (lambda: NF4Weight(_bytes(32), torch.zeros(1), (1, 64), torch.int8), TypeError, "dtype"),
        (lambda: NF4Weight(_bytes(32), torch.zeros(1), (64,), torch.float16), ValueError, "shape"),
        (
            lambda: NF4Weight(_bytes(32), _bytes(1), (1, 64), torch.float16, nested_absmax=torch.zeros(1)),
            ValueError,
            "nested_code",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("shape, blocksize", [((7, 77), 32), ((300, 77), 64), ((5, 96), 128), ((3, 1500), 4096)],
                         ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain_absmax"])
def test_triton_dequantize_equals_the_pytorch_path_bit_for_bit(shape, blocksize, double_quant):
    # The Triton kernel (one pass over the bytes, the table gathered from
    # registers) against the chunked PyTorch path, in every output dtype: an odd
    # numel (7 x 77, a padded nibble), blocks spanning rows, a short last block,
    # a block larger than a program's 2048 elements; bytes and scales read
    # through strides (every other element of a buffer twice their size).
    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("the Triton kernel needs TRITON_INTERPRET=1 or a CUDA device")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantized = quantize_nf4(_weight(shape, torch.float32).to(device), blocksize=blocksize, double_quant=double_quant)
    every_other = lambda t: torch.stack([t, t.flip(0)], dim=1)[:, 0]  # noqa: E731  (stride 2)
    strided = dataclasses.replace(quantized, packed=every_other(quantized.packed),
                                  absmax=every_other(quantized.absmax))
    for dtype in DTYPES:
        with forced_backend("torch"):
            expected = dequantize_nf4(quantized.to("cpu"), dtype=dtype)
        for weight in (quantized, strided):
            out = dequantize_nf4(weight, dtype=dtype)
            assert out.dtype == dtype and out.shape == shape
            assert torch.equal(out.cpu(), expected), (dtype, weight.packed.stride())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tier: no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    w = _weight((300, 77), dtype)
    cpu = quantize_nf4(w, double_quant=False)
    gpu = quantize_nf4(w.cuda(), double_quant=False)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.packed.cpu(), cpu.packed) and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
    # The offset is a mean: CUDA may sum in another order, so only closeness here.
    nested = quantize_nf4(w.cuda())
    torch.testing.assert_close(nested.block_absmax().cpu(), quantize_nf4(w).block_absmax(), rtol=1e-2, atol=0)
