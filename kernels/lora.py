"""Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T, over a dense or NF4 base.

What is fused. Stock PEFT runs the base matmul, then dropout(x), x A^T and
(x A^T) B^T as separate kernels, adds the two outputs (a second pass over y),
and keeps dropout(x), a full copy of the layer input, for the backward; over
a 4-bit base (QLoRA) it dequantizes the whole weight before every matmul.
Here, with M rows, `in` input and `out` output features and rank r:

- forward: a thin kernel computes xa = dropout(x) A^T, (M, r) in fp32, with
  the dropout mask drawn in registers; the base matmul x W^T then adds
  bias + scaling * xa B^T in its epilogue, so y is written once;
- backward: dyB = dy B (thin kernel, (M, r)); dx = dy W + scaling *
  mask/(1-p) * dyB A with the low-rank term in the dx matmul's epilogue;
  dA = scaling * dyB^T dropout(x) and dB = scaling * dy^T xa through rank-r
  products that split M across programs and sum fp32 partials (no atomics,
  so gradients are bitwise repeatable). No (out, in) delta-W is ever formed.
- dropout's mask is never stored: it is a Philox draw keyed by a per-call
  seed and the element's (row, column) position, regenerated wherever needed.
  What the backward keeps is x (the autograd graph holds it anyway) and xa,
  r fp32 values per row: for r = 16 and in = 4096 that is 64 bytes against
  the 8 KiB per row of PEFT's bf16 copy of dropout(x).
- an NF4 base (bitsandbytes' layout, see ``ember.kernels.nf4``) below
  NF4_DEQUANTIZE_ONCE_ROWS rows is read as packed 4-bit codes and dequantized
  tile by tile in registers, in the forward and in the dx matmul: no full-size
  dequantized weight exists. From that many rows up, each of the two matmuls
  first dequantizes the base once, with one vectorized kernel, into a
  transient 16-bit copy of that layer's weight (freed after the matmul), and
  runs the dense kernel: the in-register path would dequantize every weight
  once per row tile (see the constant for the numbers). PEFT over
  bitsandbytes does the same dequantization, at every row count.

The base weight is frozen: no gradient flows to it. Every dot accumulates in
fp32; 16-bit inputs run on tensor cores; fp32 inputs use exact fp32 dots (no
TF32, as PyTorch's default), which are slow on a GPU: train in bf16.

Where it stops being fast: the thin kernels re-read x (forward) and dy
(backward) once more, which costs about r/in of the base matmul's time in
bandwidth for small r; an NF4 tile dequantized in registers costs per-element
gathers of its code and block absmax, extra ALU work that the 4x smaller
weight reads pay for only when the matmul is memory-bound (few rows, as in
small batches), which is why many rows take the dequantize-once path.

Without the interpreter a CPU runs a PyTorch path with the same algorithm:
row chunks for the dropout draws and, below NF4_DEQUANTIZE_ONCE_ROWS rows,
(out) row chunks of a dequantized NF4 weight, so it holds a full dequantized
weight exactly when the Triton path does. Its dropout bits
come from torch's generator per row chunk: repeatable, not the GPU's.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .autocast import autocast_dtype, autocast_off, cast_for_autocast
from .backend import use_triton
from .checks import check_number, check_tensor
from .launch import TRITON_DTYPE, CompileCase, KernelSpec, compile_case, launch, register
from .nf4 import NF4_CODE, NF4Weight, dequantize_nf4
from .tiling import grouped_tile, span

MAX_RANK = 256

# Rows (tokens, M) from which a call dequantizes an NF4 base once, into a
# transient 16-bit copy of that one layer's weight, and runs the dense matmul;
# below, tiles are dequantized in registers inside the K-loop. The in-register
# path dequantizes every weight once per 64-row tile, ceil(M / 64) times per
# call, each time with ~10 integer and memory instructions per element (a byte
# and an absmax gather, shifts, a table gather, a multiply, a cast): on an
# H100 that ALU work costs about as much as the tile's wgmma work itself.
# Dequantizing once costs one pass at memory bandwidth (0.5 byte read, 2
# written, about the time of 2 to 3 in-register dequantizations), after which
# the matmul runs on the larger dense tiles. So: one row tile (M <= 64) keeps
# the in-register path, which also reads 4x fewer weight bytes where small
# batches are memory bound; from 256 rows (4 row tiles, where the repeated
# dequantizations cost more than the pass) the weight is dequantized once.
# QLoRA training (thousands of tokens per step) is far above it, decoding and
# small evaluation batches below.
NF4_DEQUANTIZE_ONCE_ROWS = 256


def lora_linear_ref(x, weight, lora_a, lora_b, *, scaling, bias=None, dropout_mask=None, dropout_p=0.0):
    """The plain PyTorch reference, in the inputs' dtype (the tests run it in float64).

    ``weight`` is a dense tensor (dequantize an ``NF4Weight`` first);
    ``dropout_mask``, a bool (..., in) tensor of kept elements, replaces a random draw.
    """
    dropped = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    y = x @ weight.t() + scaling * (dropped @ lora_a.t()) @ lora_b.t()
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _keep(seed, rows, cols, num_cols, dropout_p):
    # One Philox draw per element of x, keyed by its flat position (64-bit: no
    # wrap), so the forward and both backward kernels regenerate the same mask.
    return tl.rand(seed, rows.to(tl.int64) * num_cols + cols) >= dropout_p


@triton.jit
def _load_nf4(packed_ptr, absmax_ptr, code_ptr, flat, mask, stride_packed, stride_absmax, BLOCKSIZE: tl.constexpr):
    # flat: the elements' row-major indices in the (out, in) weight. Two codes
    # per byte, the even element in the high nibble (bitsandbytes' order); one
    # fp32 absmax per block of BLOCKSIZE consecutive elements. BLOCKSIZE is a
    # constexpr power of two, so the block index is a shift: a runtime block
    # size made it a 64-bit integer division per element.
    byte = tl.load(packed_ptr + (flat >> 1) * stride_packed, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
    return tl.load(code_ptr + nibble) * tl.load(absmax_ptr + (flat // BLOCKSIZE) * stride_absmax, mask=mask,
                                                other=0.0)


@triton.jit
def _lora_matmul_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, bias_ptr, low_ptr, up_ptr, out_ptr,
    M, N, K, R, scaling, dropout_p, seed,
    stride_am, stride_ak, stride_wk, stride_wn, stride_packed, stride_absmax, stride_bias,
    stride_lm, stride_lr, stride_ur, stride_un, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IS_NF4: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # One (BLOCK_M, BLOCK_N) tile of out = a W (+ bias) + [mask/(1-p) *] scaling * low up.
    # Forward: a = x, W = base^T, low = xa, up = B^T. Backward: a = dy, W = base, low = dyB, up = A.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m, mask_m = span(pid_m * BLOCK_M, M, BLOCK_M)
    offs_n, mask_n = span(pid_n * BLOCK_N, N, BLOCK_N)
    compute_dtype = out_ptr.dtype.element_ty
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_cols = offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k, mask_k = span(k_start, K, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_flat = offs_k.to(tl.int64)[:, None] * stride_wk + w_cols
        w_mask = mask_k[:, None] & mask_n[None, :]
        if IS_NF4:
            w = _load_nf4(w_ptr, absmax_ptr, code_ptr, w_flat, w_mask, stride_packed, stride_absmax,
                          NF4_BLOCKSIZE).to(compute_dtype)
        else:
            w = tl.load(w_ptr + w_flat, mask=w_mask, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # The low-rank term, R in chunks so that rank 256 fits in registers. The
    # scaling goes into the fp32 `low` before the cast, where it costs nothing.
    if HAS_DROPOUT:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        low_rank = acc
    for r_start in range(0, R, BLOCK_R):
        offs_r, mask_r = span(r_start, R, BLOCK_R)
        low = tl.load(low_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        up = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n.to(tl.int64)[None, :] * stride_un,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        low_rank = tl.dot((low * scaling).to(compute_dtype), up.to(compute_dtype), low_rank,
                          input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _keep(seed, offs_m[:, None], offs_n[None, :], N, dropout_p)
        acc += tl.where(keep, low_rank / (1.0 - dropout_p), 0.0)
    else:
        acc = low_rank
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(compute_dtype), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _load_dropped(a_ptr, offs_m, offs_k, mask_m, mask_k, stride_am, stride_ak, K, dropout_p, seed,
                  HAS_DROPOUT: tl.constexpr):
    # The (rows, columns) tile of the (M, K) input a, its dropped elements zeroed
    # (the 1 / (1 - p) is applied to the fp32 result instead).
    a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    if HAS_DROPOUT:
        a = tl.where(_keep(seed, offs_m[:, None], offs_k[None, :], K, dropout_p), a, 0.0)
    return a


@triton.jit
def _lora_down_kernel(
    a_ptr, u_ptr, out_ptr,
    M, K, R, dropout_p, seed,
    stride_am, stride_ak, stride_uk, stride_ur, stride_om, stride_or,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One (BLOCK_M, BLOCK_R) tile of out = dropout(a) u in fp32: xa = dropout(x) A^T, or dyB = dy B.
    offs_m, mask_m = span(tl.program_id(0) * BLOCK_M, M, BLOCK_M)
    offs_r, mask_r = span(tl.program_id(1) * BLOCK_R, R, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k, mask_k = span(k_start, K, BLOCK_K)
        a = _load_dropped(a_ptr, offs_m, offs_k, mask_m, mask_k, stride_am, stride_ak, K, dropout_p, seed,
                          HAS_DROPOUT)
        u = tl.load(u_ptr + offs_k.to(tl.int64)[:, None] * stride_uk + offs_r[None, :] * stride_ur,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(a, u.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_rank_grad_kernel(
    low_ptr, a_ptr, out_ptr,
    M, K, R, rows_per_split, dropout_p, seed,
    stride_lm, stride_lr, stride_am, stride_ak, stride_os, stride_or, stride_ok,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One (BLOCK_K, BLOCK_R) tile of one split's partial sum dropout(a)^T low, over
    # that split's rows, in fp32: (dA / scaling)^T = dropout(x)^T dyB, dB / scaling = dy^T xa.
    # The product is formed transposed, with K (in or out features, thousands) as
    # its leading dimension and the rank as its narrow one: a Hopper wgmma needs
    # 64 rows per warpgroup, which a rank tile (r is often 8 to 32) cannot give,
    # while its N may be as small as 8.
    # Offsets written out rather than through span: with the helper's inlined
    # debug info ptxas gives this kernel up to 19 more registers (the compile gate).
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_r = offs_r < R
    mask_k = offs_k < K
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_K, BLOCK_R), tl.float32)
    for m_start in range(row_start, row_end, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        a = _load_dropped(a_ptr, offs_m, offs_k, mask_m, mask_k, stride_am, stride_ak, K, dropout_p, seed,
                          HAS_DROPOUT)
        low = tl.load(low_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), low.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    tl.store(out_ptr + split * stride_os + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or, acc,
             mask=mask_k[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------
# Kernel specs: configs as data (see launch.py), compile cases for the gate
# ----------------------------------------------------------------------------

# fp32 runs exact fp32 dots, as PyTorch does by default (no TF32).
_DOT_PRECISION = {torch.float16: "tf32", torch.bfloat16: "tf32", torch.float32: "ieee"}

# The bias's, the NF4 bytes' and the absmax's strides are 1 in practice (and
# the launchers pass 1 for an absent one); the compile gate specializes them as
# the JIT does for an argument equal to 1.
_UNIT_STRIDES = dict(stride_packed=1, stride_absmax=1, stride_bias=1)

_KERNELS = {"matmul": _lora_matmul_kernel, "down": _lora_down_kernel, "rank_grad": _lora_rank_grad_kernel}
# Argument types other than compile_case's defaults (pointers to x's dtype, i32 scalars).
_ARG_TYPES = dict(absmax_ptr="*fp32", code_ptr="*fp32", low_ptr="*fp32", scaling="fp32", dropout_p="fp32", seed="i64")


# Strides that are 1 at a launch, per kernel and direction (the JIT makes an
# argument equal to 1 a constant, and the compiler vectorizes along it): x, dy,
# the fp32 (M, r) products and the outputs are row-major; the base weight and
# the adapters are read transposed in one direction and straight in the other.
_LAUNCH_UNIT_STRIDES = {
    ("matmul", False): ("stride_ak", "stride_wk", "stride_lr", "stride_ur", "stride_on"),  # y = x W^T + ...
    ("matmul", True): ("stride_ak", "stride_wn", "stride_lr", "stride_un", "stride_on"),  # dx = dy W + ...
    ("down", False): ("stride_ak", "stride_uk", "stride_or"),  # xa = dropout(x) A^T
    ("down", True): ("stride_ak", "stride_ur", "stride_or"),  # dyB = dy B
    ("rank_grad", False): ("stride_lr", "stride_ak", "stride_ok"),
    ("rank_grad", True): ("stride_lr", "stride_ak", "stride_ok"),
}


def _case(kernel: str, dtype: torch.dtype, lora_dtype: torch.dtype, *, backward: bool = False,
          **flags: bool) -> CompileCase:
    element, lora = TRITON_DTYPE[dtype], TRITON_DTYPE[lora_dtype]
    types = dict(_ARG_TYPES, up_ptr=f"*{lora}", u_ptr=f"*{lora}")
    if kernel != "matmul":
        types["out_ptr"] = "*fp32"  # the rank-r products stay fp32
    if flags.get("is_nf4"):
        types["w_ptr"] = "*u8"  # packed 4-bit codes
    constexprs = {"HAS_DROPOUT": False, "DOT_PRECISION": _DOT_PRECISION[dtype]}
    if kernel == "matmul":
        constexprs.update(HAS_BIAS=False, IS_NF4=False, NF4_BLOCKSIZE=64, **_UNIT_STRIDES)
    constexprs.update({name.upper(): value for name, value in flags.items()})
    constexprs.update(dict.fromkeys(_LAUNCH_UNIT_STRIDES[kernel, backward], 1))
    label = ",".join(["dx" if backward and kernel == "matmul" else "bwd" if backward else "fwd", element,
                      "lora_" + lora]
                     + [name.removeprefix("has_").removeprefix("is_") for name, value in flags.items() if value])
    return compile_case(_KERNELS[kernel], label, dtype=dtype, types=types, constexprs=constexprs,
                        tensor_cores=dtype != torch.float32)


def _cases(kernel: str, variant: str) -> list[CompileCase]:
    case = functools.partial(_case, kernel)
    dx = functools.partial(_case, kernel, backward=True)
    if kernel == "matmul":
        # Dropout is applied only in the dx matmul, the bias only in the forward.
        half = {
            "dense": [case(torch.bfloat16, torch.bfloat16, has_bias=True), dx(torch.float16, torch.float32)],
            "dense_dropout": [dx(torch.bfloat16, torch.float32, has_dropout=True)],
            "nf4": [case(torch.bfloat16, torch.float32, is_nf4=True, has_bias=True),
                    dx(torch.float16, torch.float16, is_nf4=True)],
            "nf4_dropout": [dx(torch.bfloat16, torch.bfloat16, is_nf4=True, has_dropout=True)],
            "fp32": [case(torch.float32, torch.float32, has_bias=True), dx(torch.float32, torch.float32, has_dropout=True),
                     case(torch.float32, torch.float32, is_nf4=True)],
        }
        return half[variant]
    if variant == "fp32":
        return [case(torch.float32, torch.float32, has_dropout=True)]
    if kernel == "down":  # dropout only on the forward's x
        return [case(torch.bfloat16, torch.float32, has_dropout=True), dx(torch.float16, torch.float16)]
    return [case(torch.bfloat16, torch.float32, has_dropout=True), dx(torch.float16, torch.float16)]


def _config(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# Each config compiles without spills and within shared memory for sm_80 and
# sm_90 (the compile gate, as launched: unit strides specialized). configs[0]
# is what the interpreter runs; on a GPU the autotuner picks per shape. The
# 128x256x64 and 128x128x64 dense tiles (Triton's tutorial and CUTLASS's
# Hopper tiles) halve the operand traffic per FLOP of 128x128x32 at large
# shapes; on sm_90 every 16-bit config issues wgmma (HGMMA), two 64-row
# warpgroups on 8 warps. NF4 tiles stay at BLOCK_K = 32: the per-element code
# and absmax gathers of a 64-deep tile spill. fp32 takes 8 warps: its FMA dots
# hold whole operand rows. The rank-gradient kernel's leading dimension is K
# (see the kernel), 64 rows per warpgroup; its narrow N is the rank tile.
_CONFIGS = {
    ("matmul", "dense"): [_config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, BLOCK_R=32, GROUP_M=8),
                          _config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=32, GROUP_M=8),
                          _config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, BLOCK_R=16, GROUP_M=8),
                          _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32, GROUP_M=8)],
    # Dropout keeps a second (BLOCK_M, BLOCK_N) fp32 accumulator: 128x128x64 spills there.
    ("matmul", "dense_dropout"): [_config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, BLOCK_R=32, GROUP_M=8)],
    ("matmul", "nf4"): [_config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, BLOCK_R=32, GROUP_M=8)],
    ("matmul", "nf4_dropout"): [_config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, BLOCK_R=32, GROUP_M=8)],
    ("matmul", "fp32"): [_config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, BLOCK_R=16, GROUP_M=8)],
    ("down", "half"): [_config(4, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_R=32)],
    ("down", "fp32"): [_config(4, 2, BLOCK_M=32, BLOCK_K=32, BLOCK_R=32)],
    ("rank_grad", "half"): [_config(4, 3, BLOCK_M=64, BLOCK_K=64, BLOCK_R=32),
                            _config(4, 3, BLOCK_M=32, BLOCK_K=128, BLOCK_R=16),
                            _config(8, 3, BLOCK_M=64, BLOCK_K=128, BLOCK_R=64),
                            _config(8, 3, BLOCK_M=32, BLOCK_K=256, BLOCK_R=32)],
    ("rank_grad", "fp32"): [_config(8, 2, BLOCK_M=32, BLOCK_K=32, BLOCK_R=32)],
}
_AUTOTUNE_KEYS = {
    "matmul": ["N", "K", "R", "HAS_BIAS", "IS_NF4", "HAS_DROPOUT"],
    "down": ["K", "R", "HAS_DROPOUT"],
    "rank_grad": ["K", "R", "HAS_DROPOUT"],
}

_SPECS = {
    (kernel, variant): register(KernelSpec(
        name=f"lora_{kernel}_{variant}",
        kernel=_KERNELS[kernel],
        configs=configs,
        key=_AUTOTUNE_KEYS[kernel],
        compile_cases=_cases(kernel, variant),
    ))
    for (kernel, variant), configs in _CONFIGS.items()
}


def _spec(kernel: str, dtype: torch.dtype, is_nf4: bool = False, has_dropout: bool = False) -> KernelSpec:
    if dtype == torch.float32:
        return _SPECS[kernel, "fp32"]
    if kernel != "matmul":
        return _SPECS[kernel, "half"]
    return _SPECS[kernel, ("nf4" if is_nf4 else "dense") + ("_dropout" if has_dropout else "")]


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BaseOperand:
    """The frozen base weight as one (K, N) operand of the matmul kernel."""

    data: torch.Tensor  # dense values, or packed NF4 bytes
    absmax: torch.Tensor | None
    code: torch.Tensor | None
    blocksize: int
    stride_k: int
    stride_n: int
    stride_packed: int = 1  # NF4: between consecutive bytes, and between consecutive block scales
    stride_absmax: int = 1

    @property
    def is_nf4(self) -> bool:
        return self.absmax is not None


@functools.lru_cache(maxsize=None)
def _nf4_code_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


def _base_operand(weight, transposed: bool) -> _BaseOperand:
    """W^T (forward, (in, out)) when ``transposed``, else W ((out, in), for dx = dy W)."""
    if isinstance(weight, NF4Weight):
        # Logical row-major strides of the (out, in) weight; _load_nf4 finds byte and block.
        strides = (weight.shape[1], 1)
        absmax = weight.block_absmax()
        stride_k, stride_n = (strides[1], strides[0]) if transposed else strides
        return _BaseOperand(weight.packed, absmax, _nf4_code_on(weight.packed.device), weight.blocksize,
                            stride_k, stride_n, weight.packed.stride(0), absmax.stride(0))
    strides = weight.stride()
    stride_k, stride_n = (strides[1], strides[0]) if transposed else strides
    # A dense base passes NF4_BLOCKSIZE=64, unused: one compiled variant, whatever NF4 weights exist.
    return _BaseOperand(weight, None, None, 64, stride_k, stride_n)


def _rows_per_split(rows: int, other_programs: int) -> int:
    # Enough splits of M that (R, K) tiles x splits fill a large GPU (~2 programs
    # per SM on 132 SMs), but at least 256 rows each so the partials stay small.
    splits = max(1, min(triton.cdiv(rows, 256), triton.cdiv(264, max(other_programs, 1))))
    return triton.cdiv(rows, splits)


def _triton_matmul(a, base: _BaseOperand, bias, low, up, scaling, dropout_p, seed, out):
    """out (M, N) = a (M, K) @ base (+ bias) + [mask *] scaling * low (M, R) @ up (R, N)."""
    (M, K), N, R = a.shape, out.shape[1], low.shape[1]
    has_dropout = dropout_p > 0
    placeholder = base.data  # unused pointer arguments: the kernel never reads them
    launch(
        _spec("matmul", a.dtype, base.is_nf4, has_dropout),
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        a, base.data, base.absmax if base.is_nf4 else placeholder, base.code if base.is_nf4 else placeholder,
        bias if bias is not None else placeholder, low, up, out,
        M, N, K, R, scaling, dropout_p, seed,
        *a.stride(), base.stride_k, base.stride_n, base.stride_packed, base.stride_absmax,
        bias.stride(0) if bias is not None else 1, *low.stride(), *up.stride(), *out.stride(),
        HAS_BIAS=bias is not None, IS_NF4=base.is_nf4, HAS_DROPOUT=has_dropout,
        DOT_PRECISION=_DOT_PRECISION[a.dtype], NF4_BLOCKSIZE=base.blocksize,
    )
    return out


def _triton_down(a, u, dropout_p, seed):
    """dropout(a) (M, K) @ u (K, R), in fp32."""
    (M, K), R = a.shape, u.shape[1]
    out = torch.empty(M, R, dtype=torch.float32, device=a.device)
    launch(
        _spec("down", a.dtype),
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_R"])),
        a, u, out, M, K, R, dropout_p, seed, *a.stride(), *u.stride(), *out.stride(),
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=_DOT_PRECISION[a.dtype],
    )
    return out


def _triton_rank_grad(low, a, dropout_p, seed):
    """low (M, R)^T @ dropout(a) (M, K), in fp32: per-split partials, summed here."""
    (M, R), K = low.shape, a.shape[1]
    rows_per_split = _rows_per_split(M, triton.cdiv(R, 32) * triton.cdiv(K, 64))
    splits = triton.cdiv(M, rows_per_split)
    partials = torch.empty(splits, R, K, dtype=torch.float32, device=a.device)
    launch(
        _spec("rank_grad", a.dtype),
        lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, meta["BLOCK_R"]), splits),
        low, a, partials, M, K, R, rows_per_split, dropout_p, seed,
        *low.stride(), *a.stride(), *partials.stride(),
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=_DOT_PRECISION[a.dtype],
    )
    return partials.sum(0) if splits > 1 else partials[0]


def _dequantized_once(weight, rows: int, dtype: torch.dtype):
    """The base for a call over ``rows`` rows: an NF4 base from NF4_DEQUANTIZE_ONCE_ROWS rows up
    becomes a transient dense (out, in) copy in ``dtype``; anything else is returned as it is."""
    if isinstance(weight, NF4Weight) and rows >= NF4_DEQUANTIZE_ONCE_ROWS:
        return dequantize_nf4(weight, dtype=dtype)
    return weight


def _triton_fwd(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    xa = _triton_down(x, lora_a.t(), dropout_p, seed)  # (M, r)
    y = torch.empty(x.shape[0], lora_b.shape[0], dtype=x.dtype, device=x.device)
    base = _base_operand(_dequantized_once(weight, x.shape[0], x.dtype), transposed=True)
    _triton_matmul(x, base, bias, xa, lora_b.t(), scaling, 0.0, 0, y)
    return y, xa


def _triton_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, dropout_p, seed, needs_dx):
    dy_b = _triton_down(dy, lora_b, 0.0, 0)  # (M, r)
    dx = None
    if needs_dx:
        dx = torch.empty_like(x)
        base = _base_operand(_dequantized_once(weight, dy.shape[0], x.dtype), transposed=False)
        _triton_matmul(dy, base, None, dy_b, lora_a, scaling, dropout_p, seed, dx)
    grad_a = _triton_rank_grad(dy_b, x, dropout_p, seed) * scaling  # (r, in)
    grad_b_t = _triton_rank_grad(xa, dy, 0.0, 0) * scaling  # (r, out)
    return dx, grad_a, grad_b_t.t()


# ----------------------------------------------------------------------------
# The PyTorch path (CPU without the interpreter): the same algorithm, with
# dropout drawn per chunk of rows and an NF4 base dequantized per chunk of
# output features, so no full-size mask, dropout(x) or dequantized weight exists.
# ----------------------------------------------------------------------------

_TORCH_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per transient chunk


def _torch_row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(2, _TORCH_CHUNK_ELEMENTS // max(cols, 1)) // 2 * 2  # even: an NF4 row pair never splits a byte
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def _torch_dropped(rows, start, dropout_p, seed):
    """dropout of ``rows``, the rows start: of an (M, in) tensor: mask / (1 - p) times ``rows``.

    The bits depend only on (seed, start) and the chunking, so the forward and
    the backward (dropout(x) for dA, the mask for dx) draw the same ones.
    """
    if dropout_p == 0:
        return rows
    generator = torch.Generator(device=rows.device).manual_seed(hash((seed, start)) & ((1 << 63) - 1))
    keep = torch.rand(rows.shape, generator=generator, device=rows.device) >= dropout_p
    return rows * keep / (1.0 - dropout_p)


def _torch_weight_rows(weight, start, end, dtype):
    """Rows start:end of the base weight, (end - start, in), in ``dtype``."""
    if not isinstance(weight, NF4Weight):
        return weight[start:end]
    columns = weight.shape[1]
    first, last = start * columns, end * columns
    packed = weight.packed[first // 2:(last + 1) // 2]
    # bitsandbytes' order: the even element in the high nibble. int32 indices
    # and per-block absmax repeated, so no temporary is wider than the fp32 chunk.
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten()[first % 2:first % 2 + last - first]
    size = weight.blocksize
    block_absmax = weight.block_absmax()[first // size:(last - 1) // size + 1].repeat_interleave(size)
    values = _nf4_code_on(packed.device)[nibbles.int()] * block_absmax[first % size:first % size + last - first]
    return values.view(end - start, columns).to(dtype)


def _torch_base_matmul(a, weight, transposed: bool, dtype):
    """a @ W^T (transposed) or a @ W, over chunks of W's rows when W is NF4 (dequantized
    whole from NF4_DEQUANTIZE_ONCE_ROWS rows of ``a`` up, as the Triton path does)."""
    weight = _dequantized_once(weight, a.shape[0], dtype)
    if not isinstance(weight, NF4Weight):
        return a @ (weight.t() if transposed else weight)
    out_features, in_features = weight.shape
    chunks = _torch_row_chunks(out_features, in_features)
    if transposed:
        return torch.cat([a @ _torch_weight_rows(weight, s, e, dtype).t() for s, e in chunks], dim=1)
    result = torch.zeros(a.shape[0], in_features, dtype=torch.float32, device=a.device)
    for s, e in chunks:
        result += (a[:, s:e] @ _torch_weight_rows(weight, s, e, dtype)).float()
    return result.to(dtype)


def _torch_fwd(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    a_t = lora_a.t().to(x.dtype)
    xa = torch.cat([(_torch_dropped(x[s:e], s, dropout_p, seed) @ a_t).float()
                    for s, e in _torch_row_chunks(x.shape[0], x.shape[1])])  # (M, r)
    y = _torch_base_matmul(x, weight, True, x.dtype) + (xa * scaling).to(x.dtype) @ lora_b.t().to(x.dtype)
    return (y if bias is None else y + bias.to(x.dtype)), xa


def _torch_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, dropout_p, seed, needs_dx):
    low = ((dy @ lora_b.to(dy.dtype)).float() * scaling).to(x.dtype)  # scaling * dy B, (M, r)
    dx = _torch_base_matmul(dy, weight, False, x.dtype) if needs_dx else None
    grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    for s, e in _torch_row_chunks(x.shape[0], x.shape[1]):
        grad_a += (low[s:e].t() @ _torch_dropped(x[s:e], s, dropout_p, seed)).float()
        if needs_dx:
            dx[s:e] += _torch_dropped(low[s:e] @ lora_a.to(x.dtype), s, dropout_p, seed)
    grad_b = (dy.t() @ (xa * scaling).to(dy.dtype)).float()
    return dx, grad_a, grad_b


# ----------------------------------------------------------------------------
# The forward and backward halves, without autograd: LoRALinearFunction runs
# them, and so can a Function over several projections (ember.engine's gated
# MLP recomputes its product and re-reads its base weights between them).
# ----------------------------------------------------------------------------


def lora_dropout_seed(dropout_p: float) -> int:
    """A fresh dropout seed for one call of ``lora_linear_forward`` (0 when there is no dropout).

    Drawn from torch's (CPU) generator: torch.manual_seed makes runs repeatable, and drawing it needs no
    device sync. The same seed must be given to the call's ``lora_linear_backward``.
    """
    return int(torch.randint(1 << 32, 1 << 62, ()).item()) if dropout_p > 0 else 0


def _weight_in(weight, dtype: torch.dtype):
    # A dense base in the compute dtype: a transient cast (no copy when it has that dtype already), made again
    # in the backward rather than kept. An NF4 base dequantizes to the compute dtype in the kernels.
    return weight if isinstance(weight, NF4Weight) else weight.to(dtype)


def lora_linear_forward(x, weight, lora_a, lora_b, *, scaling: float, bias=None, dropout_p: float = 0.0,
                        seed: int = 0):
    """The forward half of ``lora_linear`` on rows, outside autograd: ``(y, xa)``.

    Args:
        x: (M, in_features), float16, bfloat16 or float32: the compute dtype.
        weight: the frozen base, (out_features, in_features) in any float dtype
            (cast to x's dtype for this call only; nothing keeps the copy) or an
            ``NF4Weight``.
        lora_a: (r, in_features); lora_b: (out_features, r); any float dtype.
        scaling, dropout_p: as ``lora_linear``'s.
        bias: None or (out_features,) in x's dtype.
        seed: the dropout seed (``lora_dropout_seed``); pass the same one to the backward.

    Returns:
        y (M, out_features) in x's dtype, and xa = dropout(x) A^T (M, r) in fp32,
        which the backward needs. Runs the Triton kernels or the PyTorch path
        as the backend rule says. Inputs are not checked: ``lora_linear`` is
        the checked entry point.
    """
    if use_triton(x) and x.shape[0] > 0:  # a grid of 0 programs is not launched
        return _triton_fwd(x, _weight_in(weight, x.dtype), lora_a, lora_b, bias, scaling, dropout_p, seed)
    return _torch_fwd(x, _weight_in(weight, x.dtype), lora_a, lora_b, bias, scaling, dropout_p, seed)


def lora_linear_backward(dy, x, xa, weight, lora_a, lora_b, *, scaling: float, dropout_p: float = 0.0,
                         seed: int = 0, needs_dx: bool = True):
    """The backward half of ``lora_linear`` on rows: ``(dx, grad_a, grad_b)``.

    Args:
        dy: (M, out_features) in x's dtype; x: the forward's (M, in_features)
            input; xa: the forward's (M, r) fp32 result; weight, lora_a,
            lora_b, scaling, dropout_p, seed: as given to the forward (the
            weight uncast: it is cast again here, transiently).
        needs_dx: False skips the dx matmul (dx is then None).

    Returns:
        dx (M, in_features) in x's dtype or None; grad_a (r, in_features) and
        grad_b (out_features, r) in fp32 (cast them to the adapters' dtypes).
        The base weight gets no gradient.
    """
    run = _triton_bwd if use_triton(x) and x.shape[0] > 0 else _torch_bwd
    return run(dy, x, xa, _weight_in(weight, x.dtype), lora_a, lora_b, scaling, dropout_p, seed, needs_dx)


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, lora_a, lora_b, scaling: float, bias, dropout_p: float):
        # weight: the base as the caller holds it (under autocast an fp32 Parameter beside 16-bit x). It is cast to
        # x's dtype inside each half, so what is saved is the tensor the module keeps alive anyway, not a 16-bit
        # copy per call (for a 4096 x 4096 layer, 32 MiB until the backward).
        in_features, out_features = x.shape[-1], lora_b.shape[0]
        x2 = x.reshape(-1, in_features)  # (M, in): a view for contiguous activations
        seed = lora_dropout_seed(dropout_p)
        y, xa = lora_linear_forward(x2, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p,
                                    seed=seed)
        ctx.save_for_backward(x2, xa, lora_a, lora_b, *([weight] if isinstance(weight, torch.Tensor) else []))
        ctx.nf4_weight = weight if isinstance(weight, NF4Weight) else None
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        x2, xa, lora_a, lora_b, *dense_weight = ctx.saved_tensors
        weight = dense_weight[0] if dense_weight else ctx.nf4_weight
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, out)
        needs_dx = ctx.needs_input_grad[0]
        dx, grad_a, grad_b = lora_linear_backward(dy2, x2, xa, weight, lora_a, lora_b, scaling=ctx.scaling,
                                                  dropout_p=ctx.dropout_p, seed=ctx.seed, needs_dx=needs_dx)
        grad_bias = dy2.sum(0, dtype=torch.float32) if ctx.has_bias and ctx.needs_input_grad[5] else None
        return (
            dx.view(ctx.x_shape) if needs_dx else None, None, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype),
            None, grad_bias, None,
        )


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check_inputs(x, weight, lora_a, lora_b, scaling, bias, dropout_p, weight_cast: bool) -> None:
    """weight_cast: autocast casts a dense weight to x's dtype (so any float dtype is accepted)."""
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_tensor(name, t)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a scalar")
    if isinstance(weight, NF4Weight):
        weight_shape, weight_device = tuple(weight.shape), weight.device
    elif isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
        if weight.dtype != x.dtype and not (weight_cast and weight.is_floating_point()):
            raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight is the frozen base weight: lora_linear gives it no gradient; "
                             "call weight.requires_grad_(False) (or pass weight.detach())")
        weight_shape, weight_device = tuple(weight.shape), weight.device
    else:
        raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
    out_features, in_features = weight_shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({in_features})")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must be (r, in_features={in_features}), got shape {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"the rank r (lora_a.shape[0]) must be from 1 to {MAX_RANK}, got {rank}")
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_b must be (out_features, r) = ({out_features}, {rank}), got {tuple(lora_b.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be None or a ({out_features},) tensor, got shape {tuple(bias.shape)}")
    devices = {t.device for t in (x, lora_a, lora_b) + ((bias,) if bias is not None else ())} | {weight_device}
    if len(devices) > 1:
        raise ValueError(f"x, weight, lora_a, lora_b and bias must be on one device, got {sorted(map(str, devices))}")
    check_number("scaling", scaling)
    check_number("dropout_p", dropout_p, at_least=0.0, below=1.0)


def lora_linear(x, weight, lora_a, lora_b, *, scaling: float, bias=None, dropout_p: float = 0.0) -> torch.Tensor:
    """y = x W^T + bias + scaling * dropout(x) A^T B^T, fused (see the module notes).

    Args:
        x: (..., in_features), float16, bfloat16 or float32: the compute dtype.
        weight: the frozen base weight, (out_features, in_features) in x's dtype,
            or an ``NF4Weight`` (4-bit, bitsandbytes' layout) dequantized to
            x's dtype tile by tile, or once per matmul into a transient copy
            from ``NF4_DEQUANTIZE_ONCE_ROWS`` rows up. It gets no gradient.
        lora_a: (r, in_features), 1 <= r <= 256; lora_b: (out_features, r).
            Any of the three float dtypes (fp32 adapters over a bf16 base are
            usual); their tiles are cast to x's dtype for the matmuls, and
            their gradients come back in their own dtype.
        scaling: the low-rank term's factor (PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA).
        bias: optional (out_features,).
        dropout_p: dropout on the low-rank branch's input, as PEFT's
            lora_dropout; pass 0 in eval mode. The mask is drawn from a seed
            taken from torch's CPU generator, so torch.manual_seed repeats it.

    Returns:
        (..., out_features) in x's dtype.
    """
    # Under autocast the matmuls run in its dtype, as F.linear's would. The
    # adapters keep theirs (usually fp32): their tiles are cast in registers.
    # A dense weight is cast inside the Function, in the forward and again in
    # the backward, so that no 16-bit copy of it is kept between them.
    dtype = autocast_dtype(x)
    x, bias = cast_for_autocast(dtype, x, bias)
    _check_inputs(x, weight, lora_a, lora_b, scaling, bias, dropout_p, weight_cast=dtype is not None)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, float(scaling), bias, float(dropout_p))
