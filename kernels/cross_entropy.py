"""Fused linear cross-entropy, and cross-entropy over logits that already exist.

What is fused. The LM-head loss ``cross_entropy(hidden @ weight.T + bias, target)``
normally materializes the (N, V) logits, their softmax and their gradient: for
8192 tokens and a 128256-word vocabulary that is 4 GiB per copy in fp32. Here
the logits only ever exist one (BLOCK_N, BLOCK_V) tile at a time, in registers:

- forward: each program walks a slice of the vocabulary for a block of rows,
  computing logit tiles with tensor-core dots over H and folding them into an
  online log-sum-exp, the target logit and the sum of logits (for label
  smoothing). The vocabulary is split across programs so that small N still
  fills the GPU; the per-split partials, (SPLITS, N), are combined in PyTorch.
  Only the per-row log-sum-exp is saved for the backward.
- backward: one program per (row block, vocab block) tile recomputes the logit
  tile, forms d(loss)/d(logits) in registers and adds its contributions to
  d(hidden) = dlogits @ weight and d(weight) = dlogits.T @ hidden with fp32
  atomics, streaming H in chunks. The atomics are relaxed (a fire-and-forget
  RED, no fence): nothing reads the accumulators before the kernel ends, so
  acquire-release ordering (ATOMG plus a MEMBAR per add) bought nothing. Row blocks whose rows are all ignored (prompt
  tokens in supervised fine-tuning) are skipped.

Extra memory is O(N) for the forward and O(N*H) fp32 for d(hidden), plus an
fp32 (V, H) accumulator for d(weight) when the weight is 16-bit and trainable
(accumulating a sum over thousands of row blocks in bf16 would lose it).

Cost and where it stops being fast: the backward recomputes the logits, so the
whole thing is four (N, V, H) matmuls' worth of FLOPs against three for the
unfused path; the atomics' traffic, (N*V/BLOCK_V + V*N/BLOCK_N)*H*4 bytes, is
what limits it when H is large against BLOCK_V. fp32 inputs use exact fp32 dots
(no TF32, as PyTorch's default), which run on CUDA cores and are slow: train
the LM head in bf16.

That is the "atomic" strategy. The "chunked" strategy (Liger-Kernel's fused
linear cross-entropy, with our kernels for the middle step) spends three: when
the loss is a scalar, the forward already knows d(loss)/d(loss row), so for
each chunk of rows (at most ``CHUNK_BYTES`` of logits, and a quarter of the
rows: never the whole (N, V)) it forms the logits with
one matmul into a 16-bit scratch, turns them into losses and d(logits) in place
(the kernels of ``cross_entropy`` over existing logits), and finishes
d(hidden) = dlogits @ weight and d(weight) += dlogits.T @ hidden with matmuls
(cuBLAS on a GPU). No atomics, so it is bitwise repeatable; the backward only
scales the stored gradients by the incoming one (exact for the usual 1). Its
extra memory is the scratch plus the gradients, formed in the forward and held
until the backward. ``linear_cross_entropy``'s docstring gives the rule that
chooses between the two.

Semantics follow ``torch.nn.functional.cross_entropy``: ``ignore_index``,
``label_smoothing``, and ``reduction`` ("mean" divides by the number of
non-ignored targets), with three additions: ``normalizer`` (divide a "mean" by
a given count, e.g. the target tokens of a whole accumulated batch), ``z_loss``
(PaLM's ``z_loss * logsumexp**2`` per token) and ``softcap`` (Gemma 2's
``softcap * tanh(logits / softcap)`` before the softmax). All targets ignored
gives a loss of 0 and zero gradients, never NaN. The loss is always fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Literal

import torch
import triton
import triton.language as tl

from .autocast import autocast_dtype, autocast_off, cast_for_autocast
from .backend import use_triton
from .checks import check_int, check_number, check_tensor, check_values
from .launch import TRITON_DTYPE, KernelSpec, compile_case, launch, register
from .tiling import grouped_tile

Reduction = Literal["mean", "sum", "none"]


@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


# ----------------------------------------------------------------------------
# Reference: plain PyTorch, every intermediate materialized. The tests run it
# in float64 as ground truth, and in the input dtype as "stock PyTorch".
# ----------------------------------------------------------------------------


def cross_entropy_ref(logits, target, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                      reduction="mean", normalizer=None):
    """Reference for ``cross_entropy``, with its options: logits (N, V), target (N,)."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, safe_target[:, None])[:, 0]
    loss = (
        lse
        - (1.0 - label_smoothing) * target_logit
        - (label_smoothing / logits.shape[-1]) * logits.sum(-1)
        + z_loss * lse**2
    )
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, valid, reduction, normalizer)


