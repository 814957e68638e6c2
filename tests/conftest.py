"""Test tiers and shared helpers.

Without a GPU the Triton kernels run through Triton's interpreter: the variable
is read when kernels are decorated, so it is set here, before anything imports
ember.kernels. With a GPU the same tests run on CUDA tensors (the GPU tier) and
the CPU runs the PyTorch path.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as triton_interpreter  # noqa: E402

from ember.kernels.backend import forced_backend, interpreting  # noqa: E402

# ----------------------------------------------------------------------------
# The bf16 dot shim (test-only). Triton's interpreter (3.9 and earlier) feeds
# bf16 tl.dot operands to numpy as their raw uint16 bit patterns (triton issue
# 11584), so every bf16 matmul comes out as garbage. Inside the interpreter
# only, bf16 operands are widened to fp32 first: exact, since bf16 -> fp32 is.
# Kernels are never changed to work around it.
# ----------------------------------------------------------------------------


class _Bf16DotShim:
    enabled = True
    _original = triton_interpreter.InterpreterBuilder.create_dot

    @staticmethod
    def _widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        widened = triton_interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return triton_interpreter.TensorHandle(widened, tl.float32)

    @classmethod
    def create_dot(cls, builder, a, b, d, input_precision, max_num_imprecise_acc):
        if cls.enabled:
            a, b = cls._widen(a), cls._widen(b)
        return cls._original(builder, a, b, d, input_precision, max_num_imprecise_acc)


triton_interpreter.InterpreterBuilder.create_dot = (
    lambda self, *args: _Bf16DotShim.create_dot(self, *args)
)

# ----------------------------------------------------------------------------
# The bf16 rounding shim (test-only). The interpreter's fp32 -> bf16 cast
# truncates (and its explicit round-to-nearest-even mode drops the carry into
# the exponent), while the GPU rounds to nearest even. Kernels that write bf16
# results (an optimizer writing bf16 weights most of all) would be judged on the
# interpreter's rounding error, so inside the interpreter this one conversion is
# done by torch, which rounds as the GPU does.
# ----------------------------------------------------------------------------

_original_convert_float = triton_interpreter._convert_float


def _convert_float_rounding_to_nearest(data, input_dtype, output_dtype, rounding_mode):
    if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
        as_fp32 = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
        return as_fp32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return _original_convert_float(data, input_dtype, output_dtype, rounding_mode)


triton_interpreter._convert_float = _convert_float_rounding_to_nearest


@contextlib.contextmanager
def _bf16_dot_shim_disabled():
    _Bf16DotShim.enabled = False
    try:
        yield
    finally:
        _Bf16DotShim.enabled = True


@pytest.fixture
def bf16_dot_shim_disabled():
    """A context manager: run its block with the interpreter's own (broken) bf16 dot."""
    return _bf16_dot_shim_disabled


# ----------------------------------------------------------------------------
# Backends: every kernel test runs on each of these.
# ----------------------------------------------------------------------------

BACKENDS = [
    pytest.param("interpreter", id="interpreter"),
    pytest.param("torch", id="torch"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS)
def device(request):
    """The device to put inputs on; pins the backend the kernel will use."""
    backend = request.param
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("GPU tier: no CUDA device")
        yield "cuda"
    elif backend == "interpreter":
        if not interpreting():
            pytest.skip("interpreter tier: TRITON_INTERPRET is not set (a CUDA device is present)")
        yield "cpu"
    else:
        with forced_backend("torch"):
            yield "cpu"


# ----------------------------------------------------------------------------
# The tolerance rule (flash-attention's): against a float64 reference, ember's
# error may be at most twice the error of stock PyTorch computing the same thing
# in the same dtype, plus a small atol relative to the reference's magnitude.
# ----------------------------------------------------------------------------

RELATIVE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _assert_within_tolerance(name, actual, reference64, stock, dtype, scale=None):
    """actual and stock (PyTorch in `dtype`) against reference64 (PyTorch in float64).

    ``scale``: the magnitude the atol is relative to, when the reference's own
    can be 0 though its terms are not (a gradient that cancels exactly).
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    actual = actual.detach().double().cpu()
    reference64 = reference64.detach().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    ours = (actual - reference64).abs().max().item() if actual.numel() else 0.0
    theirs = (stock.detach().double().cpu() - reference64).abs().max().item() if actual.numel() else 0.0
    if scale is None:
        scale = reference64.abs().max().item() if reference64.numel() else 0.0
    atol = RELATIVE_ATOL[dtype] * max(scale, 1e-3)
    assert ours <= 2 * theirs + atol, (
        f"{name}: max error {ours:.3g} exceeds 2 x stock PyTorch's {theirs:.3g} + atol {atol:.3g}"
    )


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float tensor torch.empty / torch.empty_like makes during a test starts as NaN, so an output
    element a kernel leaves unwritten fails the tolerance rule's finiteness check instead of passing as 0."""
    for name in ("empty", "empty_like"):
        allocate = getattr(torch, name)

        def poisoned(*args, allocate=allocate, **kwargs):
            tensor = allocate(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        monkeypatch.setattr(torch, name, poisoned)


@pytest.fixture
def assert_within_tolerance():
    """The tolerance rule: (name, actual, reference64, stock, dtype, scale=None) -> None or AssertionError."""
    return _assert_within_tolerance
