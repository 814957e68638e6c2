"""report_to: log.jsonl always, then TensorBoard, Weights & Biases (offline) and MLflow (a local store), each
read back through its own library; a tracker whose package is missing is refused before anything runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

import ember.engine.reporting as reporting
import ember.engine.train as train_module
from ember.engine.config import ConfigError, TrainConfig, load_config
from ember.engine.reporting import TRACKERS, RunLog, trackers_of
from ember.kernels.backend import forced_backend

# One run segment as the loop writes it: config, evaluations, training records, end.
RECORDS = [("config", 0, {"config": {"lr": 0.5}, "precision": "fp32 (asked for)"}),
           ("eval", 0, {"loss": 0.7, "accuracy": 0.5}),
           ("train", 5, {"loss": 0.6, "lr": 0.01, "tokens_per_s": 1200.0}),
           ("train", 10, {"loss": 0.4, "lr": 0.005, "tokens_per_s": 1300.0}),
           ("eval", 10, {"loss": 0.45, "accuracy": 0.75}),
           ("end", 10, {"stopped": "max_steps", "seconds": 2.5, "peak_memory_mb": 300.0})]
TRAIN_LOSS = [(5, 0.6), (10, 0.4)]


@pytest.fixture
def offline_trackers(monkeypatch, tmp_path):
    """Weights & Biases offline and quiet, every file of it under tmp_path (a run's in out_dir/wandb); no MLflow
    server named."""
    for variable in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # wandb would otherwise wrap this process's stdout
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # ember sets it for its local store: undone after


def _write_run(out_dir: Path, **config) -> None:
    log = RunLog(out_dir, TrainConfig(out_dir=str(out_dir), **config), resumed_step=None)
    for kind, step, values in RECORDS:
        log.write(kind, step, **values)
    log.close()


@pytest.mark.parametrize("name", list(TRACKERS))
def test_a_missing_package_is_a_config_error_with_the_install_command(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, TRACKERS[name].package, None)  # import wandb (etc.) now fails
    message = f"report_to {name}: the {TRACKERS[name].package} package is not installed; install it with: pip install"
    with pytest.raises(ConfigError, match=message):
        trackers_of(TrainConfig(report_to=(name,)))
    # Through the training loop: refused before the model loads (this model folder does not exist) and before
    # out_dir is written.
    config = TrainConfig(model=str(tmp_path / "no-model"), out_dir=str(tmp_path / "run"), report_to=(name,))
    with pytest.raises(ConfigError, match=message):
        train_module.train(config)
    assert not (tmp_path / "run").exists()


def test_tensorboard_true_is_report_to_tensorboard_and_all_is_every_installed_tracker(monkeypatch):
    assert trackers_of(TrainConfig()) == []
    assert trackers_of(TrainConfig(tensorboard=True, report_to=("tensorboard",))) == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    installed = [name for name in TRACKERS if name != "mlflow" and reporting._installed(TRACKERS[name].package)]
    assert trackers_of(TrainConfig(report_to=("all",))) == installed  # mlflow left out, not refused
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match="report_to tensorboard: the tensorboard package is not installed"):
        trackers_of(TrainConfig(tensorboard=True))


@pytest.mark.parametrize(("text", "expected"), [
    ("wandb", ("wandb",)), ("tensorboard,mlflow", ("tensorboard", "mlflow")), ("none", ()), ("all", ("all",)),
])
def test_report_to_as_trainingarguments_takes_it(text, expected, tmp_path):
    assert load_config(None, ["--report_to", text]).report_to == expected
    toml = tmp_path / "job.toml"
    toml.write_text(f"report_to = {json.dumps(text.split(','))}\n")  # a list in a file
    assert load_config(toml).report_to == expected
    yaml = tmp_path / "job.yaml"
    yaml.write_text(f"report_to: {text}\n")  # one name (or "none") in a YAML file
    assert load_config(yaml).report_to == (expected if "," not in text else ("tensorboard", "mlflow"))


@pytest.mark.parametrize(("arguments", "message"), [
    (["--report_to", "comet_ml"], "report_to: expected names among tensorboard, wandb, mlflow, or all, or none; "
                                  "got 'comet_ml'"),
    (["--report_to", "all,wandb"], "report_to: all and none stand alone, got all, wandb"),
])
def test_bad_report_to(arguments, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, arguments)


def test_tensorboard_reads_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_run(tmp_path / "run", report_to=("tensorboard",))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(event.step, round(event.value, 6)) for event in events.Scalars("train/loss")] == TRAIN_LOSS
    assert [event.value for event in events.Scalars("eval/accuracy")] == [0.5, 0.75]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(line["kind"], line["step"]) for line in lines] == [(kind, step) for kind, step, _ in RECORDS]


def _wandb_records(path: Path):
    """The records of a wandb run file: wandb's 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks, each a 7-byte header -- checksum, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last --
    and its bytes), each record a protocol buffer of wandb's own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run(folder: Path) -> list:
    """The records of the one offline run under ``folder``/wandb, once wandb has written them whole: its
    service process writes the run file on its own after run.finish() returns (a fraction of a second)."""
    [path] = folder.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 30
    while True:
        records = list(_wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.time() > deadline:
            return records
        time.sleep(0.1)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb keeps a key with a slash as its parts


def test_wandb_offline_reads_back(offline_trackers, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed")
    _write_run(tmp_path / "run", report_to=("wandb",), lr=0.25)
    history, config, exit_code = [], {}, None
    for record in _wandb_run(tmp_path / "run"):  # offline: files in out_dir/wandb, no network
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            assert (record.run.project, record.run.display_name) == ("ember", "run")
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row] == TRAIN_LOSS, history
    assert [row["eval/accuracy"] for row in history if "eval/accuracy" in row] == [0.5, 0.75]
    assert config["lr"] == 0.25 and config["out_dir"] == str(tmp_path / "run")
    assert exit_code == 0


def test_wandb_is_offline_in_out_dir_unless_the_user_says_otherwise(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed")
    calls = []

    class FakeRun:
        dir = str(tmp_path / "fake" / "files")
        settings = type("Settings", (), {"mode": "offline"})

        def log(self, values, step):
            pass

        def finish(self, exit_code):
            calls.append({"exit_code": exit_code})

    monkeypatch.setattr(wandb, "init", lambda **arguments: calls.append(arguments) or FakeRun())
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME"):
        monkeypatch.delenv(variable, raising=False)
    _write_run(tmp_path / "run", report_to=("wandb",))
    assert {key: calls[0][key] for key in ("mode", "dir", "project", "name")} == {
        "mode": "offline", "dir": str(tmp_path / "run"), "project": "ember", "name": "run"}
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    _write_run(tmp_path / "again", report_to=("wandb",))
    assert (calls[2]["mode"], calls[2]["project"], calls[2]["dir"]) == ("online", "mine", str(tmp_path / "again"))
    assert calls[1] == calls[3] == {"exit_code": 0}


def test_mlflow_local_store_reads_back(offline_trackers, monkeypatch, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed")
    from mlflow.tracking import MlflowClient

    _write_run(tmp_path / "run", report_to=("mlflow",), lr=0.25)
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("ember").experiment_id])
    assert [(metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "train/loss")] \
        == TRAIN_LOSS
    assert run.data.params["lr"] == "0.25" and run.data.params["betas"] == "[0.9, 0.999]"
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run")

    # MLFLOW_TRACKING_URI, when set, is where the run goes.
    elsewhere = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    _write_run(tmp_path / "second", report_to=("mlflow",))
    assert not (tmp_path / "second" / "mlruns").exists()
    client = MlflowClient(tracking_uri=elsewhere)
    assert len(client.search_runs([client.get_experiment_by_name("ember").experiment_id])) == 1


def test_a_run_that_fails_is_closed_as_failed(offline_trackers, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed")
    from mlflow.tracking import MlflowClient

    log = RunLog(tmp_path / "run", TrainConfig(report_to=("mlflow",)), resumed_step=None)
    log.write("train", 5, loss=0.5)
    log.close()  # no "end" record: the run stopped on an error
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("ember").experiment_id])
    assert run.info.status == "FAILED"


