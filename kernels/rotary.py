"""Rotary position embeddings (RoPE) applied to queries and keys, Hugging Face's convention.

What is fused. ``apply_rotary_pos_emb`` in transformers computes
``q * cos + rotate_half(q) * sin`` (and the same for k): ``rotate_half`` builds a
copy of q, each product another, and autograd keeps cos and sin for the
backward while the temporaries come and go; with partial rotary (rotary dim <
head dim, Phi) the rotated and passed-through parts are sliced and concatenated
again. Here one kernel reads q (or k) and the cos/sin rows once and writes the
rotated tensor, the pass-through columns copied as they are.

Saved for backward: nothing of q or k. The rotation is linear in q, so its
backward is the transposed rotation of the incoming gradient with the same cos
and sin: ``dq1 = dy1 * cos1 + dy2 * sin2``, ``dq2 = dy2 * cos2 - dy1 * sin1``
(halves 1 and 2 of the rotary dims). Only cos and sin themselves are kept
(references to the tensors the model's rotary embedding made, shared by every
layer): 0 bytes per token per layer.

Positions that restart inside a packed row need nothing special: they arrive
as per-position rows of cos and sin.

Kernels. One program per BLOCK_ROWS (batch, head, position) rows of one
tensor, q and k launched separately (their head counts differ under GQA);
every tensor is read through its four strides, so the transposed views HF
passes ((B, S, H, D) memory seen as (B, H, S, D)) and cos/sin broadcast over
heads (stride 0) are read where they lie. Memory-bound; fp32 math, one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autocast import autocast_off
from .backend import use_triton
from .checks import check_int, check_tensor
from .launch import TRITON_DTYPE, KernelSpec, compile_case, launch, register


# ----------------------------------------------------------------------------
# Reference: transformers' apply_rotary_pos_emb, with the partial-rotary split
# its Phi models add. The tests run it in float64 and in the input dtype.
# ----------------------------------------------------------------------------


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(q, k, cos, sin, *, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([(x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass], dim=-1)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------
# Triton kernel: forward and backward are one kernel (the backward rotates by
# the transposed rotation).
# ----------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    ROWS, N1, N2, HALF, DIM,
    stride_x0, stride_x1, stride_x2, stride_xd,
    stride_c0, stride_c1, stride_c2, stride_cd,
    stride_s0, stride_s1, stride_s2, stride_sd,
    stride_o0, stride_o1, stride_o2, stride_od,
    TRANSPOSED: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # BLOCK_ROWS rows of a (N0, N1, N2, DIM) tensor: the first 2 * HALF columns rotated, the rest copied.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < ROWS
    rows = rows.to(tl.int64)
    i0, i1, i2 = rows // (N1 * N2), (rows // N2) % N1, rows % N2
    x_row = (i0 * stride_x0 + i1 * stride_x1 + i2 * stride_x2)[:, None]
    c_row = (i0 * stride_c0 + i1 * stride_c1 + i2 * stride_c2)[:, None]
    s_row = (i0 * stride_s0 + i1 * stride_s1 + i2 * stride_s2)[:, None]
    o_row = (i0 * stride_o0 + i1 * stride_o1 + i2 * stride_o2)[:, None]

    first = tl.arange(0, BLOCK_HALF)[None, :]
    second = first + HALF
    mask = row_mask[:, None] & (first < HALF)
    x1 = tl.load(x_ptr + x_row + first * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row + second * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + c_row + first * stride_cd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_row + second * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + s_row + first * stride_sd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + s_row + second * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSED:
        out1 = x1 * cos1 + x2 * sin2
        out2 = x2 * cos2 - x1 * sin1
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_row + first * stride_od, out1.to(out_ty), mask=mask)
    tl.store(out_ptr + o_row + second * stride_od, out2.to(out_ty), mask=mask)
    if HAS_PASS:
        cols = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        mask = row_mask[:, None] & (cols < DIM)
        passed = tl.load(x_ptr + x_row + cols * stride_xd, mask=mask, other=0.0)
        tl.store(out_ptr + o_row + cols * stride_od, passed.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------
# Kernel registry: tuning configs and the compile gate's representative cases
# ----------------------------------------------------------------------------

_CONFIGS = [
    triton.Config(dict(BLOCK_ROWS=16), num_warps=4),
    triton.Config(dict(BLOCK_ROWS=32), num_warps=4),
    triton.Config(dict(BLOCK_ROWS=64), num_warps=8),
]

# The last (head-dim) strides are 1 in practice; the compile cases specialize them as the JIT does.
_UNIT_STRIDES = dict(stride_xd=1, stride_cd=1, stride_sd=1, stride_od=1)

_ROTARY = register(KernelSpec(
    name="rotary",
    kernel=_rotary_kernel,
    configs=_CONFIGS,
    key=["HALF", "DIM", "HAS_PASS"],
    compile_cases=[
        # Llama's head (128, all rotary) and a Phi-2-style partial one (32 of 80 dims rotary), each direction once.
        compile_case(_rotary_kernel, f"{TRITON_DTYPE[dtype]},{label},{'bwd' if transposed else 'fwd'}", dtype=dtype,
                     constexprs=dict(_UNIT_STRIDES, TRANSPOSED=transposed, HAS_PASS=block_pass > 1,
                                     BLOCK_HALF=block_half, BLOCK_PASS=block_pass),
                     tensor_cores=False)
        for dtype, label, block_half, block_pass, transposed in (
            (torch.bfloat16, "d128", 64, 1, False), (torch.float32, "d128", 64, 1, True),
            (torch.bfloat16, "d80,rotary32", 16, 64, True), (torch.float32, "d80,rotary32", 16, 64, False),
        )
    ],
))


# ----------------------------------------------------------------------------
# Launcher (Triton) and the PyTorch implementation of the same algorithm
# ----------------------------------------------------------------------------


def _triton_rotate(x, cos, sin, out, transposed: bool):
    # x, out (N0, N1, N2, D); cos, sin (N0, N1, N2, R), broadcast views
    n0, n1, n2, dim = x.shape
    half = cos.shape[-1] // 2
    rows = n0 * n1 * n2
    launch(_ROTARY, lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),),
           x, cos, sin, out, rows, n1, n2, half, dim, *x.stride(), *cos.stride(), *sin.stride(), *out.stride(),
           TRANSPOSED=transposed, HAS_PASS=dim > 2 * half,
           BLOCK_HALF=triton.next_power_of_2(half), BLOCK_PASS=triton.next_power_of_2(max(dim - 2 * half, 1)))
    return out


def _torch_rotate(x, cos, sin, out, transposed: bool):
    # The kernel's arithmetic, one index of dim 0 at a time, so the fp32 temporaries are one batch row's.
    half = cos.shape[-1] // 2
    for i in range(x.shape[0]):
        x1, x2 = x[i, ..., :half].float(), x[i, ..., half:2 * half].float()
        cos1, cos2 = cos[i, ..., :half].float(), cos[i, ..., half:].float()
        sin1, sin2 = sin[i, ..., :half].float(), sin[i, ..., half:].float()
        if transposed:
            out[i, ..., :half] = x1 * cos1 + x2 * sin2
            out[i, ..., half:2 * half] = x2 * cos2 - x1 * sin1
        else:
            out[i, ..., :half] = x1 * cos1 - x2 * sin1
            out[i, ..., half:2 * half] = x2 * cos2 + x1 * sin2
        out[i, ..., 2 * half:] = x[i, ..., 2 * half:]
    return out


def _rotate(x, cos, sin, dtype, transposed: bool):
    """x rotated (or rotated back) into a new tensor of ``dtype`` laid out as x is."""
    out = torch.empty_like(x, dtype=dtype)  # keeps x's memory order when it is dense
    if x.numel() == 0:
        return out
    cos, sin = (t.expand(*x.shape[:-1], t.shape[-1]) for t in (cos, sin))  # stride-0 views, no copies
    return (_triton_rotate if use_triton(x) else _torch_rotate)(x, cos, sin, out, transposed)


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, cos, sin, out_dtype):
        # q (B, Hq, S, D), k (B, Hk, S, D), cos, sin broadcastable to (B, 1, S, R) -> rotated q, k in out_dtype
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return _rotate(q, cos, sin, out_dtype, False), _rotate(k, cos, sin, out_dtype, False)

    @staticmethod
    @autocast_off
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq = None if dq is None else _rotate(dq, cos, sin, q_dtype, True)
        dk = None if dk is None else _rotate(dk, cos, sin, k_dtype, True)
        return dq, dk, None, None, None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys as transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``.

    ``q_out = q * cos + rotate_half(q) * sin`` over the first R = cos.shape[-1]
    dims of each head (``rotate_half(x) = cat(-x[R/2:], x[:R/2])``); the other
    D - R dims pass through (partial rotary, as Phi).

    Args:
        q: (B, Hq, S, D) float32/float16/bfloat16 (or (B, S, Hq, D) with unsqueeze_dim=2), any strides.
        k: (B, Hk, S, D), q's dtype and device; Hk may differ from Hq (GQA).
        cos, sin: as the model's rotary embedding returns them: (B, S, R) or any
            shape that, after ``unsqueeze(unsqueeze_dim)``, broadcasts to q's and
            k's (..., R); R even, 2 <= R <= D; any float dtype, one for both.
            Positions restarting inside a packed row come in as their own rows.
            They get no gradient (the model computes them without one).
        unsqueeze_dim: the dimension of q and k the heads are on, as in transformers.

    Returns:
        (q_rotated, k_rotated), laid out as q and k, in the promoted dtype of q and cos
        (as the unfused products promote; the same as q's when the model
        made cos in its own dtype). Computed in fp32, rounded once.

    Keeps nothing of q or k for the backward, which rotates the gradients back
    with the same cos and sin. Autocast casts nothing, as it casts none of the
    unfused ops.
    """
    check_tensor("q", q)
    check_tensor("k", k, (q.dtype,), device=q.device)
    check_tensor("cos", cos, device=q.device)
    check_tensor("sin", sin, (cos.dtype,), shape=tuple(cos.shape), device=q.device)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D, (B, H, S, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must be q's ({q.shape[-1]}), got {k.shape[-1]}")
    check_int("unsqueeze_dim", unsqueeze_dim)
    if not -cos.dim() - 1 <= unsqueeze_dim <= cos.dim():
        raise ValueError(f"unsqueeze_dim must be a dimension to insert into cos's {cos.dim()}, got {unsqueeze_dim}")
    rotary_dim = cos.shape[-1] if cos.dim() else 0
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"cos and sin's last dimension (the rotary dim) must be even and in [2, {q.shape[-1]}] "
                         f"(q's head dim), got {rotary_dim}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin get no gradient from apply_rotary: pass them without requires_grad "
                         "(detach them), as a model's rotary embedding makes them")
    cos_b, sin_b = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    for name, x in (("q", q), ("k", k)):
        rows = (*x.shape[:-1], rotary_dim)
        try:
            fits = torch.broadcast_shapes(cos_b.shape, rows) == rows
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"cos and sin (shape {tuple(cos.shape)}, unsqueezed at {unsqueeze_dim}) do not "
                             f"broadcast to {name}'s rows {tuple(x.shape[:-1])}")
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    return RotaryFunction.apply(q, k, cos_b, sin_b, out_dtype)