def linear_cross_entropy_ref(hidden, weight, target, *, bias=None, **options):
    """Reference for ``linear_cross_entropy``: materializes the (N, V) logits."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T  # (N, V)
    if bias is not None:
        logits = logits + bias
    return cross_entropy_ref(logits, target.reshape(-1), **options)


def _reduce(loss_rows, valid, reduction, normalizer):
    # loss_rows: (N,) fp32, zero where the target is ignored.
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        # clamp: with every target ignored the sum is 0 and so is the loss.
        normalizer = valid.sum().clamp_min(1)
    return total / normalizer


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _softcap(logits, softcap):
    # tanh through the sigmoid: tl has no tanh that also runs in the interpreter.
    return softcap * (2.0 * tl.sigmoid(2.0 * logits / softcap) - 1.0)


@triton.jit
def _load_h_slice(ptr, rows, row_mask, stride_row, hs, h_mask, stride_h):
    # Columns hs of some rows of an (N, H) or (V, H) matrix, as a (rows, BLOCK_H) tile, 0 outside.
    return tl.load(ptr + rows[:, None] * stride_row + hs[None, :] * stride_h,
                   mask=row_mask[:, None] & h_mask[None, :], other=0.0)


@triton.jit
def _linear_logits_tile(
    hidden_ptr, weight_ptr, bias_ptr,  # at the tile's first row / first column
    row_mask, col_mask,
    H,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_b,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # The (BLOCK_N, BLOCK_V) tile hidden @ weight.T (+ bias, softcap), fp32.
    # Offsets inside a tile are int32 (the callers move the base pointers in
    # int64): per-element 64-bit addresses would take registers and spill.
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        x = _load_h_slice(hidden_ptr, rows, row_mask, stride_hn, hs, h_mask, stride_hh)  # (BLOCK_N, BLOCK_H)
        w = tl.load(
            weight_ptr + cols[None, :] * stride_wv + hs[:, None] * stride_wh,
            mask=col_mask[None, :] & h_mask[:, None], other=0.0,
        )  # (BLOCK_H, BLOCK_V)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    return acc


@triton.jit
def _split_columns(split, cols_per_split, V, BLOCK_N: tl.constexpr):
    # [start, end) of one vocabulary split, and the statistics of its rows before
    # any column: (running max, sum of exp, target logit, sum of logits), fp32.
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    stats = (
        tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32),
        tl.zeros((BLOCK_N,), dtype=tl.float32),
        tl.zeros((BLOCK_N,), dtype=tl.float32),
        tl.zeros((BLOCK_N,), dtype=tl.float32),
    )
    return v_start, v_end, stats


@triton.jit
def _fold_logits(logits, cols, col_mask, target, stats):
    # Fold one logit tile into the statistics (running max, sum of exp, target logit, sum of logits).
    # Columns outside the slice hold exactly 0 (every load feeding them is masked
    # to 0, and softcap(0) = 0), so they add nothing to the target logit or the
    # sum without a mask of their own; only the softmax must not see them. Fewer
    # tile-sized temporaries is what keeps this free of register spills.
    row_max, row_sumexp, target_logit, logit_sum = stats
    target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
    logit_sum += tl.sum(logits, axis=1)
    logits = tl.where(col_mask[None, :], logits, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(logits, axis=1))
    row_sumexp = row_sumexp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
    return new_max, row_sumexp, target_logit, logit_sum


@triton.jit
def _store_partials(row_max_ptr, row_sumexp_ptr, target_logit_ptr, logit_sum_ptr, offsets, mask, stats):
    row_max, row_sumexp, target_logit, logit_sum = stats
    tl.store(row_max_ptr + offsets, row_max, mask=mask)
    tl.store(row_sumexp_ptr + offsets, row_sumexp, mask=mask)
    tl.store(target_logit_ptr + offsets, target_logit, mask=mask)
    tl.store(logit_sum_ptr + offsets, logit_sum, mask=mask)


@triton.jit
def _dlogits(logits, cols, col_mask, target, lse, dloss, V, softcap, label_smoothing, z_loss,
             HAS_SOFTCAP: tl.constexpr):
    # d(loss_row * dloss_row) / d(raw logits) for one tile, fp32, zero outside the vocabulary.
    # loss = lse - (1 - eps) * s_target - eps / V * sum(s) + z * lse**2, s = softcap(logits)
    probs = tl.exp(logits - lse[:, None])
    grad = probs * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    grad = tl.where(cols[None, :] == target[:, None], grad - (1.0 - label_smoothing), grad)
    grad = grad * dloss[:, None]
    if HAS_SOFTCAP:
        capped = logits / softcap
        grad = grad * (1.0 - capped * capped)
    return tl.where(col_mask[None, :], grad, 0.0)


@triton.jit
def _linear_ce_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr,
    row_max_ptr, row_sumexp_ptr, target_logit_ptr, logit_sum_ptr,  # (SPLITS, N) fp32
    N, V, H, cols_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_b,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Softmax statistics of BLOCK_N rows over one vocabulary split.
    split = tl.program_id(1)
    row_start = tl.program_id(0) * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    hidden_ptr += tl.cast(row_start, tl.int64) * stride_hn
    v_start, v_end, stats = _split_columns(split, cols_per_split, V, BLOCK_N)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logits = _linear_logits_tile(
            hidden_ptr, weight_ptr + tl.cast(v0, tl.int64) * stride_wv, bias_ptr + v0 * stride_b, row_mask, col_mask,
            H, stride_hn, stride_hh, stride_wv, stride_wh, stride_b, softcap,
            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        stats = _fold_logits(logits, cols, col_mask, target, stats)
    _store_partials(row_max_ptr, row_sumexp_ptr, target_logit_ptr, logit_sum_ptr, split * N + rows, row_mask, stats)


@triton.jit
def _linear_ce_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, lse_ptr, dloss_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr,  # fp32 accumulators: (N, H), (V, H), (V,)
    N, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_b,
    softcap, label_smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # The gradient contributions of one (BLOCK_N rows, BLOCK_V columns) logit tile.
    # Tiles are visited GROUP_N row blocks at a time so the weight tiles stay in L2.
    row_block, col_block = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)

    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    dloss = tl.load(dloss_ptr + rows, mask=row_mask, other=0.0)  # zero for ignored rows
    if tl.max(tl.abs(dloss), axis=0) > 0.0:
        cols = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        # Base pointers at the tile's first row and column; int32 offsets inside.
        row_offset = tl.cast(row_block * BLOCK_N, tl.int64)
        col_offset = tl.cast(col_block * BLOCK_V, tl.int64)
        hidden_ptr += row_offset * stride_hn
        weight_ptr += col_offset * stride_wv
        dhidden_ptr += row_offset * H
        dweight_ptr += col_offset * H
        logits = _linear_logits_tile(
            hidden_ptr, weight_ptr, bias_ptr + col_offset * stride_b, row_mask, col_mask, H,
            stride_hn, stride_hh, stride_wv, stride_wh, stride_b, softcap,
            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        dlogits = _dlogits(logits, cols, col_mask, target, lse, dloss, V, softcap, label_smoothing, z_loss,
                           HAS_SOFTCAP)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(dlogits, axis=0), mask=col_mask, sem="relaxed")
        # Tensor cores take the gradient tile in the input dtype, as the unfused
        # backward does; the products accumulate in fp32.
        dlogits = dlogits.to(hidden_ptr.dtype.element_ty)
        tile_rows = tl.arange(0, BLOCK_N)
        tile_cols = tl.arange(0, BLOCK_V)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            w = _load_h_slice(weight_ptr, tile_cols, col_mask, stride_wv, hs, h_mask, stride_wh)  # (BLOCK_V, BLOCK_H)
            dhidden = tl.dot(dlogits, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
            tl.atomic_add(dhidden_ptr + tile_rows[:, None] * H + hs[None, :], dhidden,
                          mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
            if COMPUTE_DWEIGHT:
                x = _load_h_slice(hidden_ptr, tile_rows, row_mask, stride_hn, hs, h_mask,
                                  stride_hh)  # (BLOCK_N, BLOCK_H)
                dweight = tl.dot(tl.trans(dlogits), x, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(dweight_ptr + tile_cols[:, None] * H + hs[None, :], dweight,
                              mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")


@triton.jit
def _ce_fwd_kernel(
    logits_ptr, target_ptr,
    row_max_ptr, row_sumexp_ptr, target_logit_ptr, logit_sum_ptr,  # (SPLITS, N) fp32
    N, V, cols_per_split,
    stride_ln, stride_lv,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Softmax statistics of BLOCK_N rows of existing logits over one vocabulary split.
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    rows = rows.to(tl.int64)
    v_start, v_end, stats = _split_columns(split, cols_per_split, V, BLOCK_N)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logits = tl.load(
            logits_ptr + rows[:, None] * stride_ln + cols[None, :] * stride_lv,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(tl.float32)
        if HAS_SOFTCAP:
            logits = _softcap(logits, softcap)
        stats = _fold_logits(logits, cols, col_mask, target, stats)
    _store_partials(row_max_ptr, row_sumexp_ptr, target_logit_ptr, logit_sum_ptr, split * N + rows, row_mask, stats)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr, target_ptr, lse_ptr, dloss_ptr,
    dlogits_ptr,
    N, V,
    stride_ln, stride_lv, stride_dn, stride_dv,
    softcap, label_smoothing, z_loss,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # d(loss)/d(logits) for one (BLOCK_N, BLOCK_V) tile of existing logits.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    dloss = tl.load(dloss_ptr + rows, mask=row_mask, other=0.0)
    rows = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_ln + cols[None, :] * stride_lv, mask=mask, other=0.0)
    logits = logits.to(tl.float32)
    if HAS_SOFTCAP:
        logits = _softcap(logits, softcap)
    dlogits = _dlogits(logits, cols, col_mask, target, lse, dloss, V, softcap, label_smoothing, z_loss,
                       HAS_SOFTCAP)
    tl.store(dlogits_ptr + rows[:, None] * stride_dn + cols[None, :] * stride_dv,
             dlogits.to(dlogits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Kernel registry: tuning configs and the compile gate's representative cases
# ----------------------------------------------------------------------------


def _matmul_config(block_n, block_v, block_h, warps, stages, **extra):
    return triton.Config(
        dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, **extra), num_warps=warps, num_stages=stages
    )


# Strides along H, and the bias's, are 1 in practice; the compile gate
# specializes them as the JIT does for an argument equal to 1.
_UNIT_STRIDES = dict(stride_hh=1, stride_wh=1, stride_b=1)

# 16-bit inputs take tensor-core dots and large tiles. fp32 inputs take exact
# fp32 dots on CUDA cores ("ieee": no TF32, as PyTorch's default), whose
# operands need twice the shared memory: a spec of their own with smaller tiles.
_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}  # tf32: unused for 16-bit

# Argument types other than compile_case's defaults (pointers to the inputs' dtype, i32 scalars).
_ARG_TYPES = dict(
    target_ptr="*i64",
    row_max_ptr="*fp32", row_sumexp_ptr="*fp32", target_logit_ptr="*fp32", logit_sum_ptr="*fp32",
    lse_ptr="*fp32", dloss_ptr="*fp32", dhidden_ptr="*fp32", dweight_ptr="*fp32", dbias_ptr="*fp32",
    softcap="fp32", label_smoothing="fp32", z_loss="fp32",
)


def _linear_cases(kernel, dtypes, **constexprs):
    # The heaviest specialization, with a bias and a softcap.
    return [
        compile_case(kernel, f"{TRITON_DTYPE[dtype]},bias,softcap", dtype=dtype, types=_ARG_TYPES,
                     constexprs=dict(_UNIT_STRIDES, HAS_BIAS=True, HAS_SOFTCAP=True,
                                     DOT_PRECISION=_DOT_PRECISION[dtype], **constexprs),
                     tensor_cores=dtype != torch.float32)
        for dtype in dtypes
    ]


def _register_linear(name, kernel, configs_16bit, configs_fp32, key, reset_to_zero=(), constexprs=None,
                     hopper_only_16bit=()):
    """Register a linear-CE kernel twice: {False: 16-bit spec, True: fp32 spec}.

    The 16-bit spec's Hopper config (the one CI's gate subset compiles for sm_90) is the last of
    ``configs_16bit``, 128x128: one 64x128 wgmma per warpgroup, on every architecture. The tiles of
    ``hopper_only_16bit`` follow it, for sm_90 only (``KernelSpec.hopper_only``): they spill as
    sm_80's mma. The fp32 spec takes exact fp32 dots, no tensor cores."""
    variants = ((False, [*configs_16bit, *hopper_only_16bit], (torch.bfloat16, torch.float16)),
                (True, configs_fp32, (torch.float32,)))
    return {
        is_fp32: register(KernelSpec(
            name=name + ("_fp32" if is_fp32 else ""),
            kernel=kernel,
            configs=configs,
            key=key,
            compile_cases=_linear_cases(kernel, dtypes, **(constexprs or {})),
            reset_to_zero=reset_to_zero,
            hopper_config=None if is_fp32 else len(configs_16bit) - 1,
            hopper_only=() if is_fp32 else tuple(range(len(configs_16bit), len(configs))),
        ))
        for is_fp32, configs, dtypes in variants
    }


