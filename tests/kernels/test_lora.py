"""Fused LoRA linear: forward and backward against float64, dense and NF4 bases, dropout, bad input."""

from __future__ import annotations

import pytest
import torch

from ember.bench.memory import TensorSizeTracker
import ember.kernels.lora as lora_module
from ember.kernels.lora import lora_linear, lora_linear_ref
from ember.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch shape, in_features, out_features, r): awkward sizes on purpose (odd, not multiples of the tiles).
SHAPES = [
    ((1,), 16, 16, 1),
    ((17,), 77, 50, 8),
    ((2, 9), 96, 80, 16),
    ((3, 11), 64, 33, 67),
    ((4,), 32, 24, 256),  # the largest rank: eight chunks of the epilogue's rank loop
]


def _inputs(batch, in_features, out_features, rank, dtype, lora_dtype, device, bias=True):
    # Fresh random inputs; lora_b is non-zero (PEFT starts it at 0) so the low-rank term matters.
    x = torch.randn(*batch, in_features, dtype=dtype, device=device)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device) / in_features ** 0.5
    lora_a = torch.randn(rank, in_features, dtype=lora_dtype, device=device) / in_features ** 0.5
    lora_b = torch.randn(out_features, rank, dtype=lora_dtype, device=device) / rank ** 0.5
    b = torch.randn(out_features, dtype=dtype, device=device) if bias else None
    return x, weight, lora_a, lora_b, b


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _grads(y, upstream, *tensors):
    y.backward(upstream)
    return [t.grad for t in tensors]


def _check_against_float64(assert_within_tolerance, ours, x, weight, lora_a, lora_b, bias, scaling, upstream,
                           dropout_mask=None, dropout_p=0.0):
    """ours: (y, grads of x, lora_a, lora_b, bias). Stock = the reference in the compute dtype."""
    dtype = x.dtype
    results = {}
    for label, cast in (("ref64", torch.float64), ("stock", dtype)):
        leaves = _leaves(x, lora_a, lora_b, bias, dtype=cast)
        y = lora_linear_ref(leaves[0], weight.to(cast), leaves[1], leaves[2], scaling=scaling, bias=leaves[3],
                            dropout_mask=dropout_mask, dropout_p=dropout_p)
        results[label] = [y] + _grads(y, upstream.to(cast), *[t for t in leaves if t is not None])
    names = ["y", "dx", "d_lora_a", "d_lora_b", "d_bias"]
    for name, actual, ref, stock in zip(names, ours, results["ref64"], results["stock"]):
        assert_within_tolerance(name, actual, ref, stock, dtype)


def _run_ours(x, weight, lora_a, lora_b, bias, scaling, upstream, dropout_p=0.0):
    leaves = _leaves(x, lora_a, lora_b, bias)
    y = lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling=scaling, bias=leaves[3], dropout_p=dropout_p)
    return [y] + _grads(y, upstream, *[t for t in leaves if t is not None])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_base_matches_float64(device, dtype, shape, assert_within_tolerance):
    batch, in_features, out_features, rank = shape
    # Adapters in fp32 over a 16-bit base, as PEFT keeps them under autocast; same dtype otherwise.
    lora_dtype = torch.float32 if rank % 2 else dtype
    x, weight, lora_a, lora_b, bias = _inputs(batch, in_features, out_features, rank, dtype, lora_dtype, device)
    upstream = torch.randn(*batch, out_features, dtype=dtype, device=device)
    ours = _run_ours(x, weight, lora_a, lora_b, bias, 1.7, upstream)
    assert ours[0].dtype == dtype and ours[2].dtype == lora_dtype
    _check_against_float64(assert_within_tolerance, ours, x, weight, lora_a.to(dtype), lora_b.to(dtype), bias, 1.7,
                           upstream)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((5,), 128, 48, 4), ((2, 7), 192, 72, 16)], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain_absmax"])
def test_nf4_base_matches_float64(device, dtype, shape, double_quant, assert_within_tolerance):
    batch, in_features, out_features, rank = shape
    x, weight, lora_a, lora_b, _ = _inputs(batch, in_features, out_features, rank, dtype, torch.float32, device,
                                           bias=False)
    nf4 = quantize_nf4(weight, double_quant=double_quant)
    dequantized = nf4.dequantize()  # the reference's base: what the kernels must reproduce tile by tile
    assert (dequantized != weight).any()
    upstream = torch.randn(*batch, out_features, dtype=dtype, device=device)
    ours = _run_ours(x, nf4, lora_a, lora_b, None, 0.5, upstream)
    _check_against_float64(assert_within_tolerance, ours, x, dequantized.to(dtype), lora_a.to(dtype),
                           lora_b.to(dtype), None, 0.5, upstream)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_quantized_by_bitsandbytes_is_used_as_it_is(device, dtype, assert_within_tolerance):
    # A Params4bit, as bitsandbytes' Linear4bit holds it, read through NF4Weight.from_bnb (no copy).
    # in_features 80 is not a multiple of the 64-element blocks: blocks span rows.
    bnb = pytest.importorskip("bitsandbytes")
    x, weight, lora_a, lora_b, _ = _inputs((9,), 80, 40, 8, dtype, torch.float32, "cpu", bias=False)
    param = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    param = param.to("cpu")  # a Params4bit quantizes when it first moves to a device
    nf4 = NF4Weight.from_bnb(param).to(device)
    x, lora_a, lora_b = x.to(device), lora_a.to(device), lora_b.to(device)
    upstream = torch.randn(9, 40, dtype=dtype, device=device)
    ours = _run_ours(x, nf4, lora_a, lora_b, None, 2.0, upstream)
    _check_against_float64(assert_within_tolerance, ours, x, nf4.dequantize().to(dtype), lora_a.to(dtype),
                           lora_b.to(dtype), None, 2.0, upstream)


def _dropout_mask(device, dtype, rows, in_features, dropout_p, seed):
    """The mask lora_linear draws for (rows, in_features) under torch.manual_seed(seed).

    Read off the output: with W = 0 and A = B = I, y = scaling * dropout(x), so
    x = 1 gives mask / (1 - p).
    """
    eye = torch.eye(in_features, dtype=dtype, device=device)
    torch.manual_seed(seed)
    y = lora_linear(torch.ones(rows, in_features, dtype=dtype, device=device), torch.zeros_like(eye), eye, eye,
                    scaling=1.0, dropout_p=dropout_p)
    kept = y != 0
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / (1 - dropout_p)), rtol=1e-2)
    return kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_dropout_with_its_regenerated_mask_matches_float64(device, dtype, nf4, assert_within_tolerance):
    rows, in_features, out_features, rank, p = 19, 64, 40, 8, 0.3
    x, weight, lora_a, lora_b, bias = _inputs((rows,), in_features, out_features, rank, dtype, dtype, device)
    base = quantize_nf4(weight) if nf4 else weight
    upstream = torch.randn(rows, out_features, dtype=dtype, device=device)
    torch.manual_seed(7)
    ours = _run_ours(x, base, lora_a, lora_b, bias, 2.0, upstream, dropout_p=p)
    mask = _dropout_mask(device, dtype, rows, in_features, p, seed=7)
    assert 0.5 < mask.float().mean() < 0.9
    dense = base.dequantize().to(dtype) if nf4 else weight
    # One mask explains the forward and every gradient: forward and backward draw the same bits.
    _check_against_float64(assert_within_tolerance, ours, x, dense, lora_a, lora_b, bias, 2.0, upstream,
                           dropout_mask=mask, dropout_p=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["in_registers", "dequantized_once"])
def test_nf4_both_paths_match_float64(device, dtype, path, monkeypatch, assert_within_tolerance):
    # Each NF4 path forced whatever the row count, forward and backward, with
    # dropout and a bias: 33 rows, in_features 80 (64-element blocks span rows),
    # odd out_features and rank.
    monkeypatch.setattr(lora_module, "NF4_DEQUANTIZE_ONCE_ROWS", 1 if path == "dequantized_once" else 1 << 40)
    batch, in_features, out_features, rank, p = (3, 11), 80, 50, 7, 0.2
    x, weight, lora_a, lora_b, bias = _inputs(batch, in_features, out_features, rank, dtype, torch.float32, device)
    base = quantize_nf4(weight)
    upstream = torch.randn(*batch, out_features, dtype=dtype, device=device)
    torch.manual_seed(5)
    ours = _run_ours(x, base, lora_a, lora_b, bias, 1.5, upstream, dropout_p=p)
    mask = _dropout_mask(device, dtype, 33, in_features, p, seed=5).view(*batch, in_features)
    _check_against_float64(assert_within_tolerance, ours, x, base.dequantize().to(dtype), lora_a.to(dtype),
                           lora_b.to(dtype), bias, 1.5, upstream, dropout_mask=mask, dropout_p=p)


