"""Where training runs: the one rule for "auto" and for asking for CUDA on a machine without it."""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device where there is one, else the CPU; ``"cpu"``, ``"cuda"`` or a
    ``torch.device`` of those types as given. Another type, or CUDA on a machine without it, is a ConfigError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {str(requested)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    return device
