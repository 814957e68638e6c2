"""ember's kernels under torch.autocast: each behaves as the op it replaces would.

Autocast runs matmul-like ops (linear, matmul, scaled_dot_product_attention)
in its 16-bit dtype and keeps losses in fp32. ember's autograd Functions are
not on autocast's op lists, so without help they would run fp32 inputs through
the slow exact-fp32 kernels, and their PyTorch paths' inner matmuls would be
cast a second time. So:

- each public function casts, once at its entry, the floating inputs that feed
  its matmuls to the autocast dtype (``cast_for_autocast``), exactly as
  autocast casts F.linear's or SDPA's inputs: the cast is part of the graph, so
  fp32 leaves get fp32 gradients;
- each Function's forward and backward run with autocast off
  (``autocast_off``), as ``torch.amp.custom_fwd/custom_bwd`` would arrange,
  whatever state ``backward()`` is called in. (``custom_fwd`` itself needs one
  device type fixed at decoration; these Functions serve CPU and CUDA.)

Inputs that need no matmul cast keep their dtype: logits given to
``cross_entropy`` are read in their own dtype and reduced in fp32, so autocast's
fp32 copy of them is never made; LoRA adapters stay fp32 (their tiles are cast
in registers).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls on ``tensor``'s device in, or None when it is off."""
    if not isinstance(tensor, torch.Tensor):
        return None  # the caller's argument checks report it
    device_type = tensor.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(dtype: torch.dtype | None, *tensors):
    """``tensors`` with the floating ones cast to ``dtype`` (None: unchanged), as autocast casts an op's inputs."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(method):
    """Run an autograd Function's forward or backward with autocast off on its tensors' device."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        device_type = tensor.device.type if tensor is not None else "cpu"
        if not torch.amp.is_autocast_available(device_type):
            return method(ctx, *args)
        with torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
                else contextlib.nullcontext():
            return method(ctx, *args)

    return wrapper