@pytest.mark.parametrize("rows", [4, lora_module.NF4_DEQUANTIZE_ONCE_ROWS + 44], ids=lambda rows: f"rows{rows}")
def test_nf4_base_is_dequantized_once_per_matmul_from_the_threshold(device, rows, monkeypatch,
                                                                    assert_within_tolerance):
    # Below the threshold no full dequantization happens (tiles in registers);
    # from it, one in the forward and one in the dx matmul, in x's dtype. 300
    # rows also split the rank-gradient sums over two programs' partials.
    calls = []

    def counting(weight, *, dtype=None):
        calls.append(dtype)
        return dequantize_nf4(weight, dtype=dtype)

    monkeypatch.setattr(lora_module, "dequantize_nf4", counting)
    dtype = torch.float16
    x, weight, lora_a, lora_b, _ = _inputs((rows,), 64, 48, 8, dtype, torch.float32, device, bias=False)
    base = quantize_nf4(weight, double_quant=False)
    upstream = torch.randn(rows, 48, dtype=dtype, device=device)
    ours = _run_ours(x, base, lora_a, lora_b, None, 0.5, upstream)
    assert calls == ([] if rows < lora_module.NF4_DEQUANTIZE_ONCE_ROWS else [dtype, dtype])
    _check_against_float64(assert_within_tolerance, ours, x, dequantize_nf4(base).to(dtype), lora_a.to(dtype),
                           lora_b.to(dtype), None, 0.5, upstream)


def test_dropout_statistics(device):
    rows, in_features, p = 128, 128, 0.25
    masks = [_dropout_mask(device, torch.float32, rows, in_features, p, seed) for seed in (1, 2, 1)]
    assert torch.equal(masks[0], masks[2]), "the same torch seed must draw the same mask"
    assert not torch.equal(masks[0], masks[1]), "different seeds must draw different masks"
    keep_rate = masks[1].float().mean().item()
    assert abs(keep_rate - (1 - p)) < 0.02, keep_rate
    # Rows and columns draw different bits.
    assert not torch.equal(masks[1][0], masks[1][1]) and not torch.equal(masks[1][:, 0], masks[1][:, 1])