# Every config passes the compile gate (no spills) on sm_80 and sm_90, except the
# hopper_only ones, which pass it on sm_90; configs[0] is the one the interpreter
# runs. 128x128x32 on 8 warps is the largest 16-bit tile that passes on both (one
# 64x128 wgmma per warpgroup on sm_90, 1.0 work per tile). Larger tiles spill on
# sm_80 as launched, where ptxas has 255 registers: the online softmax's and the
# gradient's tile-sized temporaries come on top of the accumulator (128x128x64:
# forward 8 bytes, backward 160; 256x128x32, Cut Cross-Entropy's: forward 544
# bytes and also 376 on sm_90). BLOCK_H 64 with 4 warps spills as well. On sm_90
# the forward's 128x128x64 fits (about 220 registers, 96 KB of shared memory at
# 3 stages, 24 cp.async): a hopper_only tile, twice the K step of 128x128x32.
_FP32_FWD_TILES = [(32, 64, 16, 4, 2), (16, 64, 32, 4, 2)]  # BLOCK_N, _V, _H, warps, stages
_FP32_BWD_TILES = [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)]

_LINEAR_CE_FWD = _register_linear(
    "linear_cross_entropy_fwd", _linear_ce_fwd_kernel,
    configs_16bit=[
        _matmul_config(64, 128, 32, warps=8, stages=3),
        _matmul_config(128, 64, 32, warps=8, stages=3),
        _matmul_config(128, 128, 32, warps=8, stages=2),
    ],
    configs_fp32=[_matmul_config(n, v, h, warps=w, stages=s) for n, v, h, w, s in _FP32_FWD_TILES],
    key=["V", "H", "HAS_BIAS", "HAS_SOFTCAP"],
    hopper_only_16bit=[_matmul_config(128, 128, 64, warps=8, stages=3)],
)

