"""Argument checks every kernel family shares: the float dtypes ember computes in, and one way to say what is wrong.

A launcher checks its inputs before anything reaches a kernel, and the error
names the argument and what was expected: a ``TypeError`` for the wrong kind
of value or dtype, a ``ValueError`` for the wrong shape or device.
"""

from __future__ import annotations

from typing import Sequence

import torch

# The dtypes every kernel takes as input, 16-bit first: the ones to train in.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    """The dtypes as an error message lists them: "float16, bfloat16 or float32"."""
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(
    name: str,
    value,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    *,
    shape: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise unless ``value`` is a tensor of one of ``dtypes``, and of ``shape`` on ``device`` when they are given.

    ``device``: where the call's other inputs are (a kernel reads all of them on one device).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")