def test_gradients_are_bitwise_repeatable(device):
    x, weight, lora_a, lora_b, bias = _inputs((37,), 96, 64, 16, torch.float16, torch.float32, device)
    upstream = torch.randn(37, 64, dtype=torch.float16, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(_run_ours(x, weight, lora_a, lora_b, bias, 1.0, upstream, dropout_p=0.1))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_empty_batch_gives_empty_output_and_zero_gradients(device):
    x, weight, lora_a, lora_b, bias = _inputs((0,), 32, 16, 4, torch.float32, torch.float32, device)
    y, dx, d_a, d_b, d_bias = _run_ours(x, weight, lora_a, lora_b, bias, 1.0, torch.zeros(0, 16, device=device))
    assert y.shape == (0, 16) and dx.shape == (0, 32)
    assert not d_a.any() and not d_b.any() and not d_bias.any()


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_every_tensor_is_read_through_its_strides(device, nf4, assert_within_tolerance):
    # Issue 15: the kernels read the bias, and an NF4 base's bytes and block
    # scales, as contiguous. Here each of them is a strided or expanded view, as
    # are x, the adapters and the upstream gradient.
    dtype = torch.float16
    x, weight, lora_a, lora_b, bias = _inputs((2, 9), 64, 40, 8, dtype, torch.float32, device)
    x = x[:, :, None].expand(2, 9, 3, 64)[:, :, 1]  # strides (9 * 192, 192, 1)
    lora_a = lora_a.t().contiguous().t()  # column-major
    lora_b = lora_b[:1].expand(40, 8)  # stride 0: every output feature has the same row
    bias = torch.stack([bias, bias], dim=1)[:, 1]  # stride 2
    upstream = torch.randn(2, 9, 1, dtype=dtype, device=device).expand(2, 9, 40)
    if nf4:
        quantized = quantize_nf4(weight, double_quant=False)
        packed, absmax = quantized.packed, quantized.absmax
        every_other = lambda t: torch.stack([t, t.flip(0)], dim=1)[:, 0]  # noqa: E731  (stride 2)
        base = NF4Weight(packed=every_other(packed), absmax=every_other(absmax), shape=quantized.shape, dtype=dtype,
                         blocksize=quantized.blocksize)
        assert base.packed.stride() == (2,) and base.absmax.stride() == (2,)
        dense = quantized.dequantize()  # the same codes and scales, contiguous
    else:
        base = dense = weight.t().contiguous().t()
    ours = _run_ours(x, base, lora_a, lora_b, bias, 1.5, upstream)
    _check_against_float64(assert_within_tolerance, ours, x, dense, lora_a.to(dtype), lora_b.to(dtype), bias, 1.5,
                           upstream)


def test_backward_keeps_no_copy_of_the_dropped_input():
    # What autograd saves: x (which the caller's graph holds anyway), xa (M, r) in fp32, A and B.
    # PEFT's unfused path also saves dropout(x), a second (M, in) tensor.
    rows, in_features, out_features, rank = 64, 256, 128, 8
    x, weight, lora_a, lora_b, _ = _inputs((rows,), in_features, out_features, rank, torch.float32, torch.float32,
                                           "cpu", bias=False)
    x.requires_grad_()
    lora_a.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lora_linear(x, weight, lora_a, lora_b, scaling=1.0, dropout_p=0.1)
    activation_shaped = [t for t in saved if t.shape[0] == rows]
    assert sorted(tuple(t.shape) for t in activation_shaped) == [(rows, rank), (rows, in_features)]


def test_nf4_base_never_exists_dequantized_in_full():
    # The PyTorch path dequantizes (out) row chunks of 16 MiB: a 2048 x 4096 base
    # (32 MiB in fp32) never exists whole, in the forward or the backward.
    out_features, in_features = 2048, 4096
    weight = torch.randn(out_features, in_features) / 64
    nf4 = quantize_nf4(weight)
    x = torch.randn(4, in_features, requires_grad=True)
    lora_a = (torch.randn(16, in_features) / 64).requires_grad_()
    lora_b = torch.randn(out_features, 16, requires_grad=True)
    from ember.kernels.backend import forced_backend

    with forced_backend("torch"), TensorSizeTracker() as tracker:
        lora_linear(x, nf4, lora_a, lora_b, scaling=1.0).sum().backward()
    full = out_features * in_features * 4
    assert tracker.largest_bytes <= full // 2, (tracker.largest_bytes, tracker.largest_shape, tracker.largest_op)


BAD_INPUTS = [
    (dict(lora_a=torch.randn(0, 32)), ValueError, "rank r"),
    (dict(lora_a=torch.randn(300, 32), lora_b=torch.randn(16, 300)), ValueError, "rank r"),
    (dict(lora_a=torch.randn(4, 31)), ValueError, "lora_a must be"),
    (dict(lora_b=torch.randn(15, 4)), ValueError, "lora_b must be"),
    (dict(x=torch.randn(3, 33)), ValueError, "in_features"),
    (dict(weight=torch.randn(16, 32, 2)), ValueError, "weight must be"),
    (dict(weight=torch.randn(16, 32, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    (dict(weight=torch.randn(16, 32, requires_grad=True)), ValueError, "frozen"),
    (dict(weight="W"), TypeError, "NF4Weight"),
    (dict(x=torch.randint(0, 3, (3, 32))), TypeError, "x must be float16"),
    (dict(bias=torch.randn(15)), ValueError, "bias must be"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p must be a finite number in \[0, 1\)"),
    (dict(scaling=float("inf")), ValueError, "scaling must be a finite number, got inf"),
    (dict(scaling="2"), TypeError, "scaling must be a finite number"),
    (dict(bias=torch.ones(16, dtype=torch.int64)), TypeError, "bias must be float16, bfloat16 or float32"),
    (dict(lora_b=torch.randn(16, 4, device="meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case[2] if isinstance(case, tuple) else None)
def test_bad_input_gets_a_clear_error(case):
    overrides, error, message = case
    arguments = dict(x=torch.randn(3, 32), weight=torch.randn(16, 32), lora_a=torch.randn(4, 32),
                     lora_b=torch.randn(16, 4), scaling=1.0, bias=None, dropout_p=0.0)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        lora_linear(arguments.pop("x"), arguments.pop("weight"), arguments.pop("lora_a"), arguments.pop("lora_b"),
                    **arguments)


class _FixedMaskDropout(torch.nn.Module):
    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1 - self.p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["no_dropout", "fixed_mask"])
def test_matches_peft_lora_layer(device, dropout_p, assert_within_tolerance):
    # PEFT's own LoRA layer over an nn.Linear, its dropout replaced by the mask
    # ember draws: same output and same gradients for x, A, B.
    peft = pytest.importorskip("peft")
    rows, in_features, out_features, rank = 21, 64, 48, 8
    base = torch.nn.Linear(in_features, out_features, device=device).requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=dropout_p)
    layer = peft.tuners.lora.Linear(base, "default", config, r=rank, lora_alpha=16, lora_dropout=dropout_p)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(rows, in_features, device=device)
    upstream = torch.randn(rows, out_features, device=device)
    torch.manual_seed(3)
    ours = _run_ours(x, base.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, base.bias,
                     layer.scaling["default"], upstream, dropout_p=dropout_p)[:4]
    if dropout_p:
        mask = _dropout_mask(device, torch.float32, rows, in_features, dropout_p, seed=3)
        layer.lora_dropout["default"] = _FixedMaskDropout(mask, dropout_p)
    x_peft = x.clone().requires_grad_()
    y_peft = layer(x_peft)
    y_peft.backward(upstream)
    theirs = [y_peft, x_peft.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    # PEFT computes in fp32 here, so it is held to the float64 rule's atol alone.
    for name, actual, expected in zip(["y", "dx", "d_lora_a", "d_lora_b"], ours, theirs):
        assert_within_tolerance(name, actual, expected.double(), expected.double(), torch.float32)


def test_autocast_saves_the_uncast_base_weight_not_a_16_bit_copy(device, assert_within_tolerance):
    # Under autocast an fp32 base runs in bf16, as F.linear's would, but the Function saves the fp32 Parameter
    # (alive anyway) and casts it again in the backward: no per-call bf16 copy of the weight is held.
    rows, in_features, out_features, rank = 19, 48, 40, 8
    x, weight, lora_a, lora_b, bias = _inputs((rows,), in_features, out_features, rank, torch.float32,
                                              torch.float32, device)
    upstream = torch.randn(rows, out_features, dtype=torch.bfloat16, device=device)
    leaves = _leaves(x, lora_a, lora_b, bias)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autocast(device.type if isinstance(device, torch.device) else torch.device(device).type,
                        dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling=1.3, bias=leaves[3])
    assert y.dtype == torch.bfloat16
    weight_shaped = [t for t in saved if tuple(t.shape) == (out_features, in_features)]
    assert [t.dtype for t in weight_shaped] == [torch.float32], [(t.dtype, tuple(t.shape)) for t in saved]
    assert weight_shaped[0].data_ptr() == weight.data_ptr()
    # The forward is the one it was: bitwise what lora_linear gives on the inputs cast as autocast casts them.
    expected = lora_linear(x.bfloat16(), weight.bfloat16(), lora_a, lora_b, scaling=1.3, bias=bias.bfloat16())
    assert torch.equal(y, expected)
    ours = [y] + _grads(y, upstream, *leaves)
    # Against float64, with stock = the reference on the bf16-cast inputs (the adapters as bf16 tiles).
    bf16 = [t.bfloat16() for t in (x, weight, lora_a, lora_b, bias)]
    _check_against_float64(assert_within_tolerance, ours, *bf16[:4], bf16[4], 1.3, upstream)