_LINEAR_CE_BWD = _register_linear(
    "linear_cross_entropy_bwd", _linear_ce_bwd_kernel,
    configs_16bit=[
        _matmul_config(64, 128, 32, warps=8, stages=3, GROUP_N=8),
        _matmul_config(128, 64, 32, warps=8, stages=3, GROUP_N=8),
        _matmul_config(64, 64, 64, warps=8, stages=3, GROUP_N=8),
        _matmul_config(64, 64, 32, warps=8, stages=3, GROUP_N=8),
        _matmul_config(128, 128, 32, warps=8, stages=2, GROUP_N=8),
    ],
    configs_fp32=[_matmul_config(n, v, h, warps=w, stages=s, GROUP_N=8) for n, v, h, w, s in _FP32_BWD_TILES],
    key=["V", "H", "HAS_BIAS", "HAS_SOFTCAP", "COMPUTE_DWEIGHT"],
    reset_to_zero=["dhidden_ptr", "dweight_ptr", "dbias_ptr"],
    constexprs=dict(COMPUTE_DWEIGHT=True),
)


def _register_elementwise(name, kernel, tiles, **unit_strides):
    """Register a kernel over existing logits: tiles are (BLOCK_N, BLOCK_V, warps); strides along V are 1 in
    practice, specialized as the JIT does (see _UNIT_STRIDES)."""
    return register(KernelSpec(
        name=name,
        kernel=kernel,
        configs=[triton.Config(dict(BLOCK_N=n, BLOCK_V=v), num_warps=warps) for n, v, warps in tiles],
        key=["V", "HAS_SOFTCAP"],
        compile_cases=[
            compile_case(kernel, f"{TRITON_DTYPE[dtype]},softcap", dtype=dtype, types=_ARG_TYPES,
                         constexprs=dict(HAS_SOFTCAP=True, **unit_strides), tensor_cores=False)
            for dtype in (torch.bfloat16, torch.float32)
        ],
    ))


_CE_FWD = _register_elementwise("cross_entropy_fwd", _ce_fwd_kernel, [(4, 1024, 4), (16, 512, 8), (1, 4096, 8)],
                                stride_lv=1)
_CE_BWD = _register_elementwise("cross_entropy_bwd", _ce_bwd_kernel, [(4, 1024, 4), (16, 512, 8)],
                                stride_lv=1, stride_dv=1)
# The same kernel writing d(logits) over the logits (the chunked strategy's scratch): one config, so the
# autotuner never benchmarks it, which would run it several times over one buffer and take each run's
# d(logits) for the next run's logits.
_CE_BWD_IN_PLACE = _register_elementwise("cross_entropy_bwd_in_place", _ce_bwd_kernel, [(4, 1024, 4)],
                                         stride_lv=1, stride_dv=1)


# ----------------------------------------------------------------------------
# Launchers (Triton) and the PyTorch implementation of the same algorithm
# ----------------------------------------------------------------------------

# The smallest vocabulary slice one forward program walks; a multiple of every
# BLOCK_V so a split never starts inside a tile.
_MIN_COLS_PER_SPLIT = 256


@functools.lru_cache(maxsize=None)
def _programs_to_fill(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: enough to exercise vocabulary splits, few enough to be quick


def _vocab_splits(n_rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Split the vocabulary so (row blocks x splits) fills the device; (splits, cols_per_split)."""
    row_blocks = triton.cdiv(n_rows, 128)
    max_splits = triton.cdiv(vocab, _MIN_COLS_PER_SPLIT)
    splits = max(1, min(triton.cdiv(_programs_to_fill(device), row_blocks), max_splits))
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), _MIN_COLS_PER_SPLIT) * _MIN_COLS_PER_SPLIT
    return triton.cdiv(vocab, cols_per_split), cols_per_split


def _bias_stride(bias) -> int:
    # Without a bias the kernels never read it; 1 keeps the specialization a contiguous bias gets.
    return 1 if bias is None else bias.stride(0)


def _linear_ce_fwd(hidden, weight, bias, target, opts: _Options):
    # hidden (N, H), weight (V, H) -> partial statistics (4, SPLITS, N) fp32
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    splits, cols_per_split = _vocab_splits(n_rows, vocab, hidden.device)
    partials = torch.empty((4, splits, n_rows), device=hidden.device, dtype=torch.float32)
    launch(
        _LINEAR_CE_FWD[hidden.dtype == torch.float32], lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits),
        hidden, weight, weight if bias is None else bias, target,
        partials[0], partials[1], partials[2], partials[3],
        n_rows, vocab, hidden_size, cols_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), _bias_stride(bias),
        opts.softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        DOT_PRECISION=_DOT_PRECISION[hidden.dtype],
    )
    return partials


def _linear_ce_bwd(hidden, weight, bias, target, lse, dloss, opts: _Options, compute_dweight: bool):
    # -> fp32 accumulators d(hidden) (N, H), d(weight) (V, H) or None, d(bias) (V,) or None
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    fp32 = dict(device=hidden.device, dtype=torch.float32)
    dhidden = torch.zeros((n_rows, hidden_size), **fp32)
    dweight = torch.zeros((vocab, hidden_size), **fp32) if compute_dweight else None
    dbias = torch.zeros((vocab,), **fp32) if bias is not None else None
    launch(
        _LINEAR_CE_BWD[hidden.dtype == torch.float32],
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),),
        hidden, weight, weight if bias is None else bias, target, lse, dloss,
        dhidden, dhidden if dweight is None else dweight, dhidden if dbias is None else dbias,
        n_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), _bias_stride(bias),
        opts.softcap or 1.0, opts.label_smoothing, opts.z_loss,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, COMPUTE_DWEIGHT=compute_dweight,
        DOT_PRECISION=_DOT_PRECISION[hidden.dtype],
    )
    return dhidden, dweight, dbias


def _ce_fwd(logits, target, opts: _Options):
    # logits (N, V) -> partial statistics (4, SPLITS, N) fp32
    n_rows, vocab = logits.shape
    splits, cols_per_split = _vocab_splits(n_rows, vocab, logits.device)
    partials = torch.empty((4, splits, n_rows), device=logits.device, dtype=torch.float32)
    launch(
        _CE_FWD, lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), splits),
        logits, target, partials[0], partials[1], partials[2], partials[3],
        n_rows, vocab, cols_per_split, logits.stride(0), logits.stride(1),
        opts.softcap or 1.0, HAS_SOFTCAP=opts.softcap is not None,
    )
    return partials


def _ce_bwd(logits, target, lse, dloss, opts: _Options, dlogits):
    # -> d(loss)/d(logits) written into dlogits (N, V), which may be the logits themselves: each
    # program reads its tile before it writes it, and no two programs share a tile.
    n_rows, vocab = logits.shape
    launch(
        _CE_BWD_IN_PLACE if dlogits is logits else _CE_BWD,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"])),
        logits, target, lse, dloss, dlogits,
        n_rows, vocab, logits.stride(0), logits.stride(1), dlogits.stride(0), dlogits.stride(1),
        opts.softcap or 1.0, opts.label_smoothing, opts.z_loss, HAS_SOFTCAP=opts.softcap is not None,
    )
    return dlogits


# The PyTorch path walks the same tiles, larger ones since each is a library call.
_TORCH_TILE_ROWS = 1024
_TORCH_TILE_COLS = 8192


def _torch_tiles(n_rows: int, vocab: int):
    for n0 in range(0, n_rows, _TORCH_TILE_ROWS):
        for v0 in range(0, vocab, _TORCH_TILE_COLS):
            yield slice(n0, n0 + _TORCH_TILE_ROWS), slice(v0, v0 + _TORCH_TILE_COLS)


def _torch_linear_logits(hidden, weight, bias, rows, cols, opts: _Options):
    logits = hidden[rows].float() @ weight[cols].float().T  # (tile rows, tile cols)
    if bias is not None:
        logits += bias[cols].float()
    return _torch_softcap(logits, opts)


def _torch_softcap(logits, opts: _Options):
    return logits if opts.softcap is None else opts.softcap * torch.tanh(logits / opts.softcap)


def _torch_fwd(logits_tile, target, n_rows, vocab, device):
    # The forward kernels' algorithm with one vocabulary split -> (4, 1, N) fp32.
    partials = torch.zeros((4, 1, n_rows), device=device, dtype=torch.float32)
    row_max, row_sumexp, target_logit, logit_sum = partials[:, 0]
    row_max.fill_(float("-inf"))
    for rows, cols in _torch_tiles(n_rows, vocab):
        logits = logits_tile(rows, cols)  # (tile rows, tile cols) fp32
        col_ids = torch.arange(cols.start, cols.start + logits.shape[1], device=device)
        new_max = torch.maximum(row_max[rows], logits.amax(dim=1))
        row_sumexp[rows] = row_sumexp[rows] * torch.exp(row_max[rows] - new_max) + torch.exp(
            logits - new_max[:, None]
        ).sum(dim=1)
        row_max[rows] = new_max
        target_logit[rows] += torch.where(col_ids[None, :] == target[rows, None], logits, 0.0).sum(dim=1)
        logit_sum[rows] += logits.sum(dim=1)
    return partials


def _torch_dlogits(logits, rows, cols, target, lse, dloss, vocab, opts: _Options):
    # Mirror of the Triton _dlogits for one tile (softcap applied in `logits`).
    grad = torch.exp(logits - lse[rows, None]) * (1.0 + 2.0 * opts.z_loss * lse[rows])[:, None]
    grad -= opts.label_smoothing / vocab
    col_ids = torch.arange(cols.start, cols.start + logits.shape[1], device=logits.device)
    grad -= (1.0 - opts.label_smoothing) * (col_ids[None, :] == target[rows, None])  # one-hot of the target
    grad *= dloss[rows, None]
    if opts.softcap is not None:
        grad *= 1.0 - (logits / opts.softcap) ** 2
    return grad


def _finish_rows(partials, target, vocab, opts: _Options):
    """Combine per-split statistics into per-row losses and log-sum-exp, (N,) fp32 each."""
    row_max, row_sumexp, target_logit, logit_sum = partials  # (SPLITS, N) each
    top = row_max.amax(dim=0)
    lse = top + torch.log((row_sumexp * torch.exp(row_max - top)).sum(dim=0))
    loss = (
        lse
        - (1.0 - opts.label_smoothing) * target_logit.sum(dim=0)
        - (opts.label_smoothing / vocab) * logit_sum.sum(dim=0)
        + opts.z_loss * lse**2
    )
    return torch.where(target != opts.ignore_index, loss, 0.0), lse


def _logits_loss(logits, target, opts: _Options, triton_path: bool):
    """Per-row losses and log-sum-exp of existing logits (N, V): (N,) fp32 each."""
    if triton_path:
        partials = _ce_fwd(logits, target, opts)
    else:
        partials = _torch_fwd(lambda rows, cols: _torch_softcap(logits[rows, cols].float(), opts),
                              target, logits.shape[0], logits.shape[1], logits.device)
    return _finish_rows(partials, target, logits.shape[1], opts)


def _logits_grad(logits, target, lse, dloss, opts: _Options, triton_path: bool, dlogits):
    """d(sum(loss_rows * dloss))/d(logits) into dlogits (N, V), in its dtype; dlogits may be logits."""
    if triton_path:
        return _ce_bwd(logits, target, lse, dloss, opts, dlogits)
    for rows, cols in _torch_tiles(*logits.shape):
        tile = _torch_softcap(logits[rows, cols].float(), opts)
        dlogits[rows, cols] = _torch_dlogits(tile, rows, cols, target, lse, dloss, logits.shape[1], opts)
    return dlogits


# ----------------------------------------------------------------------------
# The chunked strategy: d(logits) formed in the forward, one bounded row chunk
# at a time, finished with library matmuls.
# ----------------------------------------------------------------------------

# The chunked strategy's scratch, the logits of one row chunk in the input dtype,
# takes at most this many bytes: 1024 rows at V 128256 in bf16, whose matmuls
# (1024 x 4096 x 128256 at H 4096) are large enough to run cuBLAS at full speed.
# Larger chunks cost memory; smaller ones cost time, as each chunk reads and
# writes the fp32 d(weight) accumulator once (V * H * 8 bytes, 4.2 GB at
# V 128256, H 4096, against ~1.1 TFLOP of matmuls per 1024-row chunk).
CHUNK_BYTES = 256 * 2**20

# The scratch is never the whole (N, V): at most a 1/_MIN_CHUNKS of it (whole
# rows, so a batch of fewer rows than that takes one row a chunk).
_MIN_CHUNKS = 4

# Fewer rows of logits in the budget than this would run the matmuls as thin,
# slow GEMMs: the automatic choice takes the atomic strategy instead (a
# vocabulary above a million words in bf16 at the default budget).
_MIN_CHUNK_ROWS = 128


def _budget_rows(vocab: int, itemsize: int) -> int:
    """Rows of logits that fit in CHUNK_BYTES, at least 1."""
    return max(1, CHUNK_BYTES // (vocab * itemsize))


def _chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk: within CHUNK_BYTES and a 1/_MIN_CHUNKS of the rows, a multiple of 128 when >= 128."""
    rows = min(_budget_rows(vocab, itemsize), triton.cdiv(n_rows, _MIN_CHUNKS))
    if rows >= _MIN_CHUNK_ROWS:
        rows -= rows % _MIN_CHUNK_ROWS
    return rows


def _linear_ce_chunked(hidden, weight, bias, target, dloss, opts: _Options, needs_grad):
    """Losses and gradients at once, one row chunk at a time; no (N, V) tensor, no atomics.

    hidden (N, H), weight (V, H), bias (V,) or None, target (N,), dloss (N,) fp32: d(loss)/d(loss row),
    the reduction's weights (0 on ignored rows); needs_grad: (hidden, weight, bias).
    -> loss rows (N,) fp32, and [d(hidden) (N, H), d(weight) (V, H), d(bias) (V,)] in the inputs' dtypes,
    None where not needed.

    Per chunk: logits = hidden_c @ weight.T + bias (one matmul, into the scratch), the losses and
    d(logits) in place over the scratch (the cross-entropy kernels over existing logits), then
    d(hidden_c) = dlogits @ weight and d(weight) += dlogits.T @ hidden_c: three matmuls' worth in all.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    triton_path = use_triton(hidden)
    chunk = _chunk_rows(n_rows, vocab, hidden.element_size())
    device, dtype = hidden.device, hidden.dtype
    loss_rows = torch.empty((n_rows,), device=device, dtype=torch.float32)
    dhidden = torch.empty((n_rows, hidden_size), device=device, dtype=dtype) if needs_grad[0] else None
    # A 16-bit d(weight) summed over several chunks accumulates in fp32 (a bf16 running sum would lose
    # the small chunks' contributions); one chunk's is a single matmul, rounded once, as stock PyTorch's.
    several = chunk < n_rows
    dweight = None
    if needs_grad[1]:
        acc_dtype = torch.promote_types(dtype, torch.float32) if several else dtype
        dweight = torch.zeros((vocab, hidden_size), device=device, dtype=acc_dtype)
    dbias = torch.zeros((vocab,), device=device, dtype=torch.float32) if needs_grad[2] else None
    scratch = torch.empty((chunk, vocab), device=device, dtype=dtype)  # (C, V)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        hidden_c = hidden[rows]  # (C, H), a view
        logits = scratch[: hidden_c.shape[0]]
        if bias is None:
            torch.mm(hidden_c, weight.T, out=logits)
        else:
            torch.addmm(bias, hidden_c, weight.T, out=logits)
        loss_rows[rows], lse = _logits_loss(logits, target[rows], opts, triton_path)
        dlogits = _logits_grad(logits, target[rows], lse, dloss[rows], opts, triton_path, dlogits=logits)
        if dhidden is not None:
            torch.mm(dlogits, weight, out=dhidden[rows])
        if dweight is not None:
            _add_dweight(dweight, dlogits, hidden_c)
        if dbias is not None:
            dbias += dlogits.sum(dim=0, dtype=torch.float32)
    grads = [dhidden, dweight, dbias]
    for i, like in ((1, weight), (2, bias)):
        if grads[i] is not None:
            grads[i] = grads[i].to(like.dtype)
    return loss_rows, grads


def _add_dweight(dweight, dlogits, hidden_c):
    # dweight (V, H) += dlogits.T (V, C) @ hidden_c (C, H).
    if dweight.dtype == dlogits.dtype:
        dweight.addmm_(dlogits.T, hidden_c)
        return
    # A 16-bit product into the fp32 accumulator, in vocabulary slices so the product's transient stays
    # within CHUNK_BYTES rather than a second (V, H) weight.
    step = max(1, CHUNK_BYTES // (hidden_c.shape[1] * hidden_c.element_size()))
    for start in range(0, dweight.shape[0], step):
        cols = slice(start, start + step)
        dweight[cols] += dlogits[:, cols].T @ hidden_c


# ----------------------------------------------------------------------------
# Autograd: per-row losses; the reduction is plain PyTorch on top.
# ----------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def no_rows(hidden, weight, bias):
        # The (0,) losses of an empty batch, no kernel launched: in the graph, so the weight gets a zero gradient.
        return hidden.sum(dim=1).float() + 0.0 * weight.sum()

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, target, opts: _Options):
        # hidden (N, H), weight (V, H), bias (V,) or None, target (N,) -> loss (N,) fp32
        vocab = weight.shape[0]
        if use_triton(hidden):
            partials = _linear_ce_fwd(hidden, weight, bias, target, opts)
        else:
            partials = _torch_fwd(
                lambda rows, cols: _torch_linear_logits(hidden, weight, bias, rows, cols, opts),
                target, hidden.shape[0], vocab, hidden.device,
            )
        loss, lse = _finish_rows(partials, target, vocab, opts)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.opts = opts
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, dloss):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        opts: _Options = ctx.opts
        dloss = torch.where(target != opts.ignore_index, dloss.float(), 0.0).contiguous()  # (N,)
        compute_dweight = ctx.needs_input_grad[1]
        if use_triton(hidden):
            dhidden, dweight, dbias = _linear_ce_bwd(hidden, weight, bias, target, lse, dloss, opts, compute_dweight)
        else:
            dhidden, dweight, dbias = _torch_linear_ce_bwd(hidden, weight, bias, target, lse, dloss, opts,
                                                           compute_dweight)
        return (
            dhidden.to(hidden.dtype),
            dweight.to(weight.dtype) if dweight is not None else None,
            dbias.to(bias.dtype) if dbias is not None else None,
            None,
            None,
        )


def _torch_linear_ce_bwd(hidden, weight, bias, target, lse, dloss, opts: _Options, compute_dweight: bool):
    vocab = weight.shape[0]
    dhidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    dweight = torch.zeros(weight.shape, device=hidden.device, dtype=torch.float32) if compute_dweight else None
    dbias = torch.zeros((vocab,), device=hidden.device, dtype=torch.float32) if bias is not None else None
    for rows, cols in _torch_tiles(hidden.shape[0], vocab):
        logits = _torch_linear_logits(hidden, weight, bias, rows, cols, opts)
        dlogits = _torch_dlogits(logits, rows, cols, target, lse, dloss, vocab, opts)
        dhidden[rows] += dlogits @ weight[cols].float()
        if dweight is not None:
            dweight[cols] += dlogits.T @ hidden[rows].float()
        if dbias is not None:
            dbias[cols] += dlogits.sum(dim=0)
    return dhidden, dweight, dbias


class ChunkedLinearCrossEntropyFunction(torch.autograd.Function):
    """The chunked strategy: the reduced loss, with its gradients formed in the forward.

    Only a scalar loss ("mean" or "sum") can take it: the incoming gradient is then one number, and the
    backward scales the stored gradients by it. Per-row weights (reduction="none") would weight each
    row's contribution to d(weight) differently, which a stored d(weight) cannot undo.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, target, opts: _Options, reduction: Reduction, normalizer):
        # hidden (N, H), weight (V, H), bias (V,) or None, target (N,) -> loss () fp32
        valid = target != opts.ignore_index
        # d(loss)/d(loss row), known before any logit: d(logits) is formed already scaled by the
        # reduction, so under the usual backward (an incoming gradient of 1) it is rounded once, as
        # stock PyTorch's is, and the backward's multiply is exact.
        dloss = valid.float()
        if reduction == "mean":
            dloss /= valid.sum().clamp_min(1) if normalizer is None else normalizer
        loss_rows, ctx.grads = _linear_ce_chunked(hidden, weight, bias, target, dloss, opts,
                                                  ctx.needs_input_grad[:3])
        return _reduce(loss_rows, valid, reduction, normalizer)

    @staticmethod
    @autocast_off
    def backward(ctx, dloss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy(strategy='chunked') formed its gradients in the forward and "
                               "hands them over once: use strategy='atomic' to backpropagate through it twice")
        # Scaled in place and handed over: a copy would double the (V, H) weight gradient's memory.
        grads, ctx.grads = ctx.grads, None
        return *(None if grad is None else grad.mul_(dloss) for grad in grads), None, None, None, None


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def no_rows(logits):
        return logits.sum(dim=1).float()  # the (0,) losses of an empty batch, no kernel launched

    @staticmethod
    @autocast_off
    def forward(ctx, logits, target, opts: _Options):
        # logits (N, V), target (N,) -> loss (N,) fp32
        loss, lse = _logits_loss(logits, target, opts, use_triton(logits))
        ctx.save_for_backward(logits, target, lse)
        ctx.opts = opts
        return loss

    @staticmethod
    @autocast_off
    def backward(ctx, dloss):
        logits, target, lse = ctx.saved_tensors
        opts: _Options = ctx.opts
        dloss = torch.where(target != opts.ignore_index, dloss.float(), 0.0).contiguous()  # (N,)
        dlogits = _logits_grad(logits, target, lse, dloss, opts, use_triton(logits), torch.empty_like(logits))
        return dlogits, None, None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction) -> _Options:
    """The options as the kernels take them. Each is checked for its range: NaN or an infinity in a loss
    option gives NaN losses or gradients, and a float ignore_index would silently match no target."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return _Options(
        ignore_index=check_int("ignore_index", ignore_index),
        label_smoothing=check_number("label_smoothing", label_smoothing, at_least=0.0, at_most=1.0),
        z_loss=check_number("z_loss", z_loss, at_least=0.0),
        softcap=None if softcap is None else check_number("softcap", softcap, above=0.0),
    )


def _check_normalizer(normalizer, reduction, device: torch.device) -> None:
    """A number, or a 0-dim tensor on the inputs' device or the CPU, > 0. A CUDA tensor's value is not
    checked: reading it would stall the host, and a device-side assertion would end the process on an
    accumulated batch whose targets are all ignored."""
    if normalizer is None:
        return
    if reduction != "mean":
        raise ValueError(f"normalizer is only used with reduction='mean', got reduction={reduction!r}")
    if not isinstance(normalizer, torch.Tensor):
        check_number("normalizer", normalizer, above=0.0)
        return
    if normalizer.dtype == torch.bool or normalizer.is_complex():
        raise TypeError(f"normalizer must be a real number or a real 0-dim tensor, got a {normalizer.dtype} tensor")
    if normalizer.dim() != 0:
        raise ValueError(f"normalizer must be a 0-dim tensor (one count for the whole loss), got shape "
                         f"{tuple(normalizer.shape)}")
    if normalizer.device not in (device, torch.device("cpu")):
        raise ValueError(f"normalizer is on {normalizer.device} but the inputs are on {device}")
    if not normalizer.is_cuda:
        check_number("normalizer", normalizer.item(), above=0.0)


def _check_target(target, n_rows: int, vocab: int, device: torch.device, ignore_index: int) -> torch.Tensor:
    """The target as the kernels read it: (N,) and contiguous. Copying N indices costs nothing next to the loss,
    and the kernels then need no stride for it (an expanded target, stride 0, is read correctly as well)."""
    check_tensor("target", target, (torch.int64, torch.int32))
    if target.numel() != n_rows:
        raise ValueError(f"target must have one entry per row: expected {n_rows} entries, got shape "
                         f"{tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the inputs are on {device}")
    target = target.reshape(-1).contiguous()
    in_range = ((target >= 0) & (target < vocab)) | (target == ignore_index)
    check_values(in_range.all(), f"target values must be in [0, {vocab}) or equal ignore_index={ignore_index}",
                 found=lambda: f"found {target[~in_range][0].item()}")
    return target


def _loss(function, inputs, target, vocab, ignore_index, label_smoothing, z_loss, softcap, reduction, normalizer,
          reduced_function=None):
    """What both losses do once their inputs are checked: check the options and the target,
    take the per-row losses, reduce them, and shape them like ``target`` for reduction="none".

    ``inputs``: ``function``'s tensors, the (N, H) hidden states or (N, V) logits first.
    ``reduced_function``: instead of ``function``, one that takes the reduction and returns the reduced loss.
    """
    opts = _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
    rows = inputs[0]
    _check_normalizer(normalizer, reduction, rows.device)
    rows_target = _check_target(target, rows.shape[0], vocab, rows.device, opts.ignore_index)
    if rows.shape[0] == 0:  # a grid of 0 programs is not launched
        loss_rows = function.no_rows(*inputs)
    elif reduced_function is not None:
        return reduced_function.apply(*inputs, rows_target, opts, reduction, normalizer)
    else:
        loss_rows = function.apply(*inputs, rows_target, opts)
    loss = _reduce(loss_rows, rows_target != ignore_index, reduction, normalizer)
    return loss.reshape(target.shape) if reduction == "none" else loss


STRATEGIES = ("auto", "atomic", "chunked")
Strategy = Literal["auto", "atomic", "chunked"]


def _check_strategy(strategy, reduction) -> None:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if strategy == "chunked" and reduction == "none":
        raise ValueError("strategy='chunked' needs a scalar loss, reduction='mean' or 'sum': it forms d(weight) "
                         "in the forward, before the per-row weights of reduction='none' are known; "
                         "use strategy='atomic' or 'auto'")


def _choose_strategy(strategy, reduction, hidden, weight, bias) -> str:
    """What ``linear_cross_entropy`` runs: "forward-only", "atomic" or "chunked" (see its docstring).

    1. No gradient wanted (grad mode off, or no input requires one): the forward kernel alone, whatever
       the strategy; it keeps only the per-row log-sum-exp, and neither strategy's gradient work is due.
    2. A strategy asked for by name runs; "chunked" with reduction="none" is refused (see
       ``ChunkedLinearCrossEntropyFunction``).
    3. "auto": "atomic" for reduction="none", and where the memory budget ``CHUNK_BYTES`` holds fewer than
       128 rows of logits (a vocabulary above a million words in bf16: its chunks would run as thin,
       slow matmuls); otherwise "chunked": 3 matmuls' worth of FLOPs against 4, no atomics (bitwise
       repeatable), at the cost of a scratch of at most ``CHUNK_BYTES`` and a quarter of the logits.
    4. Under ``torch.use_deterministic_algorithms(True)``, "auto" takes "chunked" whenever the reduction
       allows, and the atomic backward (fp32 atomics, not bitwise repeatable) raises a RuntimeError, or
       warns under ``warn_only=True``, as PyTorch's own nondeterministic operations do.
    """
    _check_strategy(strategy, reduction)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        return "forward-only"
    deterministic = torch.are_deterministic_algorithms_enabled()
    chosen = strategy
    if strategy == "auto":
        thin = _budget_rows(weight.shape[0], hidden.element_size()) < _MIN_CHUNK_ROWS
        chosen = "atomic" if reduction == "none" or (thin and not deterministic) else "chunked"
    if chosen == "atomic" and deterministic:
        message = ("linear_cross_entropy's atomic strategy accumulates its gradients with fp32 atomics, which are "
                   "not bitwise repeatable, and torch.use_deterministic_algorithms(True) is set: use "
                   "strategy='chunked' (reduction 'mean' or 'sum')")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)
    return chosen


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    strategy: Strategy = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without the logits.

    Args:
        hidden: (..., H) float32/float16/bfloat16, the final hidden states; flattened
            to N = prod(...) rows.
        weight: (V, H), same dtype and device, the LM head (``lm_head.weight``).
        target: N int64 (or int32) class indices (any shape and strides with N elements, e.g. (N,) or
            hidden.shape[:-1]); ``ignore_index`` marks rows that do not count.
        bias: optional (V,), same dtype.
        ignore_index: an int, the target value whose rows contribute nothing.
        label_smoothing: in [0, 1], as in ``torch.nn.functional.cross_entropy``.
        z_loss: a finite number >= 0; adds ``z_loss * logsumexp(logits)**2`` per counted row (PaLM).
        softcap: None, or a finite number > 0: the softmax sees ``softcap * tanh(logits / softcap)`` (Gemma 2).
        reduction: "mean" (sum over counted rows divided by their number, or by
            ``normalizer``), "sum", or "none" (per-row losses shaped like ``target``,
            0 on ignored rows).
        normalizer: for "mean" only: divide the sum by this number or 0-dim tensor
            instead, e.g. the target-token count of a whole accumulated batch.
            It must be > 0; a CUDA tensor's value is not checked (that would
            stall the host), so a count of 0 there gives NaN.
        strategy: how the gradient is computed (same losses and gradients, up to rounding):
            "atomic": the forward keeps only the per-row log-sum-exp; the backward recomputes the
            logits tile by tile and accumulates d(hidden) and d(weight) with fp32 atomics (4 matmuls'
            worth of FLOPs in all, extra memory O(N) until the backward). "chunked": the forward
            forms the logits of a chunk of rows at a time (at most ``CHUNK_BYTES``, 256 MiB, and a
            quarter of the rows), turns them
            into d(logits) in place and finishes d(hidden) and d(weight) with matmuls (3 matmuls'
            worth, no atomics, bitwise repeatable; the gradients are held from the forward to the
            backward; "mean" or "sum" only). "auto" (the default): no gradient wanted -> the forward
            kernel alone; reduction="none" -> "atomic"; otherwise "chunked" (unless the budget holds
            fewer than 128 rows of logits, a vocabulary above a million words). Under
            ``torch.use_deterministic_algorithms(True)`` the atomic strategy's backward raises (warns
            with ``warn_only=True``), and "auto" takes "chunked" wherever the reduction allows.

    Returns:
        fp32 loss: a scalar, or per-row losses for reduction="none". With every
        target ignored the loss and the gradients are 0.

    Gradients flow to ``hidden``, ``weight`` and ``bias``. The (N, V) logits are
    never materialized, in the forward or the backward. On CUDA an out-of-range
    target is reported by a device-side assertion at the next synchronization
    (as in PyTorch's own cross-entropy); on CPU it raises ValueError at once.
    """
    # Under autocast the LM head's matmul runs in its dtype, as F.linear would; the loss stays fp32.
    hidden, weight, bias = cast_for_autocast(autocast_dtype(hidden), hidden, weight, bias)
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with V >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be (..., H) with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be ({weight.shape[0]},) with the dtype and device of weight, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    chosen = _choose_strategy(strategy, reduction, hidden, weight, bias)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H), a view when possible
    return _loss(LinearCrossEntropyFunction, (hidden_2d, weight, bias), target, weight.shape[0], ignore_index,
                 label_smoothing, z_loss, softcap, reduction, normalizer,
                 reduced_function=ChunkedLinearCrossEntropyFunction if chosen == "chunked" else None)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: float | None = None, reduction: Reduction = "mean",
                  normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over logits that already exist (classification and tagging heads).

    Args:
        logits: (..., V) float32/float16/bfloat16; flattened to N rows.
        target: N int64 class indices, ``ignore_index`` for rows that do not count.
        Other options as in ``linear_cross_entropy``.

    Returns:
        fp32 loss, as ``linear_cross_entropy``. The gradient has the dtype of ``logits``.
    """
    check_tensor("logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    logits_2d = logits.reshape(-1, logits.shape[-1])  # (N, V)
    return _loss(CrossEntropyFunction, (logits_2d,), target, logits.shape[-1], ignore_index, label_smoothing, z_loss,
                 softcap, reduction, normalizer)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``linear_cross_entropy`` as a module holding its options (a drop-in for an LM-head loss)."""

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, reduction: Reduction = "mean", strategy: Strategy = "auto") -> None:
        super().__init__()
        _check_options(ignore_index, label_smoothing, z_loss, softcap, reduction)
        _check_strategy(strategy, reduction)
        self.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                            softcap=softcap, reduction=reduction, strategy=strategy)

    def forward(self, hidden, weight, target, bias=None, normalizer=None):
        return linear_cross_entropy(hidden, weight, target, bias=bias, normalizer=normalizer, **self.options)
