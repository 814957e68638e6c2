"""Checkpoints that survive crashes: written to a temporary folder, then renamed into place.

A checkpoint is a folder ``<out_dir>/checkpoints/step-NNNNNNNN`` holding
``trainable.safetensors`` (the parameters being trained, by name),
``state.pt`` (optimizer, scheduler, scaler, RNG states, data position, loop
state), ``config.json`` (the resolved config) and, for LoRA runs, ``adapter/``
in PEFT's format. The folder appears only
once complete (``ember.engine.atomic``), so a crash or Ctrl-C mid-write leaves
the previous checkpoint as the latest. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_atomically

PREFIX = "step-"


def save_checkpoint(out_dir: Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                    config: dict[str, Any], keep_last: int, write_extra=None) -> Path:
    """``write_extra(folder)``, if given, adds files (a PEFT adapter) before the folder is renamed into place."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        temporary.mkdir()
        save_file({name: t.detach().contiguous().cpu() for name, t in trainable.items()},
                  str(temporary / "trainable.safetensors"))
        torch.save(state, temporary / "state.pt")
        (temporary / "config.json").write_text(json.dumps(config, indent=2))
        if write_extra is not None:
            write_extra(temporary)

    # The same step saved again (a resumed run) replaces the old folder whole.
    final = write_atomically(folder / f"{PREFIX}{step:08d}", write)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    trainable = load_file(str(Path(path) / "trainable.safetensors"))
    # weights_only=False: the state holds RNG states and plain Python values we wrote ourselves.
    state = torch.load(Path(path) / "state.pt", weights_only=False)
    return trainable, state
