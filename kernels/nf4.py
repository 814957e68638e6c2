"""NF4 4-bit weights in bitsandbytes' exact layout (the storage of QLoRA).

Why NF4. QLoRA keeps the frozen base weights in 4 bits. NormalFloat4 is a
16-entry table of quantiles of a standard normal, scaled to [-1, 1]: weights of
a trained network are close to normal inside a small block, so equal-mass bins
waste fewer codes than an evenly spaced int4 grid. Each block of ``blocksize``
consecutive weights keeps its absolute maximum; an element is stored as the
index of the table entry nearest to ``x / absmax``.

Why bitsandbytes' layout, bit for bit. Models arrive quantized by
bitsandbytes (``Linear4bit`` / ``Params4bit``, pre-quantized checkpoints), and
ember's kernels must read them as they are, without re-quantizing or copying,
while a weight quantized here must be readable by bitsandbytes. So this file
reproduces bitsandbytes 0.50.2's CPU quantizer exactly (same codes, same
absmax, same nested statistics), not merely the same format:

- blocks run over the row-major flat index, not per row: a block can span two
  rows when ``in_features`` is not a multiple of ``blocksize``; the last block
  may be short (any numel is allowed);
- element ``i`` sits in byte ``i // 2``, the even element in the HIGH nibble;
  an odd numel pads the last low nibble with code 7 (the 0.0 entry);
- scaling is in fp32 whatever the input dtype: full blocks as
  ``x * (1 / absmax)``, the short last block as ``x / absmax``
  (bitsandbytes does both, and they round differently);
  ``absmax`` is clamped to >= 1e-38 for the scaling, and the short block also
  *stores* the clamped value; the scaled value is clamped to [-1, 1] and
  rounded to the nearest table entry, an exact tie going to the lower entry;
- double quantization ("compress_statistics"): ``offset = absmax.mean()``,
  then ``absmax - offset`` is quantized to 8 bits in blocks of 256 over
  bitsandbytes' signed dynamic map, with the rounding of its CPU 8-bit kernel
  (a 65536-entry grid, see ``_quantize_blockwise_dynamic``); reading it back
  is ``nested_code[q] * nested_absmax[j // 256] + offset`` in fp32.

Memory per parameter: 0.5 byte of codes plus the scales. With fp32 absmax and
blocks of 64 that is 0.5 + 4/64 = 0.5625 bytes; double quantization stores
1 byte per block plus 4 bytes per 256 blocks: 0.5 + 1/64 + 4/(64*256) ~= 0.516
bytes (plus a 1 KiB code table and the offset per weight).

Where this stops: quantization is plain PyTorch on any device, chunked so
that temporaries stay under ~100 MiB whatever the weight's size.
Dequantization runs as one vectorized Triton kernel on a GPU (and under the
interpreter): each program reads a run of packed bytes, looks both nibbles up
in the 16-entry table held in registers, scales them by their block's absmax
and writes the values in order, so it costs one pass at memory bandwidth
(0.5 byte read, 2 bytes written per bf16 element). The fused LoRA matmul
(``ember.kernels.lora``) uses it to dequantize a base once per call at large
row counts; below them it dequantizes tiles in registers and never calls it.
Without a GPU or the interpreter, dequantization is chunked PyTorch. "Identical" means
identical to bitsandbytes' CPU path: its CUDA kernels quantize through other code
(hard-coded 4-bit pivots, a different 8-bit search for the nested statistics,
no special short block), so a weight bitsandbytes quantized on CUDA can differ
from ours in rare codes. Any such weight still loads, without a copy, and
dequantizes exactly, through ``NF4Weight.from_bnb``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .backend import use_triton
from .checks import FLOAT_DTYPES, check_tensor, dtype_names
from .dynamic_map import dynamic_map
from .launch import TRITON_DTYPE, KernelSpec, compile_case, launch, register

# The NF4 table as bitsandbytes hard-codes it (functional.get_4bit_type("nf4")):
# create_normal_map(offset=0.9677083), 7 negative and 8 positive quantiles and
# an exact 0. Sorted, so a code's order is its value's order.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# bitsandbytes' quantize_4bit accepts exactly these block sizes.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# quantize_4bit always nests the absmax in blocks of 256.
NESTED_BLOCKSIZE = 256
# Quantize and dequantize walk the weight this many elements at a time, so their
# fp32 / int64 temporaries stay under ~100 MiB for any weight. A multiple of every
# supported block size (chunks hold whole blocks and whole bytes).
_CHUNK_ELEMENTS = 1 << 22

# The smallest absmax bitsandbytes divides by: an all-zero block scales to 0
# instead of NaN.
_MIN_ABSMAX = 1e-38
# Resolution of bitsandbytes' CPU 8-bit quantizer: scaled values are snapped to
# a grid of this many points over [-1, 1] before the nearest code is looked up.
_LUT_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _nf4_bounds(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The table and the midpoints between its neighbours, in fp32 as bnb forms them."""
    code = NF4_CODE.to(device)
    return code, (code[:-1] + code[1:]) / 2


