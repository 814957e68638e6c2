"""The learning-rate schedule: a factor of the peak learning rate per optimizer step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config validates its schedule against SCHEDULES: it imports this module
    from .config import TrainConfig

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine or linear decay to min_lr_ratio of it at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay
