"""Checkpoints handed to ember: crafted files run nothing, damaged ones are skipped, a changed config is refused,
and runs clean up after themselves (temporaries, the log, failed starts).

Every resume here continues a 4-step run (checkpoints at steps 3 and 4) to step 6, and is compared with one
uninterrupted 6-step run. The schedule is constant, so the longer max_steps (a change a resume may make)
leaves the learning rate of the first steps as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ember.engine.checkpoint import DamagedCheckpointWarning, list_checkpoints
from ember.engine.config import ConfigError, TrainConfig
from ember.kernels.backend import forced_backend

# The module: ember.engine exports the function `train` under the same name.
train_module = importlib.import_module("ember.engine.train")


def _config(tiny_bert, sentiment_csv, out_dir, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_bert), data=str(sentiment_csv), out_dir=str(out_dir), max_length=16, eval_size=32,
                  batch_size=16, max_steps=6, warmup_steps=0, schedule="constant", lr=1e-2, eval_every=100,
                  save_every=3, keep_last=2, lora_r=4, lora_alpha=8.0, lora_dropout=0.1, progress=False,
                  log_every=1, precision="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def _train(config):
    with forced_backend("torch"):  # the loop's logic is under test; tests/kernels prove the kernels
        return train_module.train(config)


def _evaluate(config):
    with forced_backend("torch"):
        return train_module.evaluate_checkpoint(config)


@pytest.fixture(scope="module")
def runs(tiny_bert, sentiment_csv, tmp_path_factory):
    """The uninterrupted 6-step run, and a 4-step run to resume (copy it first: ``_copy_of_first``)."""
    folder = tmp_path_factory.mktemp("runs")
    whole = _train(_config(tiny_bert, sentiment_csv, folder / "whole"))
    first = _train(_config(tiny_bert, sentiment_csv, folder / "first", max_steps=4))
    assert [c.name for c in list_checkpoints(first.out_dir)] == ["step-00000003", "step-00000004"]
    assert first.losses == whole.losses[:4]
    return SimpleNamespace(whole=whole, first=first.out_dir, config=lambda out_dir, **overrides: _config(
        tiny_bert, sentiment_csv, out_dir, **overrides))


def _copy_of_first(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs.first, tmp_path / "run"))


def _resume(runs, out_dir, **overrides):
    return _train(runs.config(out_dir, resume=True, **overrides))


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------
# Crafted files run nothing
# ----------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls exec, which writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _reseal(folder: Path) -> None:
    """Rewrite the manifest to match the files: an attacker who crafts a file can rewrite the manifest too."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_crafted_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_WritesMarker(marker)))
    assert marker.exists()  # so that its absence below means ember did not unpickle it


@pytest.mark.parametrize("name", ["state.pt", "trainable.safetensors", "adapter/adapter_model.safetensors"])
def test_a_crafted_file_runs_nothing(runs, tmp_path, name):
    """A pickle that would write a marker, put in a checkpoint with a matching manifest: resume and eval
    refuse the files they read with a one-line error; the adapter is never read; nothing runs."""
    out_dir = _copy_of_first(runs, tmp_path)
    latest = out_dir / "checkpoints" / "step-00000004"
    marker = tmp_path / "code-ran"
    if name == "state.pt":  # torch's own format (a zip), as a real state.pt
        torch.save({"optimizer": _WritesMarker(marker)}, latest / name)
    else:
        (latest / name).write_bytes(pickle.dumps(_WritesMarker(marker)))
    _reseal(latest)

    if name == "adapter/adapter_model.safetensors":
        assert _resume(runs, out_dir).steps == 6
    else:
        with pytest.raises(ConfigError, match="refused" if name == "state.pt" else "not a safetensors file") as error:
            _resume(runs, out_dir)
        assert "\n" not in str(error.value) and name in str(error.value)
        if name == "trainable.safetensors":
            with pytest.raises(ConfigError, match="not a safetensors file"):
                _evaluate(runs.config(out_dir))
        else:
            _evaluate(runs.config(out_dir))  # eval reads the trained tensors only
    assert not marker.exists()


def test_checkpoint_state_is_plain_data(runs):
    """What ember writes loads with weights_only=True and no allow-list: no class of ours is in it."""
    state = torch.load(list_checkpoints(runs.first)[-1] / "state.pt", weights_only=True)
    assert state["loop"]["step"] == 4 and isinstance(state["rng"]["python"], tuple)


# ----------------------------------------------------------------------------
# Damaged checkpoints are skipped for the previous whole one
# ----------------------------------------------------------------------------

DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "zeroed": lambda path: path.write_bytes(bytes(path.stat().st_size)),
    "deleted": Path.unlink,
}
FILES = ["trainable.safetensors", "state.pt", "config.json", "adapter/adapter_model.safetensors",
         "adapter/adapter_config.json", "manifest.json"]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(runs, tmp_path, name, damage):
    out_dir = _copy_of_first(runs, tmp_path)
    DAMAGES[damage](out_dir / "checkpoints" / "step-00000004" / name)
    with pytest.warns(DamagedCheckpointWarning, match=f"step-00000004: .*{name.split('/')[-1]}"):
        resumed = _resume(runs, out_dir)
    assert resumed.losses == runs.whole.losses[3:]  # from step 3, exactly as the uninterrupted run
    assert resumed.eval_after == runs.whole.eval_after
    # The damaged checkpoint is gone (the run redid its step); the log holds each step once, one end.
    assert [c.name for c in list_checkpoints(out_dir)] == ["step-00000003", "step-00000006"]
    log = _log(out_dir)
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if r["kind"] == "end"] == [6]


def test_an_empty_step_folder_is_skipped_and_eval_skips_it_too(runs, tmp_path):
    out_dir = _copy_of_first(runs, tmp_path)
    (out_dir / "checkpoints" / "step-00000005").mkdir()  # what a copy that stopped early can leave
    with pytest.warns(DamagedCheckpointWarning, match="step-00000005: no manifest.json"):
        _evaluate(runs.config(out_dir))
    assert (out_dir / "checkpoints" / "step-00000005").is_dir()  # eval only reads
    with pytest.warns(DamagedCheckpointWarning, match="step-00000005"):
        assert _resume(runs, out_dir).losses == runs.whole.losses[4:]


def test_no_whole_checkpoint_is_a_one_line_error(runs, tmp_path):
    out_dir = _copy_of_first(runs, tmp_path)
    for checkpoint in list_checkpoints(out_dir):
        DAMAGES["zeroed"](checkpoint / "state.pt")
    before = _snapshot(out_dir)
    for attempt in (lambda: _resume(runs, out_dir), lambda: _evaluate(runs.config(out_dir))):
        with pytest.warns(DamagedCheckpointWarning), pytest.raises(ConfigError, match="no whole checkpoint") as error:
            attempt()
        assert "\n" not in str(error.value) and "step-00000003: state.pt does not match" in str(error.value)
    assert _snapshot(out_dir) == before


# ----------------------------------------------------------------------------
# The saved config and the resuming one
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "named"), [
    (dict(lora_r=8), "lora_r 4 -> 8"),
    (dict(seed=1, batch_size=8), "batch_size 16 -> 8, seed 0 -> 1"),
    (dict(lora_targets=".*query"), 'lora_targets "all-linear" -> ".*query"'),
])
def test_resuming_with_a_different_config_is_refused(runs, tmp_path, changes, named):
    out_dir = _copy_of_first(runs, tmp_path)
    before = _snapshot(out_dir)
    with pytest.raises(ConfigError, match="differs from the saved one") as error:
        _resume(runs, out_dir, **changes)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert _snapshot(out_dir) == before  # a refused resume leaves out_dir as it was


