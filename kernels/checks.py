"""Argument checks every kernel family shares: the float dtypes ember computes in, and one way to say what is wrong.

A launcher checks its inputs before anything reaches a kernel, and the error
names the argument and what was expected: a ``TypeError`` for the wrong kind
of value or dtype, a ``ValueError`` for the wrong shape, device, layout or
value. Options go through ``check_number`` and ``check_int``, so a new option
is validated by the same means as the old ones, and NaN or an infinity never
passes as a number.

Values inside tensors (targets, packed-sequence offsets) go through
``check_values``: on a CPU it raises at once; on CUDA it is a device-side
assertion, as PyTorch checks its own cross-entropy targets, because reading
the answer on the host would stall every call until the GPU caught up.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

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
    contiguous: bool = False,
) -> None:
    """Raise unless ``value`` is a tensor of one of ``dtypes``, and of ``shape`` on ``device`` when they are given.

    ``device``: where the call's other inputs are (a kernel reads all of them on one device).
    ``contiguous``: for tensors a kernel writes in place as flat memory, which
    can neither be copied first (the caller would not see the update) nor be
    written through strides that overlap (a stride 0 would write one element many times).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {value.stride()} "
                         f"for shape {tuple(value.shape)}")


def _interval(at_least, above, at_most, below) -> str:
    """The allowed range as an error message says it: "> 0", "in [0, 1)", "" for any finite number."""
    low = f"[{at_least:g}" if at_least is not None else f"({above:g}" if above is not None else None
    high = f"{at_most:g}]" if at_most is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
    if high:
        return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    return ""


def check_number(
    name: str,
    value,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a float, if it is a finite real number in the given range; else a TypeError or ValueError.

    A bool is not a number here (``softcap=True`` is a mistake, not 1.0), and
    neither is a tensor: options are host values, read without a device sync.
    """
    expected = "a finite number" + _interval(at_least, above, at_most, below)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    in_range = (
        math.isfinite(value)
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (at_most is None or value <= at_most)
        and (below is None or value < below)
    )
    if not in_range:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, at_least: int | None = None) -> int:
    """``value`` as an int, if it is an integer (not a bool, not a float) of at least ``at_least``."""
    expected = "an int" + (f" >= {at_least}" if at_least is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if at_least is not None and value < at_least:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_values(ok: torch.Tensor, message: str, found: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message)`` unless the one-element bool tensor ``ok`` holds True.

    On a CPU at once, with ``found()`` (what was wrong, read from the values)
    appended. On CUDA through ``torch._assert_async``: the assertion fires on
    the device, and the process learns of it at its next synchronization;
    kernels queued after it on the stream do not run once the assertion has
    failed the context, so they read no memory out of bounds.
    """
    if ok.is_cuda:
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message if found is None else f"{message}; {found()}")
