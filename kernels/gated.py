"""Gated-MLP activations: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu(gate, up) = gelu(gate) * up``.

What is fused and what it saves. A gated MLP computes ``down(act(gate) * up)``.
Stock PyTorch runs ``act(gate)`` and the product as two ops, and autograd keeps
gate (for the activation's backward), ``act(gate)`` and up (for the product's
backward): three (N, I) tensors per layer besides the product the down
projection keeps. Here one elementwise kernel reads gate and up and writes the
product; the backward recomputes ``act(gate)`` and its derivative from gate and
up, so only gate and up are saved: 2 * I * itemsize bytes per token, and
``act(gate)`` (I * itemsize bytes per token) is never kept. The activation and
the product are computed in fp32 and rounded once.

Saved for backward: ``gate`` and ``up`` themselves (no copies).

Kernels: one program per (BLOCK_R rows, BLOCK_C columns) tile, forward and
backward; both read their inputs through strides (a transposed or expanded
gate/up is read where it lies). Memory-bound: they move 3 (forward) and 5
(backward) elements per element of the product, which is what the unfused
ops move too, less the act tensor's write and two reads.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .autocast import autocast_off
from .backend import use_triton
from .checks import check_tensor
from .launch import TRITON_DTYPE, KernelSpec, compile_case, launch, register

Approximate = Literal["tanh", "none"]

# The activation a kernel computes (a constexpr): silu, or gelu exact (erf) or with the tanh approximation.
_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


# ----------------------------------------------------------------------------
# References: plain PyTorch, as the modules they replace compute it (HF's
# LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)). The tests run them in float64
# as ground truth, and in the input dtype as "stock PyTorch".
# ----------------------------------------------------------------------------


def swiglu_ref(gate, up):
    return F.silu(gate) * up


def geglu_ref(gate, up, approximate="tanh"):
    return F.gelu(gate, approximate=approximate) * up


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------

# The activations' constants, for the PyTorch path; the kernel spells them out (it reads no Python globals).
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi)
_GELU_TANH_CUBIC = 0.044715


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    # (act(g), act'(g)) in fp32.
    if ACTIVATION == "silu":
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return g * cdf, cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        # tanh through the sigmoid: tl has no tanh that also runs in the interpreter.
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Row (int64, for large tensors) and column offsets of this program's tile, and its mask.
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows[:, None], cols[None, :], (rows < R)[:, None] & (cols < C)[None, :]


@triton.jit
def _gated_fwd_kernel(
    gate_ptr, up_ptr, out_ptr,
    R, C,
    stride_gr, stride_gc, stride_ur, stride_uc, stride_or,
    ACTIVATION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = act(gate) * up for one (BLOCK_R, BLOCK_C) tile; out is (R, C) contiguous.
    rows, cols, mask = _tile(R, C, BLOCK_R, BLOCK_C)
    g = tl.load(gate_ptr + rows * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_ur + cols * stride_uc, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION)
    tl.store(out_ptr + rows * stride_or + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    gate_ptr, up_ptr, dout_ptr, dgate_ptr, dup_ptr,
    R, C,
    stride_gr, stride_gc, stride_ur, stride_uc, stride_dr, stride_dc, stride_or,
    ACTIVATION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # d(gate) = dout * up * act'(gate), d(up) = dout * act(gate), recomputed for one tile; both (R, C) contiguous.
    rows, cols, mask = _tile(R, C, BLOCK_R, BLOCK_C)
    g = tl.load(gate_ptr + rows * stride_gr + cols * stride_gc, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_ur + cols * stride_uc, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows * stride_dr + cols * stride_dc, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(g, ACTIVATION)
    tl.store(dgate_ptr + rows * stride_or + cols, (dout * u * d_act).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * stride_or + cols, (dout * act).to(dup_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Kernel registry: tuning configs and the compile gate's representative cases
# ----------------------------------------------------------------------------

# Tiles of 2048-4096 elements: enough bytes in flight per program for a
# memory-bound kernel without registers to spare. Short rows (C <= 512) get
# several rows per tile instead of a mostly masked one.
_CONFIGS = [
    triton.Config(dict(BLOCK_R=4, BLOCK_C=512), num_warps=4),
    triton.Config(dict(BLOCK_R=1, BLOCK_C=2048), num_warps=8),
    triton.Config(dict(BLOCK_R=2, BLOCK_C=2048), num_warps=8),
]

# Column strides are 1 in practice (gate and up come out of a linear layer):
# the compile cases specialize them as the JIT does for an argument equal to 1.
# Every activation in bf16; fp32 (twice the registers per element) with the heaviest one.
_CASES = [(torch.bfloat16, activation) for activation in _ACTIVATIONS] + [(torch.float32, "gelu_tanh")]


def _register(name, kernel, **unit_strides):
    return register(KernelSpec(
        name=name,
        kernel=kernel,
        configs=_CONFIGS,
        key=["C", "ACTIVATION"],
        compile_cases=[
            compile_case(kernel, f"{TRITON_DTYPE[dtype]},{activation}", dtype=dtype,
                         constexprs=dict(unit_strides, ACTIVATION=activation), tensor_cores=False)
            for dtype, activation in _CASES
        ],
    ))


_GATED_FWD = _register("gated_fwd", _gated_fwd_kernel, stride_gc=1, stride_uc=1)
_GATED_BWD = _register("gated_bwd", _gated_bwd_kernel, stride_gc=1, stride_uc=1, stride_dc=1)


# ----------------------------------------------------------------------------
# Launchers (Triton) and the PyTorch implementation of the same algorithm
# ----------------------------------------------------------------------------


def _grid(rows, cols):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))


def _triton_fwd(gate, up, activation):
    # gate, up (R, C) -> out (R, C) contiguous
    rows, cols = gate.shape
    out = torch.empty((rows, cols), device=gate.device, dtype=gate.dtype)
    launch(_GATED_FWD, _grid(rows, cols), gate, up, out, rows, cols,
           gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), out.stride(0), ACTIVATION=activation)
    return out


def _triton_bwd(gate, up, dout, activation):
    rows, cols = gate.shape
    dgate = torch.empty((rows, cols), device=gate.device, dtype=gate.dtype)
    dup = torch.empty_like(dgate)
    launch(_GATED_BWD, _grid(rows, cols), gate, up, dout, dgate, dup, rows, cols,
           gate.stride(0), gate.stride(1), up.stride(0), up.stride(1), dout.stride(0), dout.stride(1),
           dgate.stride(0), ACTIVATION=activation)
    return dgate, dup


# The PyTorch path works in chunks of rows, so its fp32 temporaries stay
# bounded (16 MiB) whatever the batch, as the kernel's registers do.
_TORCH_CHUNK_ELEMENTS = 1 << 22


def _torch_chunks(rows: int, cols: int):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _torch_activation(g, activation):
    # (act(g), act'(g)) in fp32, as _activation.
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(g * _SQRT_HALF))
        return g * cdf, cdf + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)
    t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_TANH_CUBIC * g**3))
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * g * g)
    return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner


def _torch_fwd(gate, up, activation):
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    for rows in _torch_chunks(*gate.shape):
        act, _ = _torch_activation(gate[rows].float(), activation)
        out[rows] = act * up[rows].float()
    return out


def _torch_bwd(gate, up, dout, activation):
    dgate = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    dup = torch.empty_like(dgate)
    for rows in _torch_chunks(*gate.shape):
        act, d_act = _torch_activation(gate[rows].float(), activation)
        d = dout[rows].float()
        dgate[rows] = d * up[rows].float() * d_act
        dup[rows] = d * act
    return dgate, dup


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------


class GatedFunction(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, gate, up, activation: str):
        # gate, up (R, C) -> (R, C)
        run_triton = use_triton(gate) and gate.numel() > 0  # a grid of 0 programs is not launched
        out = (_triton_fwd if run_triton else _torch_fwd)(gate, up, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.run_triton = activation, run_triton
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = (_triton_bwd if ctx.run_triton else _torch_bwd)(gate, up, dout, ctx.activation)
        return dgate, dup, None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _gated(gate, up, activation):
    check_tensor("gate", gate)
    check_tensor("up", up)
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension (..., I), got a scalar")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    cols = gate.shape[-1]
    # (R, C) views where the layout allows (a copy only for layouts no row stride describes).
    out = GatedFunction.apply(gate.reshape(-1, cols), up.reshape(-1, cols), activation)
    return out.view(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the SwiGLU MLP's activation (Llama, Mistral, Qwen, Phi-3), fused.

    Args:
        gate: (..., I) float32/float16/bfloat16, the gate projection's output.
        up: (..., I), same shape, dtype and device, the up projection's output.
            Any strides, stride 0 included.

    Returns:
        (..., I) contiguous, gate's dtype: computed in fp32 and rounded once.

    The backward recomputes silu(gate) from gate and up, the only tensors saved.
    Autocast casts nothing here, as it casts neither silu nor the product.
    """
    return _gated(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: Approximate = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up``, the GeGLU MLP's activation (Gemma: tanh; others: exact), fused.

    Args:
        gate, up: as in ``swiglu``.
        approximate: "tanh" (``gelu_pytorch_tanh``, Gemma's) or "none" (the erf form), as in
            ``torch.nn.functional.gelu``.

    Returns:
        (..., I) contiguous, gate's dtype. Saves only gate and up, as ``swiglu``.
    """
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return _gated(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