def _dynamic_map(device: torch.device) -> torch.Tensor:
    # A fresh tensor per weight, as bnb's QuantState holds its own copy.
    return dynamic_map(signed=True, device=device)


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Weight:
    """A (out_features, in_features) weight stored as NF4 codes in bitsandbytes' layout.

    ``packed``: uint8 (ceil(numel/2),), element i of the row-major flat weight in
    byte i // 2, even elements in the high nibble. ``absmax``: fp32 (n_blocks,),
    or uint8 (n_blocks,) codes over ``nested_code`` when double quantized, with
    ``nested_absmax`` fp32 (ceil(n_blocks/256),) and ``offset`` an fp32 scalar.
    ``dtype`` is the dtype it dequantizes to (bnb's quant_state.dtype).

    Equality is identity (eq=False): comparing the tensors field by field has no
    single truth value.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Shapes and dtypes only, so that a wrong weight fails here and not deep
        # inside a kernel; no values are read (no host sync).
        object.__setattr__(self, "shape", _check_shape(self.shape))
        _check_blocksize(self.blocksize, "blocksize")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be {dtype_names(FLOAT_DTYPES)}, got {self.dtype}")
        numel = self.shape[0] * self.shape[1]
        n_blocks = -(-numel // self.blocksize)
        check_tensor("packed", self.packed, (torch.uint8,), shape=((numel + 1) // 2,))
        device = self.packed.device
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if all(t is None for t in nested):
            check_tensor("absmax", self.absmax, (torch.float32,), shape=(n_blocks,), device=device)
            return
        if any(t is None for t in nested):
            raise ValueError(
                "nested_absmax, nested_code and offset must be given together (double quantization) or not at all"
            )
        if self.nested_blocksize != NESTED_BLOCKSIZE:
            raise ValueError(
                f"nested_blocksize must be {NESTED_BLOCKSIZE} (bitsandbytes' only one), got {self.nested_blocksize}"
            )
        check_tensor("absmax", self.absmax, (torch.uint8,), shape=(n_blocks,), device=device)
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        check_tensor("nested_absmax", self.nested_absmax, (torch.float32,), shape=(n_nested,), device=device)
        check_tensor("nested_code", self.nested_code, (torch.float32,), shape=(256,), device=device)
        check_tensor("offset", self.offset, (torch.float32,), shape=(), device=device)

    @property
    def double_quantized(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, absmax, nested absmax, code table, offset."""
        tensors = (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """fp32 (n_blocks,): the scale of every block, undoing double quantization.

        bitsandbytes' formula, as two separately rounded fp32 operations:
        ``nested_code[q] * nested_absmax[j // 256]``, then ``+ offset``.
        """
        if not self.double_quantized:
            return self.absmax
        n_blocks = self.absmax.numel()
        n_nested = self.nested_absmax.numel()
        values = self.nested_code[self.absmax.long()]  # (n_blocks,)
        values = torch.nn.functional.pad(values, (0, n_nested * NESTED_BLOCKSIZE - n_blocks))
        scaled = (values.view(n_nested, NESTED_BLOCKSIZE) * self.nested_absmax[:, None]).view(-1)[:n_blocks]
        return scaled + self.offset

    def dequantize(self) -> torch.Tensor:
        """(out_features, in_features) in ``self.dtype``, equal to bnb's dequantize_4bit."""
        return dequantize_nf4(self)

    def to(self, device) -> "NF4Weight":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    @classmethod
    def from_bnb(cls, param) -> "NF4Weight":
        """Wrap a quantized bitsandbytes ``Params4bit`` without copying anything.

        ``packed``, ``absmax`` and the nested tensors share storage with
        ``param.data`` and ``param.quant_state``: writing to one is seen by the
        other.
        """
        state = getattr(param, "quant_state", None)
        if not isinstance(param, torch.Tensor) or state is None:
            raise TypeError(
                "param must be a quantized bitsandbytes Params4bit (a tensor with a quant_state), "
                f"got a {type(param).__name__}{' without a quant_state' if state is None else ''}; "
                "a Params4bit quantizes when it first moves to a device: param.to('cpu') or param.to('cuda')"
            )
        if state.quant_type != "nf4":
            raise ValueError(f"param must be NF4-quantized, got quant_type={state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            # Linear4bit.forward on an AVX512-BF16 CPU repacks its weight in place
            # into a tiled layout with bf16 absmax; that is not this layout.
            raise ValueError(
                "param's quant_state is in bitsandbytes' CPU-repacked format (packing_format_for_cpu); "
                "call param.cuda() or Linear4bit._save_to_state_dict first to restore the standard layout"
            )
        if state.shape is None or len(state.shape) != 2:
            raise ValueError(f"param must hold a 2-D weight, got quant_state.shape={state.shape}")
        # Strip the Params4bit subclass (as_subclass shares the storage) and view
        # any quant_storage dtype as its bytes; view() fails rather than copies.
        data = param.data.as_subclass(torch.Tensor)
        packed = data.view(torch.uint8).view(-1)
        if state.nested:
            return cls(
                packed=packed,
                absmax=state.absmax,
                shape=tuple(state.shape),
                dtype=state.dtype,
                blocksize=state.blocksize,
                nested_absmax=state.state2.absmax,
                nested_code=state.state2.code,
                nested_blocksize=state.state2.blocksize,
                offset=state.offset,
            )
        return cls(
            packed=packed, absmax=state.absmax, shape=tuple(state.shape), dtype=state.dtype, blocksize=state.blocksize
        )

    def to_bnb_quant_state(self):
        """A bitsandbytes QuantState over the same tensors, for bnb's dequantize_4bit / matmul_4bit.

        bnb expects the codes as a (ceil(numel/2), 1) column: pass
        ``self.packed.view(-1, 1)`` alongside.
        """
        # Lazily: ember.kernels imports only torch and triton.
        from bitsandbytes.functional import QuantState

        # bnb's QuantState owns its table (QuantState.to() reassigns it); never hand out ours.
        code = NF4_CODE.to(self.device, copy=True)
        shape = torch.Size(self.shape)
        if not self.double_quantized:
            return QuantState(
                absmax=self.absmax, shape=shape, code=code, blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype
            )
        state2 = QuantState(
            absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize, dtype=torch.float32
        )
        return QuantState(
            absmax=self.absmax,
            shape=shape,
            code=code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )


def _check_shape(shape) -> tuple[int, int]:
    try:
        out, inp = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}") from None
    if out < 1 or inp < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return out, inp


def _check_blocksize(blocksize, name: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in [32, 4096] (bitsandbytes' sizes), got {blocksize}")


# ----------------------------------------------------------------------------
# 4-bit codes
# ----------------------------------------------------------------------------


def _nf4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 codes of values already scaled to [-1, 1]: the nearest entry, ties to the lower.

    bucketize(right=False) counts the midpoints strictly below x, which is the
    index of the nearest entry with a value exactly on a midpoint going down,
    as bitsandbytes does.
    """
    _, bounds = _nf4_bounds(scaled.device)
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(2k,) uint8 codes -> (k,) bytes, the first of each pair in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """(k,) bytes -> (2k,) uint8 codes, high nibble first."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).view(-1)


def _quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (n,) float -> packed uint8 (ceil(n/2),), absmax fp32 (ceil(n/bs),)."""
    n = flat.numel()
    n_full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n_full, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, n_full)
        blocks = flat[start:stop].float().view(-1, blocksize)  # (chunk_blocks, bs)
        block_max = blocks.abs().amax(dim=1)
        # bnb multiplies full blocks by the reciprocal (not a division).
        scaled = torch.clamp(blocks * (1.0 / block_max.clamp(min=_MIN_ABSMAX)).view(-1, 1), -1, 1)
        absmax[start // blocksize : stop // blocksize] = block_max
        packed[start // 2 : stop // 2] = _pack(_nf4_codes(scaled.view(-1)))
    if n_full < n:
        tail = flat[n_full:].float()
        # bnb stores the clamped maximum for the short block, and divides.
        tail_max = tail.abs().max().clamp(min=_MIN_ABSMAX)
        scaled = torch.clamp(tail / tail_max, -1, 1)
        # An odd numel pads with a scaled 0, whose code is 7 (the table's 0.0).
        scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))
        absmax[-1] = tail_max
        packed[n_full // 2 :] = _pack(_nf4_codes(scaled))
    return packed, absmax


# ----------------------------------------------------------------------------
# 8-bit nested absmax
# ----------------------------------------------------------------------------


def _quantize_blockwise_dynamic(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 (m,) -> (codes uint8 (m,), absmax fp32 (ceil(m/256),)): bnb's CPU 8-bit kernel.

    bitsandbytes 0.50's CPU quantize_blockwise does not search the code for the
    nearest value. Per block of 256 it takes v = clamp(x * (1/absmax), -1, 1),
    snaps v to a grid of 65536 points, i = trunc(fma((v + 1) * 0.5, 65535, 0.5))
    in fp32, and gives the code nearest to the grid point -1 + 2i/65535 (ties to
    the lower code). Near a midpoint between two codes this can differ from the
    nearest code of v itself, so it is reproduced step by step. An all-zero
    block gets absmax 0 and codes 0.
    """
    m = x.numel()
    n_blocks = -(-m // NESTED_BLOCKSIZE)
    # Zero padding leaves every block's max |x| unchanged; the padded codes are dropped.
    blocks = torch.nn.functional.pad(x, (0, n_blocks * NESTED_BLOCKSIZE - m)).view(n_blocks, NESTED_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    zero = absmax == 0
    # An all-zero block would scale as 0 * inf = NaN; it is overwritten below.
    v = torch.clamp(blocks * (1.0 / torch.where(zero, 1.0, absmax)).view(-1, 1), -1, 1)
    half = (v + 1.0) * 0.5
    # The fused multiply-add rounds once: half * 65535 + 0.5 needs at most 40
    # significant bits, so it is exact in fp64 and the single rounding to fp32
    # is the fma's.
    grid_index = (half.double() * (_LUT_SIZE - 1) + 0.5).float().long()
    grid = (2.0 * grid_index.float()) / (_LUT_SIZE - 1) - 1.0
    midpoints = (code[:-1] + code[1:]) * 0.5
    codes = torch.searchsorted(midpoints, grid.view(-1))
    codes = torch.where(zero.repeat_interleave(NESTED_BLOCKSIZE), 0, codes)
    return codes[:m].to(torch.uint8), absmax


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def quantize_nf4(weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a (out_features, in_features) weight to NF4, exactly as bitsandbytes does.

    Args:
        weight: (out_features, in_features) float32, float16 or bfloat16, any device.
        blocksize: elements per absmax block, a power of two in [32, 4096].
        double_quant: also quantize the absmax to 8 bits (bnb's compress_statistics),
            0.516 instead of 0.5625 bytes per parameter at blocksize 64.

    Returns:
        An NF4Weight whose codes and statistics equal those of
        ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
        compress_statistics=double_quant, quant_type="nf4")`` on CPU, and which
        dequantizes to ``weight.dtype``.
    """
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    _check_blocksize(blocksize, "blocksize")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")

    # Row-major flat order is the layout; reshape copies only a non-contiguous weight.
    flat = weight.detach().reshape(-1)  # (numel,)
    packed, absmax = _quantize_4bit(flat, blocksize)
    shape = (weight.shape[0], weight.shape[1])
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=shape, dtype=weight.dtype, blocksize=blocksize)

    # Centering first: absmax values are all positive and of similar size, and
    # the signed dynamic map is densest near 0.
    offset = absmax.mean()
    nested_code = _dynamic_map(weight.device)
    codes, nested_absmax = _quantize_blockwise_dynamic(absmax - offset, nested_code)
    return NF4Weight(
        packed=packed,
        absmax=codes,
        shape=shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset,
    )


def dequantize_nf4(weight: NF4Weight, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(out_features, in_features) in ``dtype`` (default ``weight.dtype``): ``NF4_CODE[code] * block_absmax``.

    The product is formed in fp32 and rounded once to the output dtype (round to
    nearest even), as bitsandbytes' dequantize_4bit does; asking for another
    dtype than the weight's (x's compute dtype, say) rounds once to that dtype,
    never twice. Where bitsandbytes' AVX512 CPU kernel is correct
    (``in_features`` a multiple of the block size, or not of 16) the result is
    bit-identical to it; for other shapes that kernel mis-assigns blocks to rows
    and this function follows the layout. On a GPU (and under the interpreter)
    one Triton kernel dequantizes the whole weight; the PyTorch path walks it in
    chunks. Both give the same bits.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be {dtype_names(FLOAT_DTYPES)}, got {dtype}")
    if use_triton(weight.packed):
        return _dequantize_triton(weight, dtype)
    n = weight.shape[0] * weight.shape[1]
    bs = weight.blocksize
    code, _ = _nf4_bounds(weight.device)
    absmax = weight.block_absmax()  # (n_blocks,) fp32
    out = torch.empty(n, dtype=dtype, device=weight.device)
    for start in range(0, n, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, n)
        length = stop - start
        codes = _unpack(weight.packed[start // 2 : (stop + 1) // 2])[:length]
        values = code[codes.long()]  # (length,) fp32
        # Only the last chunk can end inside a block: pad it to whole blocks.
        chunk_blocks = -(-length // bs)
        values = torch.nn.functional.pad(values, (0, chunk_blocks * bs - length)).view(chunk_blocks, bs)
        scaled = values * absmax[start // bs : start // bs + chunk_blocks, None]
        out[start:stop] = scaled.view(-1)[:length]  # the one rounding to weight.dtype
    return out.view(weight.shape)


# ----------------------------------------------------------------------------
# Triton dequantization: one pass over the packed bytes
# ----------------------------------------------------------------------------


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, out_ptr,
    numel, num_bytes, stride_packed, stride_absmax,
    BLOCKSIZE: tl.constexpr, BLOCK_BYTES: tl.constexpr,
):
    # One program: BLOCK_BYTES consecutive packed bytes -> the 2 * BLOCK_BYTES
    # consecutive elements of the row-major (out, in) weight they hold.
    offs = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)  # byte indices
    # num_bytes = ceil(numel / 2) comes from the host: an argument divisible by 16
    # lets the compiler vectorize the masked byte loads, (numel + 1) // 2 did not.
    in_range = offs < num_bytes
    byte = tl.load(packed_ptr + offs * stride_packed, mask=in_range, other=0).to(tl.int32)
    # The 16-entry table once per program, then gathered from registers: no
    # per-element load of it.
    table = tl.load(code_ptr + tl.arange(0, 16))
    # Both elements of a byte share a block (block sizes are even); the block
    # index is a shift, BLOCKSIZE being a constexpr power of two.
    absmax = tl.load(absmax_ptr + (offs // (BLOCKSIZE // 2)) * stride_absmax, mask=in_range, other=0.0)
    high = tl.gather(table, byte >> 4, 0) * absmax  # the even element (bitsandbytes' order)
    low = tl.gather(table, byte & 0xF, 0) * absmax
    values = tl.reshape(tl.join(high, low), (2 * BLOCK_BYTES,))  # even, odd, even, odd, ...
    out_offs = tl.program_id(0).to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    # The fp32 product rounded once to the output dtype; an odd numel's padding
    # nibble is not stored.
    tl.store(out_ptr + out_offs, values.to(out_ptr.dtype.element_ty), mask=out_offs < numel)


def _dequantize_case(dtype: torch.dtype):
    # Bytes and scales are contiguous at a launch (their strides are 1).
    return compile_case(_dequantize_nf4_kernel, TRITON_DTYPE[dtype], dtype=dtype,
                        types=dict(packed_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32"),
                        constexprs=dict(stride_packed=1, stride_absmax=1, BLOCKSIZE=64), tensor_cores=False)


_DEQUANTIZE_SPEC = register(KernelSpec(
    name="nf4_dequantize",
    kernel=_dequantize_nf4_kernel,
    # Memory bound: 2048 elements per program on 4 warps, 8 bytes read and 16
    # values written per thread (two 16-byte stores in bf16).
    configs=[triton.Config({"BLOCK_BYTES": 1024}, num_warps=4)],
    key=["BLOCKSIZE"],
    compile_cases=[_dequantize_case(torch.bfloat16), _dequantize_case(torch.float16),
                   _dequantize_case(torch.float32)],
))


@functools.lru_cache(maxsize=None)
def _nf4_code_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


def _dequantize_triton(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    numel = weight.shape[0] * weight.shape[1]
    absmax = weight.block_absmax()  # (n_blocks,) fp32: double quantization undone, n_blocks / 256 work
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # (out, in)
    n_bytes = (numel + 1) // 2
    launch(
        _DEQUANTIZE_SPEC, lambda meta: (triton.cdiv(n_bytes, meta["BLOCK_BYTES"]),),
        weight.packed, absmax, _nf4_code_on(weight.device), out, numel, n_bytes, weight.packed.stride(0),
        absmax.stride(0),
        BLOCKSIZE=weight.blocksize,
    )
    return out


__all__ = ["NF4_CODE", "NF4Weight", "SUPPORTED_BLOCKSIZES", "dequantize_nf4", "quantize_nf4"]
