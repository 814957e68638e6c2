"""Checkpoint folders: complete or absent, listed oldest first, only the last few kept, read back exactly."""

from __future__ import annotations

import torch

from ember.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


def _save(out_dir, step, keep_last=2, write_extra=None):
    trainable = {"layer.lora_A": torch.randn(4, 8), "head.weight": torch.randn(3, 8)[:, ::2]}  # one non-contiguous
    save_checkpoint(out_dir, step, trainable, {"loop": {"step": step}, "rng": torch.get_rng_state()},
                    {"max_steps": 10}, keep_last, write_extra=write_extra)
    return trainable


def test_round_trip_keep_last_and_unfinished_folders_ignored(tmp_path):
    for step in (1, 2, 3):
        trainable = _save(tmp_path, step, write_extra=lambda folder: (folder / "adapter").mkdir())
    (tmp_path / "checkpoints" / ".step-00000004.tmp-1").mkdir()  # what a crash in the middle of a save leaves
    checkpoints = list_checkpoints(tmp_path)
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000003"]
    tensors, state = load_checkpoint(checkpoints[-1])
    assert all(torch.equal(tensors[name], t) for name, t in trainable.items())
    assert state["loop"] == {"step": 3} and (checkpoints[-1] / "adapter").is_dir()
    assert (checkpoints[-1] / "config.json").read_text().strip().startswith("{")


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 5)
    second = _save(tmp_path, 5)
    tensors, _ = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert torch.equal(tensors["layer.lora_A"], second["layer.lora_A"])
    assert list_checkpoints(tmp_path / "nowhere") == []