def test_training_reports_to_every_installed_tracker(offline_trackers, tiny_bert, sentiment_csv, tmp_path, capsys):
    """report_to = "all" through the loop: each installed tracker gets the train and eval scalars."""
    config = TrainConfig(model=str(tiny_bert), data=str(sentiment_csv), out_dir=str(tmp_path / "run"),
                         max_length=16, eval_size=50, batch_size=8, max_steps=4, warmup_steps=1, eval_every=2,
                         save_every=4, lora_r=4, lora_alpha=8.0, progress=False, log_every=2, precision="fp32",
                         report_to=("all",))
    names = trackers_of(config)
    if not names:
        pytest.skip("none of tensorboard, wandb, mlflow is installed")
    with forced_backend("torch"):
        train_module.train(config)
    said = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("logs: "))
    assert said.count("; ") == len(names)  # log.jsonl, then one place per tracker
    if "tensorboard" in names:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
        events.Reload()
        assert [event.step for event in events.Scalars("train/loss")] == [2, 4]
        assert [event.step for event in events.Scalars("eval/accuracy")] == [0, 2, 4]
    if "wandb" in names:
        history = [{_key(item): json.loads(item.value_json) for item in record.history.item}
                   for record in _wandb_run(tmp_path / "run") if record.WhichOneof("record_type") == "history"]
        assert [row["_step"] for row in history if "train/loss" in row] == [2, 4]
        assert "(upload: wandb sync " in said
    if "mlflow" in names:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
        [run] = client.search_runs([client.get_experiment_by_name("ember").experiment_id])
        assert [metric.step for metric in client.get_metric_history(run.info.run_id, "eval/accuracy")] == [0, 2, 4]
        assert run.info.status == "FINISHED"
