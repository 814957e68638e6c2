"""RMSNorm and LayerNorm, with the residual add fused, forward and backward.

What is fused. A pre-norm decoder layer computes ``s = x + residual`` and then
``norm(s)``; stock transformers runs the add, an fp32 copy of ``s``, its square,
its mean, the scaling and the weight multiply as separate ops, and autograd
keeps an fp32 copy of the input and the normalized value (measured, bf16 input:
LlamaRMSNorm 6h + 4 bytes per token, GemmaRMSNorm 8h + 12). Here one kernel
reads x (and the residual), writes ``s`` (when there is a residual) and the
normalized output, and keeps one fp32 number per row besides x (2h + 4 bytes
per token in bf16).

Saved for backward, per token at hidden size h:
- ``rms_norm``: its input x itself (no copy; with a residual, the sum ``s``,
  which is also the returned residual stream) and the fp32 rstd: 4 bytes per
  token beyond a tensor the model holds anyway;
- ``layer_norm``: x (or ``s``), the fp32 mean and rstd: 8 bytes per token
  beyond it.
The backward recomputes the normalized value from x and the row statistics.

Statistics are fp32 whatever the input dtype. RMSNorm has two conventions for
where the result is rounded (``cast``): Llama's (``LlamaRMSNorm``, also Qwen2/3,
Mistral, Phi-3) rounds the normalized value to the input dtype and multiplies
by the weight in the promoted dtype; Gemma's multiplies by ``offset + weight``
in fp32 and rounds the product to the input dtype. The default follows
``offset``: 1.0 (Gemma's ``1 + weight``) takes Gemma's, 0.0 Llama's.

Kernels. The forward runs one program per block of BLOCK_ROWS rows (a 2-D
tile, row statistics summed along the columns), walking the rows in BLOCK_H
chunks: one pass for the statistics (two for LayerNorm: mean, then the centred
variance), one to normalize, so any hidden size works without spilling; short
rows share a program, long ones take one each. The backward runs a fixed
number of programs, each over a strided set of the same row blocks;
each keeps its own fp32 partial sum of the weight (and bias) gradient in a
(programs, h) buffer that only it writes, and PyTorch sums the partials: no
atomics, bitwise repeatable. Memory-bound: a row is read twice in the forward
and twice in the backward, the second time mostly from L1/L2.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .autocast import autocast_off
from .backend import use_triton
from .checks import check_number, check_tensor
from .launch import TRITON_DTYPE, KernelSpec, compile_case, launch, register

Cast = Literal["llama", "gemma"]


# ----------------------------------------------------------------------------
# References: plain PyTorch, as the modules they replace compute them. The
# tests run them in float64 as ground truth, and in the input dtype as "stock".
# ----------------------------------------------------------------------------


def rms_norm_ref(x, weight, *, eps=1e-6, offset=0.0, residual=None, cast=None):
    """HF's LlamaRMSNorm (cast="llama") or GemmaRMSNorm (cast="gemma"), after ``x + residual``."""
    cast = cast or ("gemma" if offset == 1.0 else "llama")
    s = x if residual is None else x + residual
    hidden = s.float() if s.dtype != torch.float64 else s
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "llama":
        out = (weight + offset) * hidden.to(s.dtype)
    else:
        out = (hidden * (offset + weight.to(hidden.dtype))).to(s.dtype)
    return out if residual is None else (out, s)


def layer_norm_ref(x, weight, bias, *, eps=1e-5, residual=None):
    s = x if residual is None else x + residual
    out = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, s)


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
               HAS_RESIDUAL: tl.constexpr):
    # A (BLOCK_ROWS, BLOCK_H) tile of x (+ residual, rounded to x's dtype as the unfused add rounds it), in x's
    # dtype; rows (BLOCK_ROWS, 1), cols (1, BLOCK_H).
    x = tl.load(x_ptr + rows * stride_xr + cols * stride_xc, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows * stride_rr + cols * stride_rc, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _row_block(block, N, BLOCK_ROWS: tl.constexpr):
    # The rows of block number ``block`` as a (BLOCK_ROWS, 1) int64 column, and which of them exist.
    rows = tl.cast(block, tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return rows[:, None], rows < N


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, rstd_ptr,
    N, H,
    stride_xr, stride_xc, stride_rr, stride_rc, stride_w, stride_or, stride_sr,
    eps, offset,
    HAS_RESIDUAL: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # BLOCK_ROWS rows: s = x (+ residual), rstd = 1 / sqrt(mean(s^2) + eps), out = s * rstd * (offset + weight).
    rows, row_mask = _row_block(tl.program_id(0), N, BLOCK_ROWS)
    squares = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (cols < H)
        s = _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
                       HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_ptr + rows * stride_sr + cols, s, mask=mask)
        s = s.to(tl.float32)
        squares += s * s
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1, keep_dims=True) / H + eps)  # (BLOCK_ROWS, 1)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask[:, None])
    # The second pass reads x (and the residual) again rather than the sum just
    # stored: no program reads memory it wrote.
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (cols < H)
        s = _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
                       HAS_RESIDUAL)
        w = tl.load(weight_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32) + offset
        normed = s.to(tl.float32) * rstd
        if CAST_BEFORE_WEIGHT:
            normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + rows * stride_or + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dout_ptr, s_ptr, weight_ptr, rstd_ptr, dsum_ptr, dx_ptr, dweight_ptr,  # dweight: (PROGRAMS, H) fp32 partials
    N, H,
    stride_dr, stride_dc, stride_sr, stride_sc, stride_w, stride_gr, stride_gc, stride_xr,
    offset,
    HAS_DSUM: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Row blocks pid, pid + PROGRAMS, ... of BLOCK_ROWS rows: dx = rstd * (g - n * mean(g * n)) with n = s * rstd
    # and g = dout * (offset + weight), plus the gradient of the returned sum; this program's partial of
    # d(weight) = sum dout * n.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dweight_ptr += pid.to(tl.int64) * H
    for block in range(pid, tl.cdiv(N, BLOCK_ROWS), programs):
        rows, row_mask = _row_block(block, N, BLOCK_ROWS)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask[:, None], other=0.0)  # (BLOCK_ROWS, 1)
        dot = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)[None, :]
            mask = row_mask[:, None] & (cols < H)
            dout = tl.load(dout_ptr + rows * stride_dr + cols * stride_dc, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rows * stride_sr + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(weight_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32) + offset
            dot += dout * w * s
        dot = tl.sum(dot, axis=1, keep_dims=True) * rstd / H  # mean(g * n), (BLOCK_ROWS, 1)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)[None, :]
            mask = row_mask[:, None] & (cols < H)
            dout = tl.load(dout_ptr + rows * stride_dr + cols * stride_dc, mask=mask, other=0.0).to(tl.float32)
            normed = tl.load(s_ptr + rows * stride_sr + cols * stride_sc, mask=mask, other=0.0).to(tl.float32) * rstd
            w = tl.load(weight_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32) + offset
            dx = rstd * (dout * w - normed * dot)
            if HAS_DSUM:
                dx += tl.load(dsum_ptr + rows * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows * stride_xr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DWEIGHT:
                if CAST_BEFORE_WEIGHT:
                    normed = normed.to(s_ptr.dtype.element_ty).to(tl.float32)
                # Only this program touches its partial row, so the read-add-write needs no atomics; rows past
                # N read dout = 0 and add nothing.
                partial = tl.load(dweight_ptr + cols, mask=cols < H, other=0.0)  # (1, BLOCK_H)
                tl.store(dweight_ptr + cols, partial + tl.sum(dout * normed, axis=0, keep_dims=True), mask=cols < H)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, sum_ptr, mean_ptr, rstd_ptr,
    N, H,
    stride_xr, stride_xc, stride_rr, stride_rc, stride_w, stride_b, stride_or, stride_sr,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # BLOCK_ROWS rows: s = x (+ residual), out = (s - mean) * rstd * weight + bias, with the variance taken about
    # the mean (a second pass) rather than as E[s^2] - mean^2, which cancels when |mean| >> std.
    rows, row_mask = _row_block(tl.program_id(0), N, BLOCK_ROWS)
    total = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (cols < H)
        s = _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
                       HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_ptr + rows * stride_sr + cols, s, mask=mask)
        total += s.to(tl.float32)
    mean = tl.sum(total, axis=1, keep_dims=True) / H  # (BLOCK_ROWS, 1)
    squares = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (cols < H)
        s = _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
                       HAS_RESIDUAL)
        centred = tl.where(mask, s.to(tl.float32) - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1, keep_dims=True) / H + eps)  # (BLOCK_ROWS, 1)
    tl.store(mean_ptr + rows, mean, mask=row_mask[:, None])
    tl.store(rstd_ptr + rows, rstd, mask=row_mask[:, None])
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)[None, :]
        mask = row_mask[:, None] & (cols < H)
        s = _load_tile(x_ptr, residual_ptr, rows, cols, mask, stride_xr, stride_xc, stride_rr, stride_rc,
                       HAS_RESIDUAL)
        out = (s.to(tl.float32) - mean) * rstd * tl.load(weight_ptr + cols * stride_w, mask=cols < H).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols * stride_b, mask=cols < H).to(tl.float32)
        tl.store(out_ptr + rows * stride_or + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    dout_ptr, s_ptr, weight_ptr, mean_ptr, rstd_ptr, dsum_ptr, dx_ptr,
    dweight_ptr, dbias_ptr,  # (PROGRAMS, H) fp32 partials each
    N, H,
    stride_dr, stride_dc, stride_sr, stride_sc, stride_w, stride_gr, stride_gc, stride_xr,
    HAS_DSUM: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Row blocks pid, pid + PROGRAMS, ... of BLOCK_ROWS rows: dx = rstd * (g - mean(g) - n * mean(g * n)) with
    # n = (s - mean) * rstd and g = dout * weight, plus the gradient of the returned sum; this program's partials
    # of d(weight) = sum dout * n and d(bias) = sum dout.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dweight_ptr += pid.to(tl.int64) * H
    dbias_ptr += pid.to(tl.int64) * H
    for block in range(pid, tl.cdiv(N, BLOCK_ROWS), programs):
        rows, row_mask = _row_block(block, N, BLOCK_ROWS)
        mean = tl.load(mean_ptr + rows, mask=row_mask[:, None], other=0.0)  # (BLOCK_ROWS, 1)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask[:, None], other=0.0)
        g_sum = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
        gn_sum = tl.zeros((BLOCK_ROWS, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)[None, :]
            mask = row_mask[:, None] & (cols < H)
            dout = tl.load(dout_ptr + rows * stride_dr + cols * stride_dc, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rows * stride_sr + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
            g = dout * tl.load(weight_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32)
            g_sum += g
            gn_sum += tl.where(mask, g * (s - mean) * rstd, 0.0)
        g_mean = tl.sum(g_sum, axis=1, keep_dims=True) / H  # (BLOCK_ROWS, 1)
        gn_mean = tl.sum(gn_sum, axis=1, keep_dims=True) / H
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)[None, :]
            mask = row_mask[:, None] & (cols < H)
            dout = tl.load(dout_ptr + rows * stride_dr + cols * stride_dc, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rows * stride_sr + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
            normed = (s - mean) * rstd
            g = dout * tl.load(weight_ptr + cols * stride_w, mask=cols < H, other=0.0).to(tl.float32)
            dx = rstd * (g - g_mean - normed * gn_mean)
            if HAS_DSUM:
                dx += tl.load(dsum_ptr + rows * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows * stride_xr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DWEIGHT:
                # Only this program touches its partial rows, so the read-add-write needs no atomics; rows past
                # N read dout = 0 and add nothing.
                partial = tl.load(dweight_ptr + cols, mask=cols < H, other=0.0)  # (1, BLOCK_H)
                tl.store(dweight_ptr + cols, partial + tl.sum(dout * normed, axis=0, keep_dims=True), mask=cols < H)
                partial = tl.load(dbias_ptr + cols, mask=cols < H, other=0.0)
                tl.store(dbias_ptr + cols, partial + tl.sum(dout, axis=0, keep_dims=True), mask=cols < H)


# ----------------------------------------------------------------------------
# Kernel registry: tuning configs and the compile gate's representative cases
# ----------------------------------------------------------------------------

# The tile (BLOCK_ROWS, BLOCK_H) is the launcher's choice (_blocks): the row
# length up to _MAX_BLOCK_H columns, and rows enough to fill _TILE elements, so
# short rows (BERT-tiny's 32, a test's 64) do not cost one program each: on a
# GPU one tiny program per row leaves most lanes idle, and under the
# interpreter every program pays a fixed overhead per op (a (256, 32)
# LayerNorm took 256 programs, 1.7 s forward). The configs tune the warps for
# the tile: 4 warps suit ~2K-4K elements, 8 and 16 the long rows. configs[0]
# is what the interpreter runs; its warps do not change the interpreter's speed.
_CONFIGS = [triton.Config({}, num_warps=warps) for warps in (4, 8, 16)]
_MAX_BLOCK_H = 4096
_TILE = 4096

# Argument types other than compile_case's defaults: fp32 statistics and partials, fp32 scalars.
_ARG_TYPES = dict(rstd_ptr="*fp32", mean_ptr="*fp32", dweight_ptr="*fp32", dbias_ptr="*fp32",
                  eps="fp32", offset="fp32")

# Column strides are 1 in practice; the compile cases specialize them as the JIT does.
_UNIT_COLUMN_STRIDES = ("stride_xc", "stride_rc", "stride_w", "stride_b", "stride_dc", "stride_sc", "stride_gc")


def _register(name, kernel, flags, reset_to_zero=()):
    """One spec per kernel; compile cases with every flag on, in bf16 and in fp32 (the most registers: 4-byte
    elements in the same layout), at the two tile shapes: one row of the largest block, and 64 rows of 64."""
    arguments = _kernel_arguments(kernel)
    unit = {stride: 1 for stride in _UNIT_COLUMN_STRIDES if stride in arguments}
    return register(KernelSpec(
        name=name,
        kernel=kernel,
        configs=_CONFIGS,
        key=["H", "BLOCK_ROWS", "BLOCK_H"],
        reset_to_zero=reset_to_zero,
        compile_cases=[
            compile_case(kernel, f"{TRITON_DTYPE[dtype]},rows{block_rows}xblock{block_h}", dtype=dtype,
                         types=_ARG_TYPES, tensor_cores=False,
                         constexprs=dict(unit, BLOCK_ROWS=block_rows, BLOCK_H=block_h,
                                         **{flag: True for flag in flags}))
            for dtype in (torch.bfloat16, torch.float32)
            for block_rows, block_h in ((1, _MAX_BLOCK_H), (_TILE // 64, 64))
        ],
    ))


def _kernel_arguments(kernel):
    return kernel.fn.__code__.co_varnames[:kernel.fn.__code__.co_argcount]


_RMS_FWD = _register("rms_norm_fwd", _rms_norm_fwd_kernel, ("HAS_RESIDUAL", "CAST_BEFORE_WEIGHT"))
# The backward kernels add into their partial sums: the autotuner zeroes them around its trial runs.
_RMS_BWD = _register("rms_norm_bwd", _rms_norm_bwd_kernel, ("HAS_DSUM", "CAST_BEFORE_WEIGHT", "COMPUTE_DWEIGHT"),
                     reset_to_zero=["dweight_ptr"])
_LN_FWD = _register("layer_norm_fwd", _layer_norm_fwd_kernel, ("HAS_RESIDUAL", "HAS_BIAS"))
_LN_BWD = _register("layer_norm_bwd", _layer_norm_bwd_kernel, ("HAS_DSUM", "COMPUTE_DWEIGHT"),
                    reset_to_zero=["dweight_ptr", "dbias_ptr"])


# ----------------------------------------------------------------------------
# Launchers (Triton) and the PyTorch implementation of the same algorithm
# ----------------------------------------------------------------------------


def _blocks(rows: int, hidden: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_H): a row in chunks of up to _MAX_BLOCK_H columns, and as many rows per program as
    fill a tile of _TILE elements (never more than the rows there are, to a power of 2)."""
    block_h = min(triton.next_power_of_2(hidden), _MAX_BLOCK_H)
    block_rows = max(1, min(_TILE // block_h, triton.next_power_of_2(max(rows, 1))))
    return block_rows, block_h


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; each adds one (H,) fp32 partial row.
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few, so the partial sums and the strided rows are exercised


def _stride(tensor, dim):
    # An absent tensor is never read; 1 keeps the specialization a contiguous one gets.
    return 1 if tensor is None else tensor.stride(dim)


def _triton_rms_fwd(x, residual, weight, eps, offset, cast_before_weight, out_dtype):
    # x, residual (N, H) -> out (N, H), sum (N, H) or None, rstd (N,) fp32
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), device=x.device, dtype=out_dtype)
    total = torch.empty((rows, hidden), device=x.device, dtype=x.dtype) if residual is not None else None
    rstd = torch.empty((rows,), device=x.device, dtype=torch.float32)
    block_rows, block_h = _blocks(rows, hidden)
    launch(_RMS_FWD, lambda meta: (triton.cdiv(rows, block_rows),),
           x, x if residual is None else residual, weight, out, out if total is None else total, rstd,
           rows, hidden, x.stride(0), x.stride(1), _stride(residual, 0), _stride(residual, 1), weight.stride(0),
           out.stride(0), hidden if total is None else total.stride(0), eps, offset,
           HAS_RESIDUAL=residual is not None, CAST_BEFORE_WEIGHT=cast_before_weight,
           BLOCK_ROWS=block_rows, BLOCK_H=block_h)
    return out, total, rstd


def _triton_rms_bwd(dout, s, weight, rstd, dsum, offset, cast_before_weight, compute_dweight):
    rows, hidden = s.shape
    block_rows, block_h = _blocks(rows, hidden)
    programs = min(triton.cdiv(rows, block_rows), _backward_programs(s.device))
    dx = torch.empty((rows, hidden), device=s.device, dtype=s.dtype)
    partials = torch.zeros((programs if compute_dweight else 1, hidden), device=s.device, dtype=torch.float32)
    launch(_RMS_BWD, lambda meta: (programs,),
           dout, s, weight, rstd, dx if dsum is None else dsum, dx, partials,
           rows, hidden, dout.stride(0), dout.stride(1), s.stride(0), s.stride(1), weight.stride(0),
           _stride(dsum, 0), _stride(dsum, 1), dx.stride(0), offset,
           HAS_DSUM=dsum is not None, CAST_BEFORE_WEIGHT=cast_before_weight, COMPUTE_DWEIGHT=compute_dweight,
           BLOCK_ROWS=block_rows, BLOCK_H=block_h)
    return dx, partials.sum(0) if compute_dweight else None


def _triton_ln_fwd(x, residual, weight, bias, eps, out_dtype):
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), device=x.device, dtype=out_dtype)
    total = torch.empty((rows, hidden), device=x.device, dtype=x.dtype) if residual is not None else None
    stats = torch.empty((2, rows), device=x.device, dtype=torch.float32)
    block_rows, block_h = _blocks(rows, hidden)
    launch(_LN_FWD, lambda meta: (triton.cdiv(rows, block_rows),),
           x, x if residual is None else residual, weight, weight if bias is None else bias, out,
           out if total is None else total, stats[0], stats[1],
           rows, hidden, x.stride(0), x.stride(1), _stride(residual, 0), _stride(residual, 1), weight.stride(0),
           _stride(bias, 0), out.stride(0), hidden if total is None else total.stride(0), eps,
           HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_H=block_h)
    return out, total, stats[0], stats[1]


def _triton_ln_bwd(dout, s, weight, mean, rstd, dsum, compute_dweight):
    rows, hidden = s.shape
    block_rows, block_h = _blocks(rows, hidden)
    programs = min(triton.cdiv(rows, block_rows), _backward_programs(s.device))
    dx = torch.empty((rows, hidden), device=s.device, dtype=s.dtype)
    partials = torch.zeros((2, programs if compute_dweight else 1, hidden), device=s.device, dtype=torch.float32)
    launch(_LN_BWD, lambda meta: (programs,),
           dout, s, weight, mean, rstd, dx if dsum is None else dsum, dx, partials[0], partials[1],
           rows, hidden, dout.stride(0), dout.stride(1), s.stride(0), s.stride(1), weight.stride(0),
           _stride(dsum, 0), _stride(dsum, 1), dx.stride(0),
           HAS_DSUM=dsum is not None, COMPUTE_DWEIGHT=compute_dweight, BLOCK_ROWS=block_rows, BLOCK_H=block_h)
    if not compute_dweight:
        return dx, None, None
    sums = partials.sum(1)
    return dx, sums[0], sums[1]


# The PyTorch path works in chunks of rows, so its fp32 temporaries stay
# bounded (16 MiB) whatever the batch, as the kernels' registers do.
_TORCH_CHUNK_ELEMENTS = 1 << 22


def _torch_chunks(rows: int, cols: int):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _torch_sum(x, residual, rows):
    # x (+ residual) for some rows, rounded to x's dtype as the unfused add rounds it.
    return x[rows] if residual is None else (x[rows].float() + residual[rows].float()).to(x.dtype)


def _torch_rms_fwd(x, residual, weight, eps, offset, cast_before_weight, out_dtype):
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), device=x.device, dtype=out_dtype)
    total = torch.empty((rows, hidden), device=x.device, dtype=x.dtype) if residual is not None else None
    rstd = torch.empty((rows,), device=x.device, dtype=torch.float32)
    w = weight.float() + offset
    for chunk in _torch_chunks(rows, hidden):
        s = _torch_sum(x, residual, chunk)
        if total is not None:
            total[chunk] = s
        s = s.float()
        rstd[chunk] = torch.rsqrt(s.pow(2).mean(-1) + eps)
        normed = s * rstd[chunk, None]
        if cast_before_weight:
            normed = normed.to(x.dtype).float()
        out[chunk] = normed * w
    return out, total, rstd


def _torch_rms_bwd(dout, s, weight, rstd, dsum, offset, cast_before_weight, compute_dweight):
    rows, hidden = s.shape
    dx = torch.empty((rows, hidden), device=s.device, dtype=s.dtype)
    dweight = torch.zeros((hidden,), device=s.device, dtype=torch.float32) if compute_dweight else None
    w = weight.float() + offset
    for chunk in _torch_chunks(rows, hidden):
        d = dout[chunk].float()
        r = rstd[chunk, None]
        normed = s[chunk].float() * r
        g = d * w
        grad = r * (g - normed * (g * normed).mean(-1, keepdim=True))
        dx[chunk] = grad if dsum is None else grad + dsum[chunk].float()
        if compute_dweight:
            if cast_before_weight:
                normed = normed.to(s.dtype).float()
            dweight += (d * normed).sum(0)
    return dx, dweight


def _torch_ln_fwd(x, residual, weight, bias, eps, out_dtype):
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), device=x.device, dtype=out_dtype)
    total = torch.empty((rows, hidden), device=x.device, dtype=x.dtype) if residual is not None else None
    mean = torch.empty((rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    for chunk in _torch_chunks(rows, hidden):
        s = _torch_sum(x, residual, chunk)
        if total is not None:
            total[chunk] = s
        s = s.float()
        mean[chunk] = s.mean(-1)
        centred = s - mean[chunk, None]
        rstd[chunk] = torch.rsqrt(centred.pow(2).mean(-1) + eps)
        normed = centred * rstd[chunk, None] * weight.float()
        out[chunk] = normed if bias is None else normed + bias.float()
    return out, total, mean, rstd


def _torch_ln_bwd(dout, s, weight, mean, rstd, dsum, compute_dweight):
    rows, hidden = s.shape
    dx = torch.empty((rows, hidden), device=s.device, dtype=s.dtype)
    fp32 = dict(device=s.device, dtype=torch.float32)
    dweight, dbias = (torch.zeros((hidden,), **fp32), torch.zeros((hidden,), **fp32)) if compute_dweight \
        else (None, None)
    for chunk in _torch_chunks(rows, hidden):
        d = dout[chunk].float()
        r = rstd[chunk, None]
        normed = (s[chunk].float() - mean[chunk, None]) * r
        g = d * weight.float()
        grad = r * (g - g.mean(-1, keepdim=True) - normed * (g * normed).mean(-1, keepdim=True))
        dx[chunk] = grad if dsum is None else grad + dsum[chunk].float()
        if compute_dweight:
            dweight += (d * normed).sum(0)
            dbias += d.sum(0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------
# Autograd. With a residual the Function has two outputs, the normalized rows
# and the sum; the sum's gradient (from the layers that read the residual
# stream) joins the normalization's in the backward kernel.
# ----------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, residual, eps: float, offset: float, cast_before_weight: bool, out_dtype):
        # x, residual (N, H), weight (H,) -> out (N, H) [, sum (N, H)]
        run_triton = use_triton(x) and x.shape[0] > 0  # a grid of 0 programs is not launched
        out, total, rstd = (_triton_rms_fwd if run_triton else _torch_rms_fwd)(
            x, residual, weight, eps, offset, cast_before_weight, out_dtype)
        ctx.save_for_backward(x if total is None else total, weight, rstd)
        ctx.offset, ctx.cast_before_weight, ctx.run_triton = offset, cast_before_weight, run_triton
        ctx.has_residual = residual is not None
        if total is None:
            return out
        return out, total

    @staticmethod
    @autocast_off
    def backward(ctx, dout, dsum=None):
        s, weight, rstd = ctx.saved_tensors
        compute_dweight = ctx.needs_input_grad[1]
        dx, dweight = (_triton_rms_bwd if ctx.run_triton else _torch_rms_bwd)(
            dout, s, weight, rstd, dsum, ctx.offset, ctx.cast_before_weight, compute_dweight)
        dweight = dweight.to(weight.dtype) if dweight is not None else None
        return dx, dweight, dx if ctx.has_residual else None, None, None, None, None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, weight, bias, residual, eps: float, out_dtype):
        # x, residual (N, H), weight, bias (H,) -> out (N, H) [, sum (N, H)]
        run_triton = use_triton(x) and x.shape[0] > 0
        out, total, mean, rstd = (_triton_ln_fwd if run_triton else _torch_ln_fwd)(
            x, residual, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x if total is None else total, weight, mean, rstd)
        ctx.run_triton, ctx.has_residual, ctx.has_bias = run_triton, residual is not None, bias is not None
        if total is None:
            return out
        return out, total

    @staticmethod
    @autocast_off
    def backward(ctx, dout, dsum=None):
        s, weight, mean, rstd = ctx.saved_tensors
        compute_dweight = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dx, dweight, dbias = (_triton_ln_bwd if ctx.run_triton else _torch_ln_bwd)(
            dout, s, weight, mean, rstd, dsum, compute_dweight)
        dweight = dweight.to(weight.dtype) if dweight is not None and ctx.needs_input_grad[1] else None
        dbias = dbias.to(weight.dtype) if dbias is not None and ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, dx if ctx.has_residual else None, None, None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check_norm_inputs(x, weight, bias, residual):
    """(x, residual) as (N, H) views where the layout allows; raises naming the bad argument."""
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., H) with H >= 1, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        check_tensor(name, tensor, device=x.device)
        if tuple(tensor.shape) != (hidden,):
            raise ValueError(f"{name} must be ({hidden},), x's last dimension, got shape {tuple(tensor.shape)}")
    if residual is not None:
        check_tensor("residual", residual, (x.dtype,), shape=tuple(x.shape), device=x.device)
    x2 = x.reshape(-1, hidden)  # (N, H), a copy only for layouts no row stride describes
    return x2, None if residual is None else residual.reshape(-1, hidden)


def _shaped(result, shape):
    if isinstance(result, tuple):
        return tuple(t.view(shape) for t in result)
    return result.view(shape)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    offset: float = 0.0,
    residual: torch.Tensor | None = None,
    cast: Cast | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, fp32 statistics, optionally after a fused residual add.

    ``out = s / sqrt(mean(s^2) + eps) * (offset + weight)`` with ``s = x`` or ``s = x + residual``.

    Args:
        x: (..., H) float32/float16/bfloat16, any strides.
        weight: (H,), any float dtype, on x's device.
        eps: a finite number >= 0 added to the mean square.
        offset: added to the weight: 0.0 (Llama, Mistral, Qwen, Phi-3) or 1.0
            (Gemma's ``1 + weight``, with its weights stored around 0).
        residual: None, or a tensor of x's shape and dtype: then ``s = x + residual``
            (rounded to x's dtype, as the unfused add) is normalized and also returned.
        cast: where the result is rounded. "llama": the normalized value is
            rounded to x's dtype, then multiplied by the weight; the output has
            the promoted dtype of x and weight (LlamaRMSNorm). "gemma": the
            product is taken in fp32 and rounded to x's dtype (GemmaRMSNorm).
            None: "gemma" when offset is 1.0, else "llama".

    Returns:
        out (..., H), or ``(out, s)`` with a residual.

    Saves for backward x (or s) itself and one fp32 rstd per row; gradients flow
    to x, weight and residual. Autocast casts nothing, as it casts none of the
    ops RMSNorm modules are made of.
    """
    x2, residual2 = _check_norm_inputs(x, weight, None, residual)
    eps = check_number("eps", eps, at_least=0.0)
    offset = check_number("offset", offset)
    if cast is None:
        cast = "gemma" if offset == 1.0 else "llama"
    if cast not in ("llama", "gemma"):
        raise ValueError(f"cast must be 'llama', 'gemma' or None, got {cast!r}")
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if cast == "llama" else x.dtype
    result = RMSNormFunction.apply(x2, weight, residual2, eps, offset, cast == "llama", out_dtype)
    return _shaped(result, x.shape)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension (BERT, RoBERTa), fp32 statistics, optionally after a fused residual add.

    ``out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias`` with ``s = x`` or ``s = x + residual``,
    as ``torch.nn.functional.layer_norm(s, (H,), weight, bias, eps)``.

    Args:
        x: (..., H) float32/float16/bfloat16, any strides.
        weight: (H,), any float dtype; bias: (H,) or None.
        eps: a finite number >= 0.
        residual: None, or a tensor of x's shape and dtype: then ``s = x + residual``
            is normalized and also returned (BERT's post-norm ``LayerNorm(hidden + input)``).

    Returns:
        out (..., H) in x's dtype (fp32 under CUDA autocast, as autocast runs
        layer_norm in fp32 there; the fp32 copy of x is never made), or ``(out, s)``.

    Saves for backward x (or s) itself and fp32 mean and rstd per row.
    """
    x2, residual2 = _check_norm_inputs(x, weight, bias, residual)
    eps = check_number("eps", eps, at_least=0.0)
    # CUDA autocast runs layer_norm in fp32 (its fp32 list); the CPU's keeps the input dtype.
    fp32_under_autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    out_dtype = torch.float32 if fp32_under_autocast else x.dtype
    result = LayerNormFunction.apply(x2, weight, bias, residual2, eps, out_dtype)
    return _shaped(result, x.shape)
