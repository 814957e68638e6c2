"""Where a kernel runs: the one place that decides.

- CUDA tensors: the Triton kernels.
- CPU tensors with ``TRITON_INTERPRET=1``: the same Triton kernels through
  Triton's interpreter. This is how CI, which has no GPU, proves the kernels.
- CPU tensors otherwise: a PyTorch implementation of the same algorithm with
  the same memory behaviour (chunked, never materializing what the kernel
  avoids).

Every kernel family asks ``use_triton(tensor)`` once per call and nothing
else in ``ember.kernels`` looks at devices. ``forced_backend`` lets the
benchmarks and tests pin one path explicitly.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal

import torch

Backend = Literal["triton", "torch"]

_forced: Backend | None = None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter.

    Triton reads the variable when a kernel is decorated, so it has to be set
    before ``ember.kernels`` is first imported; this mirrors that decision.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend_for(tensor: torch.Tensor) -> Backend:
    """The backend that will run a kernel whose main input is ``tensor``."""
    if _forced is not None:
        return _forced
    if tensor.is_cuda or interpreting():
        return "triton"
    return "torch"


def use_triton(tensor: torch.Tensor) -> bool:
    return backend_for(tensor) == "triton"


@contextlib.contextmanager
def forced_backend(backend: Backend) -> Iterator[None]:
    """Run every ember kernel called inside the block on ``backend``.

    For tests and benchmarks that compare the two implementations; forcing
    "triton" on CPU tensors without ``TRITON_INTERPRET=1`` fails in Triton.
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    global _forced
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous
