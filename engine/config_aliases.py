"""Hugging Face ``TrainingArguments`` names that ember's config takes as aliases of its own keys.

Users arrive with ``learning_rate``, ``per_device_train_batch_size`` and ``output_dir`` in their fingers and in
their YAML files. Each name here means exactly what the ember key means, so a file or command line written
for ``TrainingArguments`` reads the same; a name whose meaning ember does not have (``num_train_epochs``:
ember counts optimizer steps) is refused with what to write instead, never approximated. A name that
``TrainingArguments`` shares with ember (``seed``, ``warmup_steps``, ``weight_decay``, ``max_steps``,
``gradient_checkpointing``, ``report_to``) is simply ember's key.

This module is data only; ``ember.engine.config`` applies it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Alias:
    """A ``TrainingArguments`` name for ember key ``key``. Its value is checked as ``type``; then ``values``,
    when given, says which ember keys each value sets (a value missing from it is refused)."""

    key: str
    type: type
    values: dict[Any, dict[str, Any]] | None = None


# ember's schedules warm up linearly for warmup_steps and then decay to min_lr_ratio x lr; Hugging Face's linear
# and cosine decay to 0, and its "constant" has no warm-up. The keys an alias's value implies beyond its own
# (min_lr_ratio, warmup_steps) give way to the same keys written in the same file or command line.
_SCHEDULES = {
    "linear": {"schedule": "linear", "min_lr_ratio": 0.0},
    "cosine": {"schedule": "cosine", "min_lr_ratio": 0.0},
    "cosine_with_min_lr": {"schedule": "cosine"},  # the floor is ember's min_lr_ratio
    "constant_with_warmup": {"schedule": "constant"},
    "constant": {"schedule": "constant", "warmup_steps": 0},
}

_OPTIMIZERS = {
    "adamw_torch": {"optimizer": "adamw"},
    "adamw_torch_fused": {"optimizer": "adamw"},
    "adamw_bnb_8bit": {"optimizer": "bnb_adamw8bit"},
    "adamw_8bit": {"optimizer": "bnb_adamw8bit"},
    "paged_adamw_8bit": {"optimizer": "bnb_paged_adamw8bit"},
}

ALIASES: dict[str, Alias] = {
    "learning_rate": Alias("lr", float),
    "per_device_train_batch_size": Alias("batch_size", int),
    "gradient_accumulation_steps": Alias("grad_accum", int),
    "max_grad_norm": Alias("grad_clip", float),
    "output_dir": Alias("out_dir", str),
    "save_total_limit": Alias("keep_last", int),
    "save_steps": Alias("save_every", int),
    "eval_steps": Alias("eval_every", int),
    "logging_steps": Alias("log_every", int),
    "lr_scheduler_type": Alias("schedule", str, _SCHEDULES),
    "optim": Alias("optimizer", str, _OPTIMIZERS),
    # Mixed precision as TrainingArguments sets it: bf16 or fp16 true is that autocast policy; given and false
    # (and the other one not true) is fp32, as the Trainer then trains. The pair is read together.
    "bf16": Alias("precision", bool),
    "fp16": Alias("precision", bool),
    "use_cpu": Alias("device", bool, {True: {"device": "cpu"}, False: {}}),  # false: a GPU where there is one
}

# TrainingArguments names whose meaning ember does not have, with what to write instead.
REFUSED: dict[str, str] = {
    "num_train_epochs": "ember counts optimizer steps, not epochs: set max_steps (one epoch is about "
                        "training examples / (batch_size x grad_accum x processes) steps)",
    "warmup_ratio": "set warmup_steps (warmup_ratio x max_steps)",
}


def aliases_of(key: str) -> list[str]:
    """The TrainingArguments names of ember key ``key``, as ``--help`` lists them."""
    return [name for name, alias in ALIASES.items() if alias.key == key]