def test_allowed_changes_apply(runs, tmp_path):
    """max_steps, lr and the log cadence may change on resume, and a new lr is the one used."""
    out_dir = _copy_of_first(runs, tmp_path)
    resumed = _resume(runs, out_dir, lr=5e-3, log_every=2)
    assert resumed.steps == 6
    assert [(r["step"], r["lr"]) for r in _log(out_dir) if r["kind"] == "train" and r["step"] > 4] == [(6, 5e-3)]


def test_resume_allow_changes_lets_a_deliberate_change_through(runs, tmp_path):
    out_dir = _copy_of_first(runs, tmp_path)
    with pytest.warns(UserWarning, match="seed 0 -> 1"):
        assert _resume(runs, out_dir, seed=1, resume_allow_changes=True).steps == 6
    # A change the checkpoint cannot take is still a clear error, not torch's size mismatch.
    with pytest.raises(ConfigError, match=r"does not fit this model: .*lora_A.* is \(4, .*\) there, \(8, "):
        _resume(runs, _copy_of_first(runs, tmp_path / "again"), lora_r=8, resume_allow_changes=True)


# ----------------------------------------------------------------------------
# Housekeeping
# ----------------------------------------------------------------------------


def test_resume_removes_stale_temporaries_and_logs_each_step_once(runs, tmp_path):
    out_dir = _copy_of_first(runs, tmp_path)
    dead_pid = 2**22 + 1  # above Linux's largest process id: no process has it
    stale = [out_dir / "checkpoints" / f".step-00000005.tmp-{dead_pid}", out_dir / f".final.tmp-{dead_pid}"]
    live = out_dir / "checkpoints" / f".step-00000005.tmp-{os.getppid()}"  # a live writer's: left alone
    for folder in (*stale, live):
        folder.mkdir()
    resumed = _resume(runs, out_dir)
    assert resumed.losses == runs.whole.losses[4:]
    assert not any(folder.exists() for folder in stale) and live.is_dir()
    log = _log(out_dir)
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["stopped"]) for r in log if r["kind"] == "end"] == [(4, "max_steps"), (6, "max_steps")]
    assert [r["step"] for r in log if r["kind"] == "config"] == [0, 4]  # one per run segment, where it starts
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoints", "final", "log.jsonl"]


def test_a_failed_export_leaves_the_previous_final_folder(runs, tmp_path, monkeypatch):
    out_dir = _copy_of_first(runs, tmp_path)
    before = _snapshot(out_dir / "final")

    def export_that_dies(model, tokenizer, config, folder, **options):
        folder.mkdir()
        (folder / "adapter").mkdir()
        raise KeyboardInterrupt  # killed half way

    monkeypatch.setattr(train_module, "_export", export_that_dies)
    with pytest.raises(KeyboardInterrupt):
        _resume(runs, out_dir)
    assert _snapshot(out_dir / "final") == before
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("changes", "error"), [
    (dict(label_column="stars"), "has no column 'stars'"),  # the data cannot be read
    (dict(max_length=100), "longer than the model allows"),  # the model refuses the config
], ids=["bad-data", "bad-model-config"])
def test_a_failed_start_leaves_no_out_dir(runs, tmp_path, changes, error):
    out_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=error):
        _train(runs.config(out_dir, **changes))
    assert not out_dir.exists()


def test_an_out_dir_that_is_a_file_is_named_before_the_model_loads(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_task_and_model", lambda *args: pytest.fail("the model was loaded"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=re.escape(f"out_dir '{a_file}' is a file")):
        _train(runs.config(a_file))
    below_a_file = a_file / "run"
    with pytest.raises(ConfigError, match=re.escape(f"out_dir '{below_a_file}' cannot be created: '{a_file}' is")):
        _train(runs.config(below_a_file))
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_dir_that_is_not_writable_is_named(runs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="is not writable"):
        _train(runs.config(locked))
