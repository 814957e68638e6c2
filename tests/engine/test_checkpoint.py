"""Checkpoint folders: complete or absent, listed oldest first, only the last few kept, read back exactly and as
data only, checked against their manifests, and refused for a config that trains something else."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch

from ember.engine.checkpoint import (DamagedCheckpointWarning, check_config, copy_parameters, damage, latest,
                                     list_checkpoints, load_checkpoint, save_checkpoint)
from ember.engine.errors import ConfigError


def _save(out_dir, step, keep_last=2, write_extra=None, config=None):
    trainable = {"layer.lora_A": torch.randn(4, 8), "head.weight": torch.randn(3, 8)[:, ::2]}  # one non-contiguous
    save_checkpoint(out_dir, step, trainable, {"loop": {"step": step}, "rng": torch.get_rng_state()},
                    config or {"max_steps": 10}, keep_last, write_extra=write_extra)
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


def test_steps_are_ordered_by_number_past_eight_digits(tmp_path):
    for step in (99_999_999, 100_000_000):
        _save(tmp_path, step)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-99999999", "step-100000000"]


def test_the_manifest_names_every_file_with_its_size_and_checksum(tmp_path):
    def write_adapter(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "a").write_text("x")

    _save(tmp_path, 1, write_extra=write_adapter)
    folder = list_checkpoints(tmp_path)[-1]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["adapter/a", "config.json", "state.pt", "trainable.safetensors"]
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert damage(folder) is None


def test_a_save_removes_the_temporaries_of_killed_writes(tmp_path):
    _save(tmp_path, 1)
    killed = tmp_path / "checkpoints" / f".step-00000002.tmp-{2**22 + 1}"  # no process has that id
    killed.mkdir()
    _save(tmp_path, 2)
    assert not killed.exists()


@pytest.mark.parametrize(("spoil", "problem"), [
    (lambda folder: (folder / "state.pt").write_bytes(b""), "state.pt holds 0 bytes, its manifest says"),
    (lambda folder: (folder / "config.json").write_text("{\"max_steps\": 99}"), "config.json holds"),
    (lambda folder: (folder / "trainable.safetensors").unlink(), "trainable.safetensors is missing"),
    (lambda folder: (folder / "manifest.json").unlink(), "no manifest.json"),
    (lambda folder: (folder / "manifest.json").write_text("[]"), "manifest.json is unreadable"),
    (lambda folder: (folder / "manifest.json").write_text('{"files": {}}'),
     "manifest.json does not list trainable.safetensors"),
])
def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_one(tmp_path, spoil, problem):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    spoil(list_checkpoints(tmp_path)[-1])
    with pytest.warns(DamagedCheckpointWarning, match=f"step-00000002: {problem}"):
        folder, damaged = latest(tmp_path)
    assert (folder.name, [d.name for d in damaged]) == ("step-00000001", ["step-00000002"])


def test_zeroed_bytes_are_found_by_the_checksum(tmp_path):
    _save(tmp_path, 1)
    path = list_checkpoints(tmp_path)[-1] / "trainable.safetensors"
    path.write_bytes(bytes(path.stat().st_size))
    assert damage(path.parent) == "trainable.safetensors does not match its SHA-256 in the manifest"


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    _save(tmp_path, 1)
    folder = list_checkpoints(tmp_path)[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../secret"] = {"bytes": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "outside the checkpoint" in damage(folder)


def test_no_whole_checkpoint_is_one_line_naming_each(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint in"):
        latest(tmp_path)
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    (list_checkpoints(tmp_path)[0] / "state.pt").unlink()
    with pytest.warns(DamagedCheckpointWarning), pytest.raises(ConfigError) as error:
        latest(tmp_path)
    assert str(error.value).endswith("step-00000002: no manifest.json (the write did not finish); "
                                     "step-00000001: state.pt is missing")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_state_that_is_more_than_data_is_refused_unrun(tmp_path):
    _save(tmp_path, 1)
    folder = list_checkpoints(tmp_path)[-1]
    marker = tmp_path / "ran"
    torch.save({"loop": _Payload(marker)}, folder / "state.pt")
    with pytest.raises(ConfigError, match=r"state.pt: refused, .*\(unsupported GLOBAL exec\)$") as error:
        load_checkpoint(folder)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)
    (folder / "trainable.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match="trainable.safetensors: not a safetensors file"):
        load_checkpoint(folder)
    assert not marker.exists()


SAVED = {"lora_r": 4, "seed": 0, "lr": 1e-3, "max_steps": 10, "betas": [0.9, 0.999], "model": "m"}


def test_a_config_that_trains_something_else_is_refused_on_one_line(tmp_path):
    _save(tmp_path, 1, config=SAVED)
    folder = list_checkpoints(tmp_path)[-1]
    check_config(folder, {**SAVED, "lr": 5e-4, "max_steps": 20, "betas": (0.8, 0.9)}, allow_changes=False)
    now = {**SAVED, "lora_r": 8, "seed": 3, "pack": True}
    del now["model"]
    with pytest.raises(ConfigError) as error:
        check_config(folder, now, allow_changes=False)
    message = str(error.value)
    assert 'lora_r 4 -> 8, model "m" -> (absent), pack (absent) -> true, seed 0 -> 3' in message
    assert "--resume_allow_changes=true" in message and "\n" not in message
    with pytest.warns(UserWarning, match="lora_r 4 -> 8"):
        check_config(folder, now, allow_changes=True)


def test_a_checkpoint_older_than_a_key_resumes_at_that_keys_default(tmp_path):
    """A key added to ember after the checkpoint was written (absent from its config.json) counts as saved at its
    default, which is what that run did: a run that keeps the default resumes, one that changes it is refused."""
    _save(tmp_path, 1, config=SAVED)
    folder = list_checkpoints(tmp_path)[-1]
    defaults = {**SAVED, "peft_method": "lora", "betas": (0.9, 0.999)}
    check_config(folder, {**SAVED, "peft_method": "lora"}, allow_changes=False, defaults=defaults)
    with pytest.raises(ConfigError, match='peft_method "lora" -> "dora"'):
        check_config(folder, {**SAVED, "peft_method": "dora"}, allow_changes=False, defaults=defaults)
    with pytest.raises(ConfigError, match=r"peft_method \(absent\) -> \"lora\""):  # without defaults, as before
        check_config(folder, {**SAVED, "peft_method": "lora"}, allow_changes=False)


def test_every_train_config_key_resumes_a_checkpoint_that_predates_it(tmp_path):
    """train() passes TrainConfig's defaults: an old checkpoint missing any one key resumes."""
    from ember.engine.config import TrainConfig

    full = TrainConfig().to_dict()
    for key in full:
        out_dir = tmp_path / key
        _save(out_dir, 1, config={k: v for k, v in full.items() if k != key})
        check_config(list_checkpoints(out_dir)[-1], full, allow_changes=False, defaults=TrainConfig().to_dict())


def test_tensors_of_another_model_are_named(tmp_path):
    parameters = {"a": torch.nn.Parameter(torch.zeros(2, 3)), "b": torch.nn.Parameter(torch.zeros(4))}
    with pytest.raises(ConfigError, match=r"a is \(3, 2\) there, \(2, 3\) here"):
        copy_parameters({"a": torch.ones(3, 2), "b": torch.ones(4)}, parameters, tmp_path)
    with pytest.raises(ConfigError, match="it holds no 'b'"):
        copy_parameters({"a": torch.ones(2, 3)}, parameters, tmp_path)
    with pytest.raises(ConfigError, match="it trains 'c' \\(and 0 more\\), which this model does not"):
        copy_parameters({"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1)}, parameters, tmp_path)
    copy_parameters({"a": torch.ones(2, 3), "b": torch.ones(4)}, parameters, tmp_path)
    assert all(bool((p == 1).all()) for p in parameters.values())
    assert os.listdir(tmp_path) == []
