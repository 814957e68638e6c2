"""Fused attention, forward and backward, in the FlashAttention-2 manner.

What is fused. Attention ``softmax(q k^T * scale + mask) v`` normally
materializes the (Sq, Sk) scores and probabilities per head, and keeps the
probabilities for the backward: at S=8192 that is 256 MiB per head in fp32.
Here they only ever exist one (BLOCK_M, BLOCK_N) tile at a time, in registers:

- forward: one program per (BLOCK_M queries, sequence, query head) walks the
  key blocks its queries may see, folding each score tile into an online
  softmax in fp32 (running max, running sum, rescaled output accumulator). Only
  the per-row log-sum-exp is stored for the backward.
- backward, fast (the default): delta = rowsum(dO * O) first, then one
  program per (key block, kv head) walks every query block of every query head
  of its group, recomputes the score tiles from q, k and the saved log-sum-exp,
  accumulates dk and dv in registers, and adds each tile's share of dq into an
  fp32 buffer with relaxed atomics: 5 GEMM-equivalents (S = QK^T, dP = dO V^T,
  dV += P^T dO, dK += dS^T Q, dQ += dS K), as FlashAttention-2/3. The order of
  the atomic adds varies, so dq's last bits vary from run to run.
- backward, deterministic (``deterministic=True``, or PyTorch's
  ``torch.use_deterministic_algorithms``): no atomics, two runs give
  bitwise-equal gradients. A dq pass, one program per query block, recomputes
  the score tiles and accumulates dq in registers; it also stores delta. Then a
  dk/dv pass as above without dq. The scores are recomputed in both passes:
  7 GEMM-equivalents.
Either way grouped-query attention never repeats k/v, and the group's sum for
dk/dv is formed in place.

Masks are computed from positions, never stored: padding (a (B, Sk) key mask,
or packed sequences through cu_seqlens), causal, and a sliding window, all
expressed as one band around the diagonal. Dropout bits come from a
counter-based generator (Philox, keyed by a seed and the (head, query, key)
position), so the backward regenerates the mask without storing it.

Extra memory is O(B * H * S): the log-sum-exp and delta, fp32; the fast
backward also holds dq in fp32 (B * Hq * Sq * D) while it adds up.

Cost and where it stops being fast: forward plus fast backward spend 7
GEMM-equivalents, the minimum (the deterministic backward: 9). The forward
masks by position only the key blocks that cross the band's edges (the
diagonal) or the sequence's end, by a branch in its one key loop; the key
padding mask is data and applies to every block. Separate loops for the two
kinds of block, as Triton's fused-attention tutorial has, each software-
pipelined, cost 60 to 90 more registers a thread in Triton 3.9 and spill on
sm_80 and sm_90 (the compile gate). The backward, likewise, tests positions
only on the tiles that straddle the band's edge or a sequence's end: the dq
pass's key blocks and the dk/dv pass's query blocks that the band covers
whole, inside the sequence, skip the mask by a branch uniform over the
program. Its configs already at the register limit keep masking every tile
(``SPLIT_MASKS`` off: there the branch spills), as do head dim 256's
head-major tiles. On sm_90 the forward loads q, k and v through TMA tensor
descriptors (the copy engine; fewer registers than pointer loads) built in
the kernel, one per (sequence, head) and bounded by its length, so rows past
it and a padded head dim read as zeros, as the pointer loads' masks give: the
launcher picks them (USE_TMA) for 16-bit inputs whose rows all start on 16
bytes, TMA's rule. The descriptors take global scratch at launch from
triton.set_allocator's allocator, or torch's for that launch when none is set.
fp32 inputs take three TF32 tensor-core passes per dot (tf32x3, close to fp32
accuracy) with small tiles: correct, slow; train in 16-bit.
Head dims that are not powers of two: Triton's tensor shapes are powers of
two, so the forward splits such a head dim under 128 into the largest power
of two below it and a tail, when the tail is a power of two of at least 16 (a
dot's shortest reduction): 80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16. The
scores are Q0 K0^T + Q1 K1^T and the output has one accumulator per piece,
stored as two column ranges (on TMA, two descriptors per tensor), so the
forward's two products spend 80/80 and 96/96 of the useful FLOPs, not 128/80
and 128/96. Other head dims (72, 112, and any over 128: see _fwd_head_split)
are padded to the next power of two in registers, and so is every head dim
in the backward: there 80 and 96 still cost as much as 128.

Tiles: each kernel's configs hold sm_80-sized tiles (warps along rows, so the
softmax row statistics stay within a warp) and Hopper ones, where each dot's
leading dimension gives every warpgroup 64 rows of its own, as a wgmma needs
(e.g. 128 queries on 8 warps, 64 on 4); the autotuner picks per GPU. Some
Hopper tiles spill as sm_80's mma: those are for sm_90 only
(``KernelSpec.hopper_only``). The backward's Hopper tiles take 64 keys per
warpgroup and 16 queries (8 for fp32's one-pass backward, whose tf32x3
operands take more), which leaves room for dk and dv (64 rows in fp32 each)
and Philox's state; the one-pass backward computes dq transposed,
dq^T = K^T dS^T, so that its rows (the head dim) are 64 per warpgroup too.
Head dim 256's dk and dv with the keys on the rows would take 64 keys x 256
x 2 in fp32 per warpgroup, 256 registers a thread: its Hopper tiles turn them
head-dim-major, as FlashAttention-3 does (dk^T and dv^T, the head dim on the
wgmma rows, 128 per warpgroup), take 128 queries x 16 keys, read q and dO by
TMA straight into shared memory (through registers they spill the
accumulators; the launcher lends Triton a scratch allocator for the
descriptors and copies the rare q or dO view TMA cannot read), and add the
one-pass dq 32 columns at a time. One kernel carries both orientations (the
HEAD_MAJOR constexpr picks the query loop), so a spec keeps one kernel and the
autotuner chooses among all its tiles.
Hopper tiles also come at num_stages 2 or 3 where they fit: their next blocks
load by cp.async (or, for TMA, double-buffered) while the dots run. The
forward's largest is FA3's 128x128.

The kernels carry one constexpr per mask or score option (varlen, band, key
padding, softcap, dropout). Each is a few lines at a fixed place in the same
loop; splitting them would give near-identical kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .autocast import autocast_dtype, autocast_off, cast_for_autocast
from .backend import use_triton
from .checks import check_int, check_number, check_tensor, check_values
from .launch import TRITON_DTYPE, CompileCase, KernelSpec, candidate_configs, compile_case, launch, register

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_FP32_HEAD_DIM = 64

# A window side with no limit: far past any sequence, far from int32 overflow
# when added to positions inside the kernels.
_UNBOUNDED = 1 << 30


@dataclasses.dataclass(frozen=True)
class _Options:
    softmax_scale: float
    # (left, right): query i sees keys j with -left <= j - (i + Sk - Sq) <= right;
    # causal is (unbounded, 0). None: every key.
    band: tuple[int, int] | None
    softcap: float | None
    dropout_p: float
    # The backward: True, the two-pass one (bitwise repeatable); False, the one-pass
    # one (atomic dq); None, whichever torch.are_deterministic_algorithms_enabled() says when it runs.
    deterministic: bool | None = None


@dataclasses.dataclass
class _Problem:
    """Where the sequences are: a padded batch (B, H, S, D), or packed tokens (T, H, D)."""

    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seqlen_q: int  # the (maximum) query length
    seqlen_k: int  # the (maximum) key length
    cu_seqlens_q: torch.Tensor | None = None  # (batch + 1,) int32, packed only
    cu_seqlens_k: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None  # (batch, seqlen_k) bool, padded only

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None


# ----------------------------------------------------------------------------
# Reference: plain PyTorch, every (Sq, Sk) matrix materialized. The tests run it
# in float64 as ground truth, and in the input dtype as "stock PyTorch".
# ----------------------------------------------------------------------------


def attention_ref(q, k, v, *, causal=False, softmax_scale=None, key_padding_mask=None, window=None, softcap=None,
                  dropout_p=0.0, dropout_mask=None):
    """Attention of (B, Hq, Sq, D) queries over (B, Hkv, Sk, D) keys, computed plainly.

    Same semantics as ``flash_attention``; ``dropout_mask`` (B, Hq, Sq, Sk) bool
    (True = keep) stands in for the generator. Rows with no visible key give 0.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Sk, D)
    v = v.repeat_interleave(group, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _allowed_ref(q.shape[2], k.shape[2], _band(causal, window), key_padding_mask, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: 0, not NaN
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    return probs @ v


def _allowed_ref(seqlen_q, seqlen_k, band, key_padding_mask, device, rows=None):
    """(B or 1, 1, rows, Sk) bool: which keys each query may see. ``rows``: query positions (default all)."""
    rows = torch.arange(seqlen_q, device=device) if rows is None else rows
    cols = torch.arange(seqlen_k, device=device)
    allowed = torch.ones(len(rows), seqlen_k, dtype=torch.bool, device=device)
    if band is not None:
        relative = cols[None, :] - (rows[:, None] + seqlen_k - seqlen_q)
        allowed = (relative <= band[1]) & (relative >= -band[0])
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def _band(causal: bool, window: tuple[int, int] | None) -> tuple[int, int] | None:
    """Causal and a window as one band around the (bottom-right aligned) diagonal."""
    if not causal and window is None:
        return None
    left, right = window if window is not None else (-1, -1)
    left = _UNBOUNDED if left < 0 else left
    right = _UNBOUNDED if right < 0 else right
    if causal:
        right = min(right, 0)
    return left, right


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # Through the sigmoid: tl has no tanh that also runs in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    # (first token, length) of sequence b's queries and keys.
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + b)
        q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
        k_start = tl.load(cu_seqlens_k_ptr + b)
        k_len = tl.load(cu_seqlens_k_ptr + b + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _query_block(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k, num_heads, BLOCK_M: tl.constexpr,
                 IS_VARLEN: tl.constexpr):
    # A forward or dq program's first query, its (sequence b, query head h) and
    # bh = b * num_heads + h, and the sequence's (first token, length) of queries and keys.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, IS_VARLEN)
    return start_m, bh, b, h, q_start, q_len, k_start, k_len


@triton.jit
def _head_base(ptr, b, h, start, stride_b, stride_h, stride_m):
    # Offsets in int64: B * H * S * D passes 2**31 elements at real sizes.
    return (ptr + tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h
            + tl.cast(start, tl.int64) * stride_m)


@triton.jit
def _kv_bases(k_ptr, v_ptr, kpm_ptr, b, kv_head, k_start, stride_kb, stride_kh, stride_km, stride_vb, stride_vh,
              stride_vm, stride_kpm_b):
    # Where the keys and the values of one (sequence, kv head) begin, and the sequence's key padding mask row.
    k_base = _head_base(k_ptr, b, kv_head, k_start, stride_kb, stride_kh, stride_km)
    v_base = _head_base(v_ptr, b, kv_head, k_start, stride_vb, stride_vh, stride_vm)
    return k_base, v_base, kpm_ptr + tl.cast(b, tl.int64) * stride_kpm_b


@triton.jit
def _load_rows(base, num_rows, stride_row, first_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # Rows first_row.. of one head's (num_rows, HEAD_DIM) matrix as a (BLOCK_ROWS, BLOCK_D) tile, zero outside.
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :],
                   mask=(rows[:, None] < num_rows) & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_rows(base, tile, num_rows, stride_row, first_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile.to(base.dtype.element_ty),
             mask=(rows[:, None] < num_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _allowed(q_pos, k_pos, q_len, k_len, window_left, window_right, kpm_row_ptr,
             HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr):
    # Which (query, key) pairs of a tile count. q_pos and k_pos broadcast to the
    # tile: (M, 1) and (1, N) in the forward and dq passes, transposed in dk/dv.
    allowed = (q_pos < q_len) & (k_pos < k_len)
    if HAS_BAND:
        relative = k_pos - (q_pos + (k_len - q_len))  # causal aligns to the bottom right
        allowed = allowed & (relative <= window_right) & (relative >= -window_left)
    if HAS_KPM:
        allowed = allowed & (tl.load(kpm_row_ptr + k_pos, mask=k_pos < k_len, other=0) != 0)
    return allowed


@triton.jit
def _dropout_keep(seed, head, q_pos, k_pos, seqlen_k, dropout_p):
    # One Philox draw per (head, query, key): the forward and both backward
    # passes regenerate the same bits. Positions wrap past 2**31 pairs per head.
    return tl.rand(seed + head, q_pos * seqlen_k + k_pos) >= dropout_p


@triton.jit
def _scores(qk, softmax_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    # Scores in log2 units (the exponentials are exp2), and tanh(scores / softcap)
    # for the softcap's derivative in the backward (qk itself when there is none).
    if HAS_SOFTCAP:
        capped = _tanh(qk * (softmax_scale / softcap))
        scores = capped * (softcap * _LOG2E)
    else:
        capped = qk
        scores = qk * (softmax_scale * _LOG2E)
    return scores, capped


@triton.jit
def _lse_log2(lse):
    # The saved log-sum-exp in log2 units. Rows that saw no key saved -inf:
    # +inf makes every probability of theirs exp2(-inf) = 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def _key_range(start_m, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_BAND: tl.constexpr):
    # [lo, hi): the keys that queries start_m.. may see; with a band, only the blocks that intersect it.
    lo = 0
    hi = k_len
    if HAS_BAND:
        lo = tl.maximum(start_m + (k_len - q_len) - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + (k_len - q_len) + window_right, k_len)
    return lo, hi


@triton.jit
def _unmasked_blocks(lo, hi, first_full, last_end, BLOCK: tl.constexpr):
    # [full_lo, full_hi): the blocks of a loop lo, lo + BLOCK, ... below hi (lo a multiple of
    # BLOCK) that start at or after first_full and end by last_end; the others take the position mask.
    full_lo = lo + tl.cdiv(tl.maximum(first_full - lo, 0), BLOCK) * BLOCK
    full_hi = lo + (tl.minimum(last_end, hi) - lo) // BLOCK * BLOCK
    return full_lo, tl.maximum(full_hi, full_lo)


@triton.jit
def _key_kept(kpm_row_ptr, k_pos, k_len):
    # The key padding mask: it is data, so every tile applies it, masked or not.
    return tl.load(kpm_row_ptr + k_pos, mask=k_pos < k_len, other=0) != 0


@triton.jit
def _fwd_unmasked_key_range(start_m, lo, hi, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HAS_BAND: tl.constexpr):
    # [full_lo, full_hi): the key blocks of [lo, hi) that every query start_m..start_m + BLOCK_M - 1 may
    # see by position (inside the band, below k_len), so they need no position mask. Aligned to BLOCK_N
    # as lo is, and lo <= full_lo <= full_hi <= max(lo, hi): [lo, full_lo) and [full_hi, hi) cross the
    # band's edges or k_len and stay masked. Rows past q_len count as real: fewer unmasked blocks, never wrong.
    full_hi = k_len
    full_lo = lo
    if HAS_BAND:
        # Key j is seen by query i when -left <= j - (i + k_len - q_len) <= right: the last query bounds the
        # first key of a full block from below, the first query bounds its last key from above.
        first_key = tl.maximum(start_m + BLOCK_M - 1 + (k_len - q_len) - window_left, 0)
        full_lo = tl.maximum(lo, tl.cdiv(first_key, BLOCK_N) * BLOCK_N)
        full_hi = tl.maximum(tl.minimum(full_hi, start_m + (k_len - q_len) + window_right + 1), 0)
    full_lo = tl.maximum(tl.minimum(full_lo, hi), lo)  # hi < lo where no key is seen (causal, Sq > Sk)
    full_hi = tl.maximum(full_lo, full_hi // BLOCK_N * BLOCK_N)
    return full_lo, full_hi


@triton.jit
def _fwd_rows(base, desc, desc_tail, num_rows, stride_row, first_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr, USE_TMA: tl.constexpr):
    # Rows first_row.. of one head's (num_rows, HEAD_DIM) matrix in the forward's two head-dim pieces:
    # columns [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D_TAIL), zero outside. Without a tail
    # (BLOCK_D_TAIL 0) the second is the first again, never used: no code runs for it.
    if USE_TMA:
        head = desc.load([first_row, 0])
    else:
        head = _load_rows(base, num_rows, stride_row, first_row, BLOCK_ROWS, HEAD_DIM, BLOCK_D)
    tail = head
    if BLOCK_D_TAIL > 0:
        if USE_TMA:
            tail = desc_tail.load([first_row, BLOCK_D])
        else:
            tail = _load_rows(base + BLOCK_D, num_rows, stride_row, first_row, BLOCK_ROWS, HEAD_DIM - BLOCK_D,
                              BLOCK_D_TAIL)
    return head, tail


@triton.jit
def _fwd_descriptors(base, num_rows, stride_row, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr):
    # TMA descriptors of one head's (num_rows, HEAD_DIM) matrix for _fwd_rows: blocks of BLOCK_D columns,
    # and of BLOCK_D_TAIL columns read at column BLOCK_D (the first again when there is no tail).
    desc = tl.make_tensor_descriptor(base, [num_rows, HEAD_DIM], [stride_row, 1], [BLOCK_ROWS, BLOCK_D])
    desc_tail = desc
    if BLOCK_D_TAIL > 0:
        desc_tail = tl.make_tensor_descriptor(base, [num_rows, HEAD_DIM], [stride_row, 1], [BLOCK_ROWS, BLOCK_D_TAIL])
    return desc, desc_tail


@triton.jit
def _fwd_accumulate(acc, rescale, probs, v, DOT_PRECISION: tl.constexpr):
    # The online softmax's output update for one piece of the head dim: acc * rescale + P V.
    return acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_store(out_base, acc, safe_sum, dropout_p, q_len, stride_om, start_m, BLOCK_M: tl.constexpr,
               NUM_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # One piece of the output: the accumulator over the softmax's sum, scaled up for dropout's drops.
    out = acc / safe_sum[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    _store_rows(out_base, out, q_len, stride_om, start_m, BLOCK_M, NUM_COLS, BLOCK_COLS)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, kpm_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_kpm_b,
    seqlen_q, seqlen_k, num_heads, group_size,
    softmax_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: the output and log-sum-exp of BLOCK_M queries of one (sequence, query head).
    # USE_TMA (the launcher's choice: sm_90 and 16-byte aligned rows): q, k and v come in through
    # tensor descriptors, one per (sequence, head) whose shape ends at the sequence's last row, so
    # the copy engine (TMA) fills rows past it, and a padded head dim, with zeros as _load_rows does.
    # The head dim comes in two power-of-two pieces, BLOCK_D and BLOCK_D_TAIL (80 = 64 + 16,
    # 96 = 64 + 32; 0: one piece, padded to BLOCK_D, see _fwd_head_split): S = Q0 K0^T + Q1 K1^T, and
    # the output in one accumulator per piece, so no product runs over padding columns.
    start_m, bh, b, h, q_start, q_len, k_start, k_len = _query_block(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q,
                                                                     seqlen_k, num_heads, BLOCK_M, IS_VARLEN)
    if start_m >= q_len:
        return
    kv_head = h // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_base = _head_base(q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm)
    k_base, v_base, kpm_row_ptr = _kv_bases(k_ptr, v_ptr, kpm_ptr, b, kv_head, k_start, stride_kb, stride_kh,
                                            stride_km, stride_vb, stride_vh, stride_vm, stride_kpm_b)
    q_desc, q_desc_tail = q_base, q_base  # pointer loads: no descriptors
    k_desc, k_desc_tail = k_base, k_base
    v_desc, v_desc_tail = v_base, v_base
    # q's descriptors and load before k's and v's descriptors, and below the log-sum-exp before the
    # stores: the order the kernel had before its head-dim pieces, which kept its register counts.
    if USE_TMA:
        q_desc, q_desc_tail = _fwd_descriptors(q_base, q_len, stride_qm, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D_TAIL)
    q, q_tail = _fwd_rows(q_base, q_desc, q_desc_tail, q_len, stride_qm, start_m, BLOCK_M, HEAD_DIM, BLOCK_D,
                          BLOCK_D_TAIL, USE_TMA)  # (BLOCK_M, BLOCK_D), (BLOCK_M, BLOCK_D_TAIL)
    if USE_TMA:
        k_desc, k_desc_tail = _fwd_descriptors(k_base, k_len, stride_km, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D_TAIL)
        v_desc, v_desc_tail = _fwd_descriptors(v_base, k_len, stride_vm, BLOCK_N, HEAD_DIM, BLOCK_D, BLOCK_D_TAIL)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_D_TAIL > 0:
        acc_tail = tl.zeros([BLOCK_M, BLOCK_D_TAIL], tl.float32)
    # Only the key blocks that cross the band's edges (the diagonal, under causal) or the sequence's
    # end are masked by position; [full_lo, full_hi), most blocks at long lengths, are not. One loop
    # with a branch that goes the same way for the whole program (see the design note for why not
    # separate loops per kind of block, as Triton's fused-attention tutorial has).
    lo, hi = _key_range(start_m, q_len, k_len, window_left, window_right, BLOCK_M, BLOCK_N, HAS_BAND)
    full_lo, full_hi = _fwd_unmasked_key_range(start_m, lo, hi, q_len, k_len, window_left, window_right, BLOCK_M,
                                               BLOCK_N, HAS_BAND)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, k_tail = _fwd_rows(k_base, k_desc, k_desc_tail, k_len, stride_km, start_n, BLOCK_N, HEAD_DIM, BLOCK_D,
                              BLOCK_D_TAIL, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if BLOCK_D_TAIL > 0:
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=DOT_PRECISION)
        scores, _ = _scores(qk, softmax_scale, softcap, HAS_SOFTCAP)
        if (start_n < full_lo) | (start_n >= full_hi):
            allowed = _allowed(offs_m[:, None], offs_n[None, :], q_len, k_len, window_left, window_right,
                               kpm_row_ptr, HAS_BAND, HAS_KPM)
            scores = tl.where(allowed, scores, float("-inf"))
        elif HAS_KPM:  # data, not position: every block reads its keys' mask
            scores = tl.where(tl.load(kpm_row_ptr + offs_n)[None, :] != 0, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # Rows that have seen no key yet keep max -inf; exponentiate against 0 so they stay 0, not NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - safe_max)
        probs = tl.exp2(scores - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], seqlen_k, dropout_p)
            probs = tl.where(keep, probs, 0.0)
        v, v_tail = _fwd_rows(v_base, v_desc, v_desc_tail, k_len, stride_vm, start_n, BLOCK_N, HEAD_DIM, BLOCK_D,
                              BLOCK_D_TAIL, USE_TMA)
        acc = _fwd_accumulate(acc, rescale, probs, v, DOT_PRECISION)
        if BLOCK_D_TAIL > 0:
            acc_tail = _fwd_accumulate(acc_tail, rescale, probs, v_tail, DOT_PRECISION)
        row_max = new_max

    # A row that sees no key at all (padding, or causal with Sq > Sk) gives 0 and lse -inf.
    seen = row_sum > 0.0
    safe_sum = tl.where(seen, row_sum, 1.0)
    lse = tl.where(seen, (row_max + tl.log2(safe_sum)) * _LN2, float("-inf"))
    out_base = _head_base(out_ptr, b, h, q_start, stride_ob, stride_oh, stride_om)
    _fwd_store(out_base, acc, safe_sum, dropout_p, q_len, stride_om, start_m, BLOCK_M, HEAD_DIM, BLOCK_D, HAS_DROPOUT)
    if BLOCK_D_TAIL > 0:
        _fwd_store(out_base + BLOCK_D, acc_tail, safe_sum, dropout_p, q_len, stride_om, start_m, BLOCK_M,
                   HEAD_DIM - BLOCK_D, BLOCK_D_TAIL, HAS_DROPOUT)
    lse_base = lse_ptr + tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
    tl.store(lse_base + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dq_tile(
    dq, q, dout, delta, lse, k_base, v_base, kpm_row_ptr, offs_m, start_n, masked, q_len, k_len, stride_km,
    stride_vm, bh, seqlen_k, softmax_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dq plus the share of keys start_n..: (BLOCK_M, BLOCK_D), unscaled. masked (a runtime
    # flag, uniform over the program, or the constant True): the tile straddles the band's
    # edge or k_len, so its positions are tested; the key padding mask (data) applies to every tile.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, k_len, stride_km, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    v = _load_rows(v_base, k_len, stride_vm, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    scores, capped = _scores(qk, softmax_scale, softcap, HAS_SOFTCAP)
    if HAS_KPM:
        scores = tl.where(_key_kept(kpm_row_ptr, offs_n[None, :], k_len), scores, float("-inf"))
    if masked:
        allowed = _allowed(offs_m[:, None], offs_n[None, :], q_len, k_len, window_left, window_right, kpm_row_ptr,
                           HAS_BAND, False)
        scores = tl.where(allowed, scores, float("-inf"))
    probs = tl.exp2(scores - lse[:, None])
    dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], seqlen_k, dropout_p)
        dprobs = tl.where(keep, dprobs * (1.0 / (1.0 - dropout_p)), 0.0)
    dscores = probs * (dprobs - delta[:, None])
    if HAS_SOFTCAP:
        dscores = dscores * (1.0 - capped * capped)
    return dq + tl.dot(dscores.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_kpm_b,
    seqlen_q, seqlen_k, num_heads, group_size,
    softmax_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_MASKS: tl.constexpr,
):
    # One program: dq for BLOCK_M queries of one (sequence, query head), and
    # their delta = rowsum(dO * O), which the dk/dv pass reads.
    start_m, bh, b, h, q_start, q_len, k_start, k_len = _query_block(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q,
                                                                     seqlen_k, num_heads, BLOCK_M, IS_VARLEN)
    if start_m >= q_len:
        return
    kv_head = h // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_base = _head_base(q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm)
    k_base, v_base, kpm_row_ptr = _kv_bases(k_ptr, v_ptr, kpm_ptr, b, kv_head, k_start, stride_kb, stride_kh,
                                            stride_km, stride_vb, stride_vh, stride_vm, stride_kpm_b)
    q = _load_rows(q_base, q_len, stride_qm, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    out = _load_rows(_head_base(out_ptr, b, h, q_start, stride_ob, stride_oh, stride_om), q_len, stride_om,
                     start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    dout = _load_rows(_head_base(dout_ptr, b, h, q_start, stride_dob, stride_doh, stride_dom), q_len, stride_dom,
                      start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), 1)  # (BLOCK_M,)
    row_offset = tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
    tl.store(delta_ptr + row_offset + offs_m, delta, mask=offs_m < q_len)
    lse = _lse_log2(tl.load(lse_ptr + row_offset + offs_m, mask=offs_m < q_len, other=0.0))

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, q_len, k_len, window_left, window_right, BLOCK_M, BLOCK_N, HAS_BAND)
    # Key blocks the band covers for every query of the block, and below k_len, need no position
    # mask; the blocks on the band's edges and the one across k_len do. (Rows past q_len need
    # none: their q and dO are zeros, so their share is 0 and they are never stored.)
    first_full = 0
    last_end = k_len
    if HAS_BAND:
        first_full = start_m + BLOCK_M - 1 + (k_len - q_len) - window_left
        last_end = start_m + (k_len - q_len) + window_right + 1
    full_lo, full_hi = _unmasked_blocks(lo, hi, first_full, last_end, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        masked = True  # a constant: every tile tests positions, no branch
        if SPLIT_MASKS:
            masked = (start_n < full_lo) | (start_n >= full_hi)
        dq = _attn_bwd_dq_tile(
            dq, q, dout, delta, lse, k_base, v_base, kpm_row_ptr, offs_m, start_n, masked, q_len, k_len, stride_km,
            stride_vm, bh, seqlen_k, softmax_scale, softcap, window_left, window_right, dropout_p, seed,
            HEAD_DIM, HAS_BAND, HAS_KPM, HAS_SOFTCAP, HAS_DROPOUT, DOT_PRECISION, BLOCK_D, BLOCK_N)
    dq = dq * softmax_scale
    dq_base = _head_base(dq_ptr, b, h, q_start, stride_dqb, stride_dqh, stride_dqm)
    _store_rows(dq_base, dq, q_len, stride_dqm, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr, dout_ptr, delta_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One program: delta = rowsum(dO * O) of BLOCK_M queries of one (sequence,
    # query head), which the one-pass backward reads (the two-pass one forms it in its dq pass).
    start_m, _, b, h, q_start, q_len, _, _ = _query_block(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqlen_q, seqlen_k,
                                                          num_heads, BLOCK_M, IS_VARLEN)
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    out = _load_rows(_head_base(out_ptr, b, h, q_start, stride_ob, stride_oh, stride_om), q_len, stride_om,
                     start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    dout = _load_rows(_head_base(dout_ptr, b, h, q_start, stride_dob, stride_doh, stride_dom), q_len, stride_dom,
                      start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    delta = tl.sum(dout.to(tl.float32) * out.to(tl.float32), 1)
    row_offset = tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
    tl.store(delta_ptr + row_offset + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv_tile(
    dk, dv, k, v, q_base, dout_base, lse_row_ptr, delta_row_ptr, dq_base, kpm_row_ptr, offs_n, start_m, masked,
    q_len, k_len, stride_qm, stride_dom, stride_dqm, bh, seqlen_k, softmax_scale, softcap, window_left, window_right,
    dropout_p, seed,
    HEAD_DIM: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, DQ_TRANSPOSED: tl.constexpr,
):
    # dk and dv plus the share of queries start_m.. of one query head (tiles transposed,
    # (BLOCK_N, BLOCK_M)), both unscaled, and with ATOMIC_DQ that tile's dq added to dq_base.
    # masked, as in _attn_bwd_dq_tile: the tile straddles the band's edge, q_len or k_len.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, q_len, stride_qm, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    dout = _load_rows(dout_base, q_len, stride_dom, start_m, BLOCK_M, HEAD_DIM, BLOCK_D)
    lse = _lse_log2(tl.load(lse_row_ptr + offs_m, mask=offs_m < q_len, other=0.0))
    delta = tl.load(delta_row_ptr + offs_m, mask=offs_m < q_len, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    scores_t, capped_t = _scores(qk_t, softmax_scale, softcap, HAS_SOFTCAP)
    if HAS_KPM:
        scores_t = tl.where(_key_kept(kpm_row_ptr, offs_n[:, None], k_len), scores_t, float("-inf"))
    if masked:
        allowed_t = _allowed(offs_m[None, :], offs_n[:, None], q_len, k_len, window_left, window_right,
                             kpm_row_ptr, HAS_BAND, False)
        scores_t = tl.where(allowed_t, scores_t, float("-inf"))
    probs_t = tl.exp2(scores_t - lse[None, :])
    # dv's product before dP's, and the softcap's derivative folded into the
    # probabilities before dP's too: the dropped probabilities and tanh's tile are
    # dead before dP's tile is live (a Hopper tile keeps 64 rows of dk and dv in registers).
    if HAS_DROPOUT:
        keep_t = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], seqlen_k, dropout_p)
        dropped_t = tl.where(keep_t, probs_t * (1.0 / (1.0 - dropout_p)), 0.0)
        dv += tl.dot(dropped_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
    else:
        dv += tl.dot(probs_t.to(dout.dtype), dout, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        probs_t = probs_t * (1.0 - capped_t * capped_t)
    dprobs_t = tl.dot(v, tl.trans(dout), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        dprobs_t = tl.where(keep_t, dprobs_t * (1.0 / (1.0 - dropout_p)), 0.0)
    dscores_t = (probs_t * (dprobs_t - delta[None, :])).to(q.dtype)
    if ATOMIC_DQ and DQ_TRANSPOSED:
        # dq^T = K^T dS^T: its rows are the head dim, 64 per warpgroup whatever
        # BLOCK_M is, so on sm_90 it is a wgmma (K^T a view of k in shared memory).
        # Before dk's product: fp32's 8x64 Hopper tile (tf32x3) fits in registers in
        # this order only; after it, it spills 40 bytes under dropout (compile gate).
        dq_t = tl.dot(tl.trans(k), dscores_t, input_precision=DOT_PRECISION) * softmax_scale  # (D, M)
        tl.atomic_add(dq_base + offs_m[None, :] * stride_dqm + cols[:, None], dq_t,
                      mask=(offs_m[None, :] < q_len) & (cols[:, None] < HEAD_DIM), sem="relaxed")
    dk += tl.dot(dscores_t, q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ and not DQ_TRANSPOSED:
        dq = tl.dot(tl.trans(dscores_t), k, input_precision=DOT_PRECISION) * softmax_scale  # (M, D)
        tl.atomic_add(dq_base + offs_m[:, None] * stride_dqm + cols[None, :], dq,
                      mask=(offs_m[:, None] < q_len) & (cols[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _add_dq_columns(dq_base, dscores, k_columns, offs_m, q_len, stride_dqm, softmax_scale, NUM_COLS: tl.constexpr,
                    BLOCK_COLS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # NUM_COLS columns of one tile's share of dq, softmax_scale * dS K, from dq_base on, added
    # atomically (relaxed) to the fp32 buffer; k_columns holds k's same columns, (BLOCK_N, BLOCK_COLS).
    dq = tl.dot(dscores, k_columns, input_precision=DOT_PRECISION) * softmax_scale  # (BLOCK_M, BLOCK_COLS)
    cols = tl.arange(0, BLOCK_COLS)
    tl.atomic_add(dq_base + offs_m[:, None] * stride_dqm + cols[None, :], dq,
                  mask=(offs_m[:, None] < q_len) & (cols[None, :] < NUM_COLS), sem="relaxed")


@triton.jit
def _attn_bwd_dkdv_head_major(
    q_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, k, v, k_base, kpm_row_ptr,
    stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_km,
    b, kv_head, q_start, q_len, k_len, start_n, offs_n, lo, hi, num_heads, group_size, seqlen_k,
    softmax_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The query loop of _attn_bwd_dkdv_kernel with head-dim-major accumulators,
    # as FlashAttention-3 does at head dim 256: dk^T and dv^T, (BLOCK_D, BLOCK_N)
    # fp32, whose rows are the head dim; returned unscaled, as the keys-major loop leaves dk and dv. A
    # wgmma gives each warpgroup 64 rows of its own; with the keys on the rows,
    # as the keys-major loop has them, 64 keys x 256 x 2 accumulators are 256
    # registers a thread. Here 256 head-dim rows split over two warpgroups, so
    # BLOCK_N can be small. The score tiles are query-major, (BLOCK_M, BLOCK_N),
    # BLOCK_M = 64 per warpgroup: S = Q K^T, dP = dO V^T, then dV^T += dO^T P and
    # dK^T += Q^T dS, with dO^T and Q^T views of the tiles in shared memory.
    # ATOMIC_DQ: dq = dS K, (BLOCK_M, 256) fp32, is too big for one accumulator
    # beside them, so it is formed and added DQ_COLS columns of the head dim at a time.
    DQ_COLS: tl.constexpr = 32  # 64 compiles too, with 34 registers fewer to spare under dropout
    dk_t = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    dv_t = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for g in range(group_size):
        h = kv_head * group_size + g
        q_base = _head_base(q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm)
        dout_base = _head_base(dout_ptr, b, h, q_start, stride_dob, stride_doh, stride_dom)
        row_offset = tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
        dq_base = _head_base(dq_ptr, b, h, q_start, stride_dqb, stride_dqh, stride_dqm)
        # q's and dO's tiles come by TMA, straight into shared memory, where every product reads
        # them: through registers (plain loads at num_stages=1) they take 64 a thread each, and the
        # accumulators spill. Zeros past the sequence's queries and past HEAD_DIM, as _load_rows gives.
        q_tiles = tl.make_tensor_descriptor(q_base, [q_len, HEAD_DIM], [stride_qm, 1], [BLOCK_M, BLOCK_D])
        dout_tiles = tl.make_tensor_descriptor(dout_base, [q_len, HEAD_DIM], [stride_dom, 1], [BLOCK_M, BLOCK_D])
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if HAS_DROPOUT:  # first: Philox's state is dead before q's and dO's tiles arrive
                keep = _dropout_keep(seed, b * num_heads + h, offs_m[:, None], offs_n[None, :], seqlen_k, dropout_p)
            q = q_tiles.load([start_m, 0])  # (BLOCK_M, BLOCK_D)
            lse = _lse_log2(tl.load(lse_ptr + row_offset + offs_m, mask=offs_m < q_len, other=0.0))
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            scores, capped = _scores(qk, softmax_scale, softcap, HAS_SOFTCAP)
            allowed = _allowed(offs_m[:, None], offs_n[None, :], q_len, k_len, window_left, window_right,
                               kpm_row_ptr, HAS_BAND, HAS_KPM)
            probs = tl.exp2(tl.where(allowed, scores, float("-inf")) - lse[:, None])
            dout = dout_tiles.load([start_m, 0])
            delta = tl.load(delta_ptr + row_offset + offs_m, mask=offs_m < q_len, other=0.0)
            # As in _attn_bwd_dkdv_kernel: dv's product first, and the softcap's derivative folded into
            # the probabilities, so the dropped probabilities and tanh's tile die before dP's is live.
            if HAS_DROPOUT:
                dropped = tl.where(keep, probs * (1.0 / (1.0 - dropout_p)), 0.0)
                dv_t += tl.dot(tl.trans(dout), dropped.to(dout.dtype), input_precision=DOT_PRECISION)
            else:
                dv_t += tl.dot(tl.trans(dout), probs.to(dout.dtype), input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:
                probs = probs * (1.0 - capped * capped)
            dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if HAS_DROPOUT:
                dprobs = tl.where(keep, dprobs * (1.0 / (1.0 - dropout_p)), 0.0)
            dscores = (probs * (dprobs - delta[:, None])).to(q.dtype)
            dk_t += tl.dot(tl.trans(q), dscores, input_precision=DOT_PRECISION)  # (BLOCK_D, BLOCK_N)
            if ATOMIC_DQ:
                # dq = dS K, DQ_COLS columns at a time: (BLOCK_M, DQ_COLS) fp32 is live at once, not
                # (BLOCK_M, 256). k's columns are reloaded per piece (BLOCK_N rows, from the cache).
                for piece in tl.static_range(BLOCK_D // DQ_COLS):
                    if piece * DQ_COLS < HEAD_DIM:  # padded head dims skip the pieces past HEAD_DIM
                        k_cols = _load_rows(k_base + piece * DQ_COLS, k_len, stride_km, start_n, BLOCK_N,
                                            HEAD_DIM - piece * DQ_COLS, DQ_COLS)  # (BLOCK_N, DQ_COLS)
                        _add_dq_columns(dq_base + piece * DQ_COLS, dscores, k_cols, offs_m, q_len, stride_dqm,
                                        softmax_scale, HEAD_DIM - piece * DQ_COLS, DQ_COLS, DOT_PRECISION)
    return dk_t, dv_t


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, kpm_ptr, cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km, stride_vb, stride_vh, stride_vm,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkm, stride_dvb, stride_dvh, stride_dvm,
    stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh, stride_kpm_b,
    seqlen_q, seqlen_k, num_heads, group_size,
    softmax_scale, softcap, window_left, window_right, dropout_p, seed,
    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_BAND: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQ_TRANSPOSED: tl.constexpr,
    HEAD_MAJOR: tl.constexpr, SPLIT_MASKS: tl.constexpr,
):
    # One program: dk and dv for BLOCK_N keys of one (sequence, kv head),
    # summed over the query heads of its group and every query that sees them.
    # Tiles are transposed, (BLOCK_N, BLOCK_M), so dk and dv come out of plain dots.
    # ATOMIC_DQ (the one-pass backward): also each tile's share of dq,
    # softmax_scale * dS K, added to dq_ptr, an fp32 buffer of zeros, by relaxed
    # atomics. The order of the adds varies from run to run: not bitwise repeatable.
    # HEAD_MAJOR (head dim 256's Hopper tiles): the same result from dk^T and dv^T
    # accumulators, see _attn_bwd_dkdv_head_major.
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    num_kv_heads = num_heads // group_size
    b = bkv // num_kv_heads
    kv_head = bkv % num_kv_heads
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, seqlen_q, seqlen_k, IS_VARLEN)
    if start_n >= k_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_base, v_base, kpm_row_ptr = _kv_bases(k_ptr, v_ptr, kpm_ptr, b, kv_head, k_start, stride_kb, stride_kh,
                                            stride_km, stride_vb, stride_vh, stride_vm, stride_kpm_b)
    k = _load_rows(k_base, k_len, stride_km, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(v_base, k_len, stride_vm, start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    # [lo, hi): the queries whose band reaches these keys.
    lo = 0
    hi = q_len
    if HAS_BAND:
        lo = tl.maximum(start_n - (k_len - q_len) - window_right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(start_n + BLOCK_N - (k_len - q_len) + window_left, q_len)

    if HEAD_MAJOR:
        dk_t, dv_t = _attn_bwd_dkdv_head_major(
            q_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, k, v, k_base, kpm_row_ptr,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
            stride_lb, stride_lh, stride_km,
            b, kv_head, q_start, q_len, k_len, start_n, offs_n, lo, hi, num_heads, group_size, seqlen_k,
            softmax_scale, softcap, window_left, window_right, dropout_p, seed,
            HEAD_DIM, HAS_BAND, HAS_KPM, HAS_SOFTCAP, HAS_DROPOUT, DOT_PRECISION, ATOMIC_DQ, BLOCK_D, BLOCK_M, BLOCK_N,
        )
        dk, dv = tl.trans(dk_t), tl.trans(dv_t)  # the keys back on the rows
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Of the query blocks, those whose band covers every key here (queries first_full.. up to
        # last_end) and below q_len need no position mask, unless the key block itself crosses k_len:
        # then every tile needs the key boundary.
        first_full = 0
        last_end = q_len
        if HAS_BAND:
            first_full = start_n + BLOCK_N - 1 - (k_len - q_len) - window_right
            last_end = tl.minimum(start_n - (k_len - q_len) + window_left + 1, q_len)
        last_end = tl.where(start_n + BLOCK_N <= k_len, last_end, 0)
        full_lo, full_hi = _unmasked_blocks(lo, hi, first_full, last_end, BLOCK_M)
        for g in range(group_size):
            h = kv_head * group_size + g
            q_base = _head_base(q_ptr, b, h, q_start, stride_qb, stride_qh, stride_qm)
            dout_base = _head_base(dout_ptr, b, h, q_start, stride_dob, stride_doh, stride_dom)
            row_offset = tl.cast(b, tl.int64) * stride_lb + tl.cast(h, tl.int64) * stride_lh + q_start
            dq_base = _head_base(dq_ptr, b, h, q_start, stride_dqb, stride_dqh, stride_dqm)
            for start_m in range(lo, hi, BLOCK_M):
                masked = True
                if SPLIT_MASKS:
                    masked = (start_m < full_lo) | (start_m >= full_hi)
                dk, dv = _attn_bwd_dkdv_tile(
                    dk, dv, k, v, q_base, dout_base, lse_ptr + row_offset, delta_ptr + row_offset, dq_base,
                    kpm_row_ptr, offs_n, start_m, masked, q_len, k_len, stride_qm, stride_dom, stride_dqm,
                    b * num_heads + h, seqlen_k, softmax_scale, softcap, window_left, window_right, dropout_p, seed,
                    HEAD_DIM, HAS_BAND, HAS_KPM, HAS_SOFTCAP, HAS_DROPOUT, DOT_PRECISION, ATOMIC_DQ, BLOCK_D,
                    BLOCK_M, DQ_TRANSPOSED)
    dk = dk * softmax_scale
    _store_rows(_head_base(dk_ptr, b, kv_head, k_start, stride_dkb, stride_dkh, stride_dkm), dk, k_len, stride_dkm,
                start_n, BLOCK_N, HEAD_DIM, BLOCK_D)
    _store_rows(_head_base(dv_ptr, b, kv_head, k_start, stride_dvb, stride_dvh, stride_dvm), dv, k_len, stride_dvm,
                start_n, BLOCK_N, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------
# Kernel specs: configs as data (see launch.py). Variants per kernel: 16-bit
# with head dims up to 128 or up to 256 (smaller tiles, or the accumulators
# spill), each with and without dropout (Philox keeps four 32-bit words per
# score in flight: dropout takes smaller tiles), and fp32. fp32 dots run as
# three TF32 tensor-core passes (tf32x3, close to fp32 accuracy): exact
# CUDA-core dots need each thread to hold whole rows of D and spill at any tile.
# Every config passes the compile gate on sm_80 and sm_90.
# ----------------------------------------------------------------------------

_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "tf32x3"}  # tf32: unused for 16-bit

# "bwd" is the one-pass backward: the dk/dv kernel with ATOMIC_DQ.
_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel,
            "bwd": _attn_bwd_dkdv_kernel}
# Argument types other than compile_case's defaults (pointers to the inputs' dtype, i32 scalars).
_ARG_TYPES = dict(lse_ptr="*fp32", delta_ptr="*fp32", kpm_ptr="*i8", cu_seqlens_q_ptr="*i32",
                  cu_seqlens_k_ptr="*i32", softmax_scale="fp32", softcap="fp32", dropout_p="fp32", seed="i64")


def _fwd_head_split(head_dim: int) -> dict[str, int]:
    """The forward's head-dim pieces: BLOCK_D and BLOCK_D_TAIL, both powers of two (Triton's tensor shapes).

    A head dim under 128 that is not a power of two splits into the largest power of two below it
    and a tail when the tail is a power of two of at least 16, a dot's shortest reduction:
    80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16. The score product then reduces over the head dim
    exactly and P V is exactly as wide. Any other (72 = 64 + 8, 112 = 64 + 48) is padded to the next
    power of two, one piece (tail 0), as powers of two are. So are head dims over 128: the d256
    specs' tiles are sized for one piece, and 192 = 128 + 64 spills on sm_80 at their 64x32 tile
    (the compile gate, 8 bytes). The backward pads always.
    """
    padded = triton.next_power_of_2(head_dim)
    head = padded // 2
    tail = head_dim - head
    if head_dim == padded or padded > 128 or tail < 16 or tail & (tail - 1):
        return dict(BLOCK_D=padded, BLOCK_D_TAIL=0)
    return dict(BLOCK_D=head, BLOCK_D_TAIL=tail)


def _case(kernel: str, dtype: torch.dtype, head_dim: int, **flags: bool) -> CompileCase:
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), DOT_PRECISION=_DOT_PRECISION[dtype],
                      IS_VARLEN=False, HAS_BAND=False, HAS_KPM=False, HAS_SOFTCAP=False, HAS_DROPOUT=False)
    if kernel in ("dkdv", "bwd"):
        constexprs["ATOMIC_DQ"] = kernel == "bwd"
    if kernel == "fwd":
        constexprs["USE_TMA"] = False
        constexprs.update(_fwd_head_split(head_dim))
    constexprs.update({name.upper(): value for name, value in flags.items()})
    label = ",".join([TRITON_DTYPE[dtype], f"d{head_dim}"]
                     + [name.removeprefix("has_").removeprefix("use_") for name, value in flags.items() if value])
    # The one-pass backward adds dq up in an fp32 buffer; the dq pass writes it in the inputs' dtype.
    types = dict(_ARG_TYPES, dq_ptr="*fp32") if kernel == "bwd" else _ARG_TYPES
    return compile_case(_KERNELS[kernel], label, dtype=dtype, types=types, constexprs=constexprs,
                        tensor_cores=True)


def _cases(kernel: str, variant: str) -> list[CompileCase]:
    # The plainest and the heaviest specializations of each variant.
    masks = dict(has_band=True, has_kpm=True, has_softcap=True)
    case = functools.partial(_case, kernel)
    cases = {
        "d128": [case(torch.bfloat16, 128, has_band=True), case(torch.float16, 128, **masks),
                 case(torch.bfloat16, 96, is_varlen=True, has_band=True)],
        "d128_dropout": [case(torch.float16, 128, **masks, has_dropout=True),
                         case(torch.bfloat16, 64, has_dropout=True)],
        "d256": [case(torch.bfloat16, 256, has_band=True), case(torch.float16, 256, **masks)],
        "d256_dropout": [case(torch.float16, 256, **masks, has_dropout=True)],
        "fp32": [case(torch.float32, 64, **masks, has_dropout=True), case(torch.float32, 32, has_band=True)],
    }[variant]
    if kernel == "fwd":  # the forward's TMA loads, which its launcher picks for aligned 16-bit inputs on sm_90
        cases += {
            "d128": [case(torch.bfloat16, 128, has_band=True, use_tma=True),
                     case(torch.bfloat16, 96, is_varlen=True, has_band=True, use_tma=True)],
            "d128_dropout": [case(torch.float16, 128, **masks, has_dropout=True, use_tma=True)],
            "d256": [case(torch.bfloat16, 256, has_band=True, use_tma=True)],
            "d256_dropout": [case(torch.float16, 256, **masks, has_dropout=True, use_tma=True)],
            "fp32": [],
        }[variant]
        # Head dims the forward splits in two pieces (_fwd_head_split; d128's d96 cases above are 64 + 32).
        cases += {
            "d128": [],
            "d128_dropout": [case(torch.float16, 80, **masks, has_dropout=True),
                             case(torch.float16, 80, **masks, has_dropout=True, use_tma=True)],
            "d256": [],
            "d256_dropout": [],
            "fp32": [case(torch.float32, 48, **masks, has_dropout=True)],
        }[variant]
    return cases


def _config(block_m: int, block_n: int, warps: int, stages: int, **knobs) -> triton.Config:
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, **knobs), num_warps=warps, num_stages=stages)


# The backward's configs say whether its tiles inside the band skip the position mask
# (SPLIT_MASKS, a branch per tile): not on tiles already at the register limit, where
# the branch spills (see the compile gate); those test positions on every tile.
def _dq_config(block_m: int, block_n: int, warps: int, stages: int, split_masks: bool = True) -> triton.Config:
    return _config(block_m, block_n, warps, stages, SPLIT_MASKS=split_masks)


def _bwd_config(block_m: int, block_n: int, warps: int, stages: int, dq_transposed: bool = False,
                head_major: bool = False, split_masks: bool = True) -> triton.Config:
    # The dk/dv kernel's configs also choose the orientation of the one-pass backward's dq
    # product: (D, BLOCK_M) on Hopper tiles, where its rows must be 64 per warpgroup; (BLOCK_M, D)
    # on sm_80 ones, where the transposed product spills and repeats work. head_major: dk^T and
    # dv^T accumulators (head dim 256 on Hopper, _attn_bwd_dkdv_head_major), whose dq is its own
    # and which tests positions on every tile (split_masks does not apply to it).
    if dq_transposed and head_major:
        raise ValueError("a head-major dk/dv tile forms dq its own way: dq_transposed must be False")
    return _config(block_m, block_n, warps, stages, DQ_TRANSPOSED=dq_transposed, HEAD_MAJOR=head_major,
                   SPLIT_MASKS=split_masks and not head_major)


_CONFIGS = {
    ("fwd", "d128"): [_config(64, 64, 4, 3), _config(64, 64, 8, 3), _config(128, 64, 8, 3)],
    ("fwd", "d128_dropout"): [_config(64, 32, 4, 3)],
    ("fwd", "d256"): [_config(64, 32, 4, 2), _config(32, 32, 4, 2)],
    ("fwd", "d256_dropout"): [_config(64, 16, 4, 2), _config(32, 32, 4, 2)],
    ("fwd", "fp32"): [_config(64, 16, 4, 1), _config(16, 16, 4, 1), _config(64, 32, 4, 1), _config(128, 32, 8, 1)],
    ("dq", "d128"): [_dq_config(64, 32, 4, 2), _dq_config(32, 32, 4, 2), _dq_config(64, 64, 4, 2),
                     _dq_config(128, 32, 8, 2, split_masks=False)],
    ("dq", "d128_dropout"): [_dq_config(64, 32, 4, 2), _dq_config(32, 32, 4, 2),
                             _dq_config(128, 32, 8, 2, split_masks=False)],
    ("dq", "d256"): [_dq_config(64, 16, 4, 1, split_masks=False), _dq_config(32, 64, 8, 1)],
    ("dq", "d256_dropout"): [_dq_config(32, 64, 8, 1)],
    ("dq", "fp32"): [_dq_config(64, 16, 4, 1)],
    ("dkdv", "d128"): [_bwd_config(16, 128, 8, 2, split_masks=False), _bwd_config(64, 32, 8, 2)],
    ("dkdv", "d128_dropout"): [_bwd_config(32, 32, 8, 2)],
    ("dkdv", "d256"): [_bwd_config(32, 32, 8, 1)],
    ("dkdv", "d256_dropout"): [_bwd_config(16, 32, 8, 1)],
    ("dkdv", "fp32"): [_bwd_config(16, 16, 4, 1)],
    ("bwd", "d128"): [_bwd_config(32, 32, 8, 2), _bwd_config(16, 32, 8, 2)],
    ("bwd", "d128_dropout"): [_bwd_config(16, 32, 8, 2), _bwd_config(16, 32, 4, 2), _bwd_config(16, 16, 4, 2)],
    ("bwd", "d256"): [_bwd_config(16, 32, 8, 1)],
    ("bwd", "d256_dropout"): [_bwd_config(16, 32, 8, 1), _bwd_config(16, 16, 8, 1)],
    ("bwd", "fp32"): [_bwd_config(16, 16, 4, 1)],
}
# Hopper tiles, for sm_90 only (KernelSpec.hopper_only); the first of each list is its spec's
# hopper_config, ready for every case. Every product but the two-pass dq's and, where noted, the
# one-pass dq's is a 64-row-per-warpgroup wgmma, in the transposed orientation the dk/dv kernel
# computes in (S^T = K Q^T, dP^T = V dO^T: BLOCK_N keys, 64 per warpgroup; dV += P^T dO, dK += dS^T Q
# with P^T, dS^T from registers). As sm_80's mma they spill (see the compile gate), so sm_80 keeps
# the tiles above. Their 16-query tiles are what leaves room for 64 rows of dk and dv (fp32) per
# warpgroup and Philox's state. The forward's 128x128 on 8 warps is FA3's tile at head dim 128.
# A tile at num_stages 2 or 3 loads its next blocks by cp.async while it computes (software
# pipelining); num_stages 1 issues none. Each such variant is listed where it passes the gate on
# every case; the others spill at num_stages 2 (dk/dv with dropout: 8 bytes; fp32 dk/dv: 64; the
# one-pass backward with dropout: 40) and keep num_stages 1.
_HOPPER_CONFIGS: dict[tuple[str, str], list[triton.Config]] = {
    ("fwd", "d128"): [_config(128, 128, 8, 2), _config(128, 128, 8, 3)],
    ("dq", "d256_dropout"): [_dq_config(128, 16, 8, 1), _dq_config(128, 16, 8, 2), _dq_config(128, 16, 8, 3)],
    ("dkdv", "d128_dropout"): [_bwd_config(16, 64, 4, 1, split_masks=False)],
    ("dkdv", "fp32"): [_bwd_config(16, 64, 4, 1)],
    ("bwd", "d128"): [_bwd_config(16, 128, 8, 1, dq_transposed=True), _bwd_config(16, 128, 8, 2, dq_transposed=True)],
    # dq's product stays (BLOCK_M, D), sm_80-style HMMA: transposed, it spills with Philox's state.
    ("bwd", "d128_dropout"): [_bwd_config(16, 128, 8, 1)],
    # fp32 (tf32x3) keeps 64 keys x 64 of dk and dv a warpgroup beside the triple products' operands:
    # 8 queries (S^T 64x8, dq^T a 64-row wgmma) is what leaves room for Philox's state; 16 spill
    # (72-88 bytes). At head dims under 64 dq^T's rows are half used (work 2.0 at d32).
    ("bwd", "fp32"): [_bwd_config(8, 64, 4, 1, dq_transposed=True), _bwd_config(8, 64, 4, 2, dq_transposed=True)],
    # Head dim 256, head-major instead (_attn_bwd_dkdv_head_major): S = Q K^T and dP = dO V^T with
    # 64 queries per warpgroup, dV^T += dO^T P and dK^T += Q^T dS with 128 head-dim rows per
    # warpgroup, dq = dS K in 32-column pieces. 32 keys spill with the masks and softcap (24 bytes;
    # 120-128 with dropout); 8 keys leave dq's dot a reduction shorter than a dot takes (16).
    # 64 queries on 4 warps at 2 stages double-buffers q's and dO's TMA loads.
    **{(kernel, variant): [_bwd_config(128, 16, 8, 1, head_major=True), _bwd_config(64, 16, 4, 2, head_major=True)]
       for kernel in ("dkdv", "bwd") for variant in ("d256", "d256_dropout")},
}
# Not keyed on sequence lengths: packed batches change their maximum length every step.
_AUTOTUNE_KEY = ["HEAD_DIM", "IS_VARLEN", "HAS_BAND", "HAS_KPM", "HAS_SOFTCAP", "HAS_DROPOUT"]


def _register(kernel: str, variant: str) -> KernelSpec:
    configs, hopper = _CONFIGS[kernel, variant], _HOPPER_CONFIGS.get((kernel, variant), [])
    return register(KernelSpec(
        name=f"attention_{kernel}_{variant}",
        kernel=_KERNELS[kernel],
        configs=configs + hopper,
        key=_AUTOTUNE_KEY + ["USE_TMA"] if kernel == "fwd" else _AUTOTUNE_KEY,
        compile_cases=_cases(kernel, variant),
        # The one-pass backward adds dq into a buffer: autotuning trials must each start from zeros.
        reset_to_zero=("dq_ptr",) if kernel == "bwd" else (),
        hopper_config=len(configs) if hopper else None,
        hopper_only=tuple(range(len(configs), len(configs) + len(hopper))),
    ))


_SPECS = {(kernel, variant): _register(kernel, variant) for kernel, variant in _CONFIGS}


# delta = rowsum(dO * O) before the one-pass backward: elementwise, no tensor cores.
_DELTA_SPEC = register(KernelSpec(
    name="attention_delta",
    kernel=_attn_bwd_delta_kernel,
    configs=[triton.Config(dict(BLOCK_M=32), num_warps=4, num_stages=1)],
    key=["HEAD_DIM", "IS_VARLEN"],
    compile_cases=[compile_case(_attn_bwd_delta_kernel, f"{TRITON_DTYPE[dtype]},d{head_dim}" + (",is_varlen" * varlen),
                                dtype=dtype, types=_ARG_TYPES, tensor_cores=False,
                                constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                                                IS_VARLEN=varlen))
                   for dtype, head_dim, varlen in ((torch.bfloat16, 256, False), (torch.float16, 96, True),
                                                   (torch.float32, 64, False))],
))


def _spec(kernel: str, dtype: torch.dtype, flags: dict) -> KernelSpec:
    """The spec for a launch with these constexpr flags (see _shared_args)."""
    if dtype == torch.float32:
        return _SPECS[kernel, "fp32"]
    variant = ("d128" if flags["HEAD_DIM"] <= 128 else "d256") + ("_dropout" if flags["HAS_DROPOUT"] else "")
    return _SPECS[kernel, variant]


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


def _bhm_strides(t: torch.Tensor, problem: _Problem) -> tuple[int, int, int]:
    """(batch, head, position) strides: (B, H, S, D) padded, or (T, H, D) packed (batch stride 0)."""
    if problem.varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(problem: _Problem, lse: torch.Tensor) -> tuple[int, int]:
    """(batch, head) strides of the log-sum-exp; its positions are contiguous."""
    return (0, lse.stride(0)) if problem.varlen else (lse.stride(0), lse.stride(1))


def _lse_shape(problem: _Problem, q: torch.Tensor) -> tuple[int, ...]:
    if problem.varlen:
        return (problem.num_heads, q.shape[0])  # (Hq, T), as flash-attn
    return (problem.batch, problem.num_heads, problem.seqlen_q)


def _reads_by_tma(spec: KernelSpec) -> bool:
    """Whether a config ``launch`` may run ``spec`` at here is a head-major dk/dv tile, which reads q and dO by TMA."""
    return any(config.kwargs.get("HEAD_MAJOR") for config in candidate_configs(spec))


def _tma_ready(t: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """``t``, or a contiguous copy where TMA could not read it (see _tma_aligned).

    PyTorch's allocations and any layout of head dims that are multiples of 8
    are aligned; a view at an odd offset may not be.
    """
    return t if _tma_aligned((t,), problem) else t.clone(memory_format=torch.contiguous_format)


def _shared_args(problem: _Problem, opts: _Options, seed: int, q: torch.Tensor) -> tuple[list, dict]:
    """Arguments after the strided tensors: mask strides, shapes, options, and the constexpr flags."""
    left, right = opts.band if opts.band is not None else (_UNBOUNDED, _UNBOUNDED)
    kpm = problem.key_padding_mask
    scalars = [
        kpm.stride(0) if kpm is not None else 0,
        problem.seqlen_q, problem.seqlen_k, problem.num_heads, problem.num_heads // problem.num_kv_heads,
        opts.softmax_scale, opts.softcap or 1.0, left, right, opts.dropout_p, seed,
    ]
    flags = dict(
        HEAD_DIM=problem.head_dim, IS_VARLEN=problem.varlen, HAS_BAND=opts.band is not None,
        HAS_KPM=kpm is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_DROPOUT=opts.dropout_p > 0,
        DOT_PRECISION=_DOT_PRECISION[q.dtype], BLOCK_D=triton.next_power_of_2(problem.head_dim),
    )
    return scalars, flags


def _mask_pointers(problem: _Problem, q: torch.Tensor) -> list[torch.Tensor]:
    # Unused pointer arguments get q: the kernels never read them.
    kpm = problem.key_padding_mask
    kpm = kpm.view(torch.int8) if kpm is not None else q
    return [kpm, problem.cu_seqlens_q if problem.varlen else q, problem.cu_seqlens_k if problem.varlen else q]


def _tma_aligned(tensors, problem: _Problem) -> bool:
    """Whether a TMA descriptor may read each (sequence, head) of these tensors: its first row 16-byte
    aligned (the base, and every batch, head and position stride, in bytes), its rows apart by a
    nonzero multiple of 16 bytes, its D elements contiguous."""
    for t in tensors:
        strides = _bhm_strides(t, problem)
        if t.stride(-1) != 1 or strides[2] <= 0 or t.data_ptr() % 16:
            return False
        if any(stride * t.element_size() % 16 for stride in strides):
            return False
    return True


def _use_tma(q, k, v, problem: _Problem) -> bool:
    """The forward loads q, k, v through TMA descriptors: 16-bit inputs on sm_90 and newer, aligned as
    TMA needs. Everything else (sm_80, fp32, other layouts, the interpreter) takes the pointer path."""
    if not q.is_cuda or q.dtype == torch.float32 or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return _tma_aligned((q, k, v), problem)


@contextlib.contextmanager
def _tma_scratch(device: torch.device):
    """Descriptors built in a kernel need global scratch at launch, from triton.set_allocator's
    allocator. When the caller has set none, torch's caching allocator serves this launch alone."""
    current = _allocation._allocator  # a ContextVar: set here, reset after, nothing leaks to the caller
    if not isinstance(current.get(), _allocation.NullAllocator):
        yield
        return
    token = current.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        current.reset(token)


def _triton_fwd(q, k, v, problem: _Problem, opts: _Options, seed: int):
    out = torch.empty_like(q)  # keeps q's memory layout: HF's (B, S, H, D) transposed views stay free
    lse = torch.empty(_lse_shape(problem, q), dtype=torch.float32, device=q.device)
    scalars, flags = _shared_args(problem, opts, seed, q)
    use_tma = _use_tma(q, k, v, problem)
    with _tma_scratch(q.device) if use_tma else contextlib.nullcontext():
        launch(
            _spec("fwd", q.dtype, flags),
            lambda meta: (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.num_heads),
            q, k, v, out, lse, *_mask_pointers(problem, q),
            *_bhm_strides(q, problem), *_bhm_strides(k, problem), *_bhm_strides(v, problem),
            *_bhm_strides(out, problem), *_lse_strides(problem, lse),
            *scalars, **dict(flags, **_fwd_head_split(problem.head_dim)), USE_TMA=use_tma,
        )
    return out, lse


def _triton_bwd(dout, q, k, v, out, lse, problem: _Problem, opts: _Options, seed: int, deterministic: bool):
    if deterministic:
        return _triton_bwd_two_pass(dout, q, k, v, out, lse, problem, opts, seed)
    return _triton_bwd_one_pass(dout, q, k, v, out, lse, problem, opts, seed)


def _triton_bwd_one_pass(dout, q, k, v, out, lse, problem: _Problem, opts: _Options, seed: int):
    """delta, then one pass per key block: dk and dv in registers, dq added atomically (5 GEMM-equivalents)."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros_like(q, dtype=torch.float32)  # the atomics' fp32 buffer, in q's layout
    delta = torch.empty_like(lse)
    scalars, flags = _shared_args(problem, opts, seed, q)
    spec = _spec("bwd", q.dtype, flags)
    if _reads_by_tma(spec):
        q, dout = _tma_ready(q, problem), _tma_ready(dout, problem)
    lse_strides = _lse_strides(problem, lse)
    strides = {name: _bhm_strides(t, problem) for name, t in
               dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv).items()}
    launch(
        _DELTA_SPEC,
        lambda meta: (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.num_heads),
        out, dout, delta, *_mask_pointers(problem, q)[1:],
        *strides["out"], *strides["dout"], *lse_strides, problem.seqlen_q, problem.seqlen_k, problem.num_heads,
        HEAD_DIM=flags["HEAD_DIM"], IS_VARLEN=flags["IS_VARLEN"], BLOCK_D=flags["BLOCK_D"],
    )
    if k.numel() > 0:  # no keys: dq stays 0 and dk, dv are empty (a grid of 0 programs is not launched)
        with _tma_scratch(q.device) if _reads_by_tma(spec) else contextlib.nullcontext():
            launch(
                spec,
                lambda meta: (triton.cdiv(problem.seqlen_k, meta["BLOCK_N"]), problem.batch * problem.num_kv_heads),
                q, k, v, dout, lse, delta, dk, dv, dq, *_mask_pointers(problem, q),
                *strides["q"], *strides["k"], *strides["v"], *strides["dout"], *strides["dk"], *strides["dv"],
                *strides["dq"], *lse_strides, *scalars, **flags, ATOMIC_DQ=True,
            )
    return dq.to(q.dtype), dk, dv


def _triton_bwd_two_pass(dout, q, k, v, out, lse, problem: _Problem, opts: _Options, seed: int):
    """A dq pass, then a dk/dv pass: no atomics, bitwise repeatable (7 GEMM-equivalents)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    scalars, flags = _shared_args(problem, opts, seed, q)
    dkdv_spec = _spec("dkdv", q.dtype, flags)
    if _reads_by_tma(dkdv_spec):
        q, dout = _tma_ready(q, problem), _tma_ready(dout, problem)
    lse_strides = _lse_strides(problem, lse)
    strides = {name: _bhm_strides(t, problem) for name, t in
               dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv).items()}
    launch(
        _spec("dq", q.dtype, flags),
        lambda meta: (triton.cdiv(problem.seqlen_q, meta["BLOCK_M"]), problem.batch * problem.num_heads),
        q, k, v, out, dout, lse, delta, dq, *_mask_pointers(problem, q),
        *strides["q"], *strides["k"], *strides["v"], *strides["out"], *strides["dout"], *strides["dq"],
        *lse_strides, *scalars, **flags,
    )
    if k.numel() == 0:  # no keys: dk and dv are empty, and a grid of 0 programs is not launched
        return dq, dk, dv
    with _tma_scratch(q.device) if _reads_by_tma(dkdv_spec) else contextlib.nullcontext():
        launch(
            dkdv_spec,
            lambda meta: (triton.cdiv(problem.seqlen_k, meta["BLOCK_N"]), problem.batch * problem.num_kv_heads),
            q, k, v, dout, lse, delta, dk, dv, dk, *_mask_pointers(problem, q),  # dk: a dq_ptr it never reads
            *strides["q"], *strides["k"], *strides["v"], *strides["dout"], *strides["dk"], *strides["dv"],
            0, 0, 0, *lse_strides, *scalars, **flags, ATOMIC_DQ=False,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------
# The PyTorch path (CPU without the interpreter): the same algorithm over
# blocks of queries, so memory is O(block * Sk), never O(Sq * Sk). Its dropout
# bits come from torch's generator, seeded per block: repeatable, but not the
# same bits as the Triton kernels' Philox.
# ----------------------------------------------------------------------------

_TORCH_BLOCK_ELEMENTS = 1 << 22  # scores per query block, over all heads: 16 MiB in fp32


def _torch_blocks(q, k):
    """Query blocks [start, stop) whose (B, H, block, Sk) scores stay under the budget."""
    batch, heads, seqlen_q = q.shape[:3]
    rows = max(1, _TORCH_BLOCK_ELEMENTS // max(1, batch * heads * k.shape[2]))
    return [(start, min(start + rows, seqlen_q)) for start in range(0, seqlen_q, rows)]


def _torch_block_scores(q_block, k, start, seqlen_q, key_padding_mask, opts, seed, generator_key):
    """Masked scores (B, Hkv, G, rows, Sk) fp32 of one query block (-inf where not allowed), the softcap's
    tanh (None without one), and the dropout keep mask (None without dropout)."""
    scores = q_block @ k.transpose(-1, -2) * opts.softmax_scale
    capped = None
    if opts.softcap is not None:
        capped = torch.tanh(scores / opts.softcap)
        scores = capped * opts.softcap
    rows = torch.arange(start, start + q_block.shape[3], device=q_block.device)
    allowed = _allowed_ref(seqlen_q, k.shape[-2], opts.band, key_padding_mask, q_block.device, rows)
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))  # (B, 1, 1, rows, Sk) broadcast
    return scores, capped, _torch_keep(scores.shape, opts, seed, generator_key + (start,), q_block.device)


def _torch_keep(shape, opts, seed, key, device):
    if opts.dropout_p == 0:
        return None
    generator = torch.Generator(device=device).manual_seed(hash((seed,) + key) & ((1 << 63) - 1))
    return torch.rand(shape, generator=generator, device=device) >= opts.dropout_p


def _grouped(t, num_kv_heads):
    """(B, Hq, S, D) -> (B, Hkv, G, S, D) fp32: query heads grouped under their kv head, no copy of k/v."""
    batch, heads, seqlen, dim = t.shape
    return t.float().reshape(batch, num_kv_heads, heads // num_kv_heads, seqlen, dim)


def _torch_dense_fwd(q, k, v, key_padding_mask, opts, seed, generator_key):
    # q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D)
    num_kv_heads = k.shape[1]
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # (B, Hkv, 1, Sk, D)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for start, stop in _torch_blocks(q, k):
        q_block = _grouped(q[:, :, start:stop], num_kv_heads)
        scores, _, keep = _torch_block_scores(q_block, kf, start, q.shape[2], key_padding_mask, opts, seed,
                                             generator_key)
        block_lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G, rows); -inf where no key is seen
        probs = torch.exp(scores - _finite_lse(block_lse)[..., None])
        if keep is not None:
            probs = probs * keep / (1.0 - opts.dropout_p)
        out[:, :, start:stop] = (probs @ vf).flatten(1, 2).to(q.dtype)
        lse[:, :, start:stop] = block_lse.flatten(1, 2)
    return out, lse


def _finite_lse(lse):
    # Rows that see no key: +inf makes every probability exp(-inf) = 0.
    return torch.where(lse == float("-inf"), float("inf"), lse)


def _torch_dense_bwd(dout, q, k, v, out, lse, key_padding_mask, opts, seed, generator_key):
    num_kv_heads = k.shape[1]
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for start, stop in _torch_blocks(q, k):
        q_block = _grouped(q[:, :, start:stop], num_kv_heads)
        dout_block = _grouped(dout[:, :, start:stop], num_kv_heads)
        scores, capped, keep = _torch_block_scores(q_block, kf, start, q.shape[2], key_padding_mask, opts, seed,
                                                  generator_key)
        block_lse = _finite_lse(lse[:, :, start:stop].reshape(scores.shape[:-1]))
        probs = torch.exp(scores - block_lse[..., None])
        delta = (dout_block * _grouped(out[:, :, start:stop], num_kv_heads)).sum(-1, keepdim=True)
        dprobs = dout_block @ vf.transpose(-1, -2)
        dropped = probs
        if keep is not None:
            dropped = probs * keep / (1.0 - opts.dropout_p)
            dprobs = dprobs * keep / (1.0 - opts.dropout_p)
        dv += (dropped.transpose(-1, -2) @ dout_block).sum(2)
        dscores = probs * (dprobs - delta) * opts.softmax_scale
        if capped is not None:
            dscores = dscores * (1.0 - capped * capped)
        dq[:, :, start:stop] = (dscores @ kf).flatten(1, 2).to(q.dtype)
        dk += (dscores.transpose(-1, -2) @ q_block).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _packed_sequences(problem: _Problem):
    """(index, q slice, k slice) per packed sequence; host reads are fine on the CPU path."""
    cu_q, cu_k = problem.cu_seqlens_q.tolist(), problem.cu_seqlens_k.tolist()
    return [(i, slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])) for i in range(problem.batch)]


def _as_batch(t):
    return t.transpose(0, 1)[None]  # (T, H, D) -> (1, H, T, D), a view


def _torch_fwd(q, k, v, problem: _Problem, opts: _Options, seed: int):
    if not problem.varlen:
        return _torch_dense_fwd(q, k, v, problem.key_padding_mask, opts, seed, ())
    out = torch.empty_like(q)
    lse = torch.empty(_lse_shape(problem, q), dtype=torch.float32, device=q.device)
    for index, rows_q, rows_k in _packed_sequences(problem):
        seq_out, seq_lse = _torch_dense_fwd(_as_batch(q[rows_q]), _as_batch(k[rows_k]), _as_batch(v[rows_k]), None,
                                            opts, seed, (index,))
        out[rows_q] = seq_out[0].transpose(0, 1)
        lse[:, rows_q] = seq_lse[0]
    return out, lse


def _torch_bwd(dout, q, k, v, out, lse, problem: _Problem, opts: _Options, seed: int):
    if not problem.varlen:
        return _torch_dense_bwd(dout, q, k, v, out, lse, problem.key_padding_mask, opts, seed, ())
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for index, rows_q, rows_k in _packed_sequences(problem):
        grads = _torch_dense_bwd(_as_batch(dout[rows_q]), _as_batch(q[rows_q]), _as_batch(k[rows_k]),
                                 _as_batch(v[rows_k]), _as_batch(out[rows_q]), lse[None, :, rows_q], None, opts,
                                 seed, (index,))
        for full, part, rows in zip((dq, dk, dv), grads, (rows_q, rows_k, rows_k)):
            full[rows] = part[0].transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, problem: _Problem, opts: _Options):
        # A fresh seed per call from torch's (CPU) generator: torch.manual_seed
        # makes runs repeatable, and drawing it needs no device sync.
        seed = int(torch.randint(1 << 32, 1 << 62, ()).item()) if opts.dropout_p > 0 else 0
        if use_triton(q):
            out, lse = _triton_fwd(q, k, v, problem, opts, seed)
        else:
            out, lse = _torch_fwd(q, k, v, problem, opts, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.opts, ctx.seed = problem, opts, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @autocast_off
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:  # the kernels read rows of D contiguous elements
            dout = dout.contiguous()
        if use_triton(q):
            deterministic = ctx.opts.deterministic
            if deterministic is None:  # read when the backward runs, as PyTorch's own kernels do
                deterministic = torch.are_deterministic_algorithms_enabled()
            dq, dk, dv = _triton_bwd(dout, q, k, v, out, lse, ctx.problem, ctx.opts, ctx.seed, deterministic)
        else:
            dq, dk, dv = _torch_bwd(dout, q, k, v, out, lse, ctx.problem, ctx.opts, ctx.seed)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check_qkv(q, k, v, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != rank:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k must have the same head dim, got {head_dim} and {k.shape[-1]}")
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(f"head dim must be a multiple of 8 from {MIN_HEAD_DIM} to {MAX_HEAD_DIM} "
                         f"(32, 64, 80, 96, 128 and 256 are tested), got {head_dim}")
    if q.dtype == torch.float32 and head_dim > MAX_FP32_HEAD_DIM:
        # The backward's fp32 tiles of 128 columns spill registers at any tile size (see the compile gate).
        raise ValueError(f"float32 attention supports head dims up to {MAX_FP32_HEAD_DIM}, got {head_dim}: "
                         f"use float16 or bfloat16")


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"the query heads ({num_heads}) must be a multiple of the key/value heads ({num_kv_heads})")


def _options(head_dim, causal, softmax_scale, dropout_p, window, softcap, deterministic) -> _Options:
    """The options as the kernels take them. Each number is checked for its range: an infinite or NaN scale or
    softcap turns every score into NaN, and dropout_p = 1 divides by zero."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    softmax_scale = check_number("softmax_scale", softmax_scale, above=0.0)
    dropout_p = check_number("dropout_p", dropout_p, at_least=0.0, below=1.0)
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be (left, right) ints >= 0, or -1 for no limit, got {window!r}")
        window = tuple(check_int(f"window[{side}]", w, at_least=-1) for side, w in enumerate(window))
        if window == (-1, -1):
            window = None
    if softcap is not None:
        softcap = check_number("softcap", softcap, above=0.0)
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool or None, got {deterministic!r}")
    return _Options(softmax_scale, _band(bool(causal), window), softcap, dropout_p, deterministic)


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels read each head's D elements as one contiguous row; any other layout is kept as it is.
    return t if t.stride(-1) == 1 else t.contiguous()


def _result(q, k, v, problem, opts, return_lse):
    if q.numel() == 0:  # nothing to compute, and a grid of 0 programs is not launched
        out, lse = q * 0, torch.full(_lse_shape(problem, q), float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    out, lse = FlashAttentionFunction.apply(_unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v),
                                            problem, opts)
    return (out, lse) if return_lse else out


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    deterministic: bool | None = None,
):
    """Attention ``softmax(q k^T * softmax_scale) v`` without an (Sq, Sk) matrix in memory.

    Args:
        q: (B, Hq, Sq, D) float16, bfloat16 or float32 (D <= 64; on CUDA fp32
            dots run as three TF32 passes, close to fp32 accuracy, and slowly:
            use 16-bit). The layout Hugging Face models use; any strides with
            the last one 1 (e.g. a transposed (B, S, H, D) tensor) are read as they are.
        k, v: (B, Hkv, Sk, D), same dtype and device. Hq must be a multiple of
            Hkv (grouped-query / multi-query attention); k and v are never
            repeated, and their gradients are summed over the query heads of
            each group.
        causal: query i sees keys j <= i + Sk - Sq. When Sq != Sk the mask is
            aligned to the bottom right, as in FlashAttention 2: the last query
            sees the last key, and with Sq > Sk the first Sq - Sk queries see
            nothing (their output is 0).
        softmax_scale: a finite number > 0; default 1 / sqrt(D).
        key_padding_mask: (B, Sk) bool, True = keep (BERT-style padded batches).
            A query row that sees no key gives output 0 and zero gradients.
        dropout_p: in [0, 1), dropout on the attention probabilities. The bits come from a
            counter-based generator keyed by a seed drawn from torch's default
            (CPU) generator, so ``torch.manual_seed`` makes runs repeatable and
            the backward regenerates the forward's mask. The PyTorch (CPU)
            path draws different bits from the Triton path.
        window: (left, right) sliding window: query i sees keys j with
            i' - left <= j <= i' + right, where i' = i + Sk - Sq; -1 is no
            limit on that side. Combined with ``causal``, right is at most 0.
        softcap: None, or a finite number > 0: scores become
            ``softcap * tanh(scores / softcap)`` before the softmax (Gemma 2).
        return_lse: also return the (B, Hq, Sq) fp32 log-sum-exp of the scores
            (natural log, -inf for rows that see no key); it has no gradient.
        deterministic: which backward the Triton kernels run. False: one pass
            over the keys that adds dq up with fp32 atomics (5 GEMM-equivalents;
            the order of the additions, so the last bits of dq, vary from run to
            run). True: a dq pass and a dk/dv pass, bitwise repeatable, at 7.
            None (default): True exactly when
            ``torch.are_deterministic_algorithms_enabled()`` when the backward
            runs, as PyTorch's own kernels decide. The PyTorch (CPU) path is
            always deterministic.

    Returns:
        (B, Hq, Sq, D) in q's dtype and memory layout, or (out, lse).

    Head dims: multiples of 8 from 16 to 256; 32, 64, 80, 96, 128 and 256 are
    tested. Any sequence length from 1 up.
    """
    q, k, v = cast_for_autocast(autocast_dtype(q), q, k, v)  # as autocast casts SDPA's inputs
    _check_qkv(q, k, v, 4, "(B, H, S, D)")
    batch, num_heads, seqlen_q, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"q and k must have the same batch size, got {batch} and {k.shape[0]}")
    _check_heads(num_heads, k.shape[1])
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = keep)")
        if key_padding_mask.shape != (batch, k.shape[2]) or key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be (B, Sk) = ({batch}, {k.shape[2]}) on {q.device}, "
                             f"got {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
        key_padding_mask = key_padding_mask.contiguous()
    opts = _options(head_dim, causal, softmax_scale, dropout_p, window, softcap, deterministic)
    problem = _Problem(batch, num_heads, k.shape[1], head_dim, seqlen_q, k.shape[2],
                       key_padding_mask=key_padding_mask)
    return _result(q, k, v, problem, opts, return_lse)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    deterministic: bool | None = None,
):
    """Attention over packed sequences: no token attends across a sequence boundary.

    Args:
        q: (Tq, Hq, D), the queries of all sequences one after another.
        k, v: (Tk, Hkv, D).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 (int64 is converted)
            cumulative lengths: sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1].
            They must start at 0, never decrease, and end at Tq (Tk).
            Sequences of length 0 and 1 are fine. On a CPU offsets that break
            these rules raise ValueError; on CUDA a device-side assertion
            reports them at the next synchronization (no host sync per call),
            and no kernel runs on them.
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence (an upper bound is fine).
        Other options as in ``flash_attention`` (``causal`` aligns each
        sequence's queries to the bottom right of its keys).

    Returns:
        (Tq, Hq, D), or (out, lse) with lse (Hq, Tq) fp32.
    """
    q, k, v = cast_for_autocast(autocast_dtype(q), q, k, v)  # as autocast casts SDPA's inputs
    _check_qkv(q, k, v, 3, "(T, H, D)")
    _check_heads(q.shape[1], k.shape[1])
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, (torch.int32, torch.int64), device=q.device)
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D, the B + 1 >= 2 cumulative lengths of B sequences, "
                             f"got shape {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, at_least=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, at_least=0)
    opts = _options(q.shape[-1], causal, softmax_scale, dropout_p, window, softcap, deterministic)
    cu_seqlens_q = _checked_cu_seqlens("cu_seqlens_q", cu_seqlens_q, "q", q.shape[0], "max_seqlen_q", max_seqlen_q)
    cu_seqlens_k = _checked_cu_seqlens("cu_seqlens_k", cu_seqlens_k, "k", k.shape[0], "max_seqlen_k", max_seqlen_k)
    problem = _Problem(cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], q.shape[-1], max_seqlen_q, max_seqlen_k,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return _result(q, k, v, problem, opts, return_lse)


def _checked_cu_seqlens(name: str, cu: torch.Tensor, packed_name: str, packed_length: int, max_name: str,
                        max_seqlen: int) -> torch.Tensor:
    """``cu`` as the kernels read it, (B + 1,) int32 contiguous, once its values are known to be offsets.

    The kernels take every sequence's rows from these offsets and launch
    max_seqlen // BLOCK programs per sequence: an offset past the packed
    tokens reads and writes outside q, k and v, a decreasing one gives a
    negative length, and a max_seqlen below the longest sequence leaves rows
    unwritten. Checked on the values as given (int64 included, before the
    cast could wrap them): on a CPU at once, on CUDA by a device-side
    assertion, with no host sync (see ``checks.check_values``).
    """
    lengths = cu.diff()
    ok = (cu[0] == 0) & (cu[-1] == packed_length) & (lengths >= 0).all() & (lengths.max() <= max_seqlen)
    check_values(ok, f"{name} must start at 0, never decrease, and end at {packed_name}.shape[0] = {packed_length}, "
                     f"with no sequence longer than {max_name} = {max_seqlen}",
                 found=lambda: _cu_seqlens_fault(cu, packed_length, max_seqlen))
    return cu.to(torch.int32).contiguous()


def _cu_seqlens_fault(cu: torch.Tensor, packed_length: int, max_seqlen: int) -> str:
    """The first thing wrong with offsets the check refused, in words (a CPU tensor: it reads the values)."""
    lengths = cu.diff()
    if cu[0] != 0:
        return f"it starts at {cu[0].item()}"
    if (lengths < 0).any():
        i = int((lengths < 0).nonzero()[0])
        return f"it decreases from {cu[i].item()} to {cu[i + 1].item()} (sequence {i})"
    if cu[-1] != packed_length:
        return f"it ends at {cu[-1].item()}"
    i = int(lengths.argmax())
    return f"sequence {i} has {lengths[i].item()} tokens"
