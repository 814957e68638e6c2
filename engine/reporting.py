"""Where a run's records go: JSON lines in out_dir/log.jsonl always, then each tracker of ``report_to``.

A record is a kind, a step and values: "config" once per run segment, "train" every ``log_every`` steps,
"eval" at each evaluation, "end" once. log.jsonl keeps every record whole. A tracker takes the numbers of each
record as scalars named kind/key (train/loss, eval/accuracy) at that step, and the config once, as its own
parameters. The trackers, named as ``TrainingArguments.report_to`` names them:

- tensorboard: event files in out_dir/tensorboard (``torch.utils.tensorboard``).
- wandb: a Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise: a training machine often has
  no network (or no login), and an online run there would stall retrying. The offline run lies in
  out_dir/wandb (or ``WANDB_DIR``); ``wandb sync`` uploads it. ``WANDB_PROJECT`` (default "ember") and
  wandb's other variables are honoured.
- mlflow: an MLflow run in the store ``MLFLOW_TRACKING_URI`` names, else in a local file store,
  out_dir/mlruns, in experiment ``MLFLOW_EXPERIMENT_NAME`` (default "ember"). MLflow 3 keeps its file store
  behind ``MLFLOW_ALLOW_FILE_STORE``, which is set for that store when the user has not set it.

Only rank 0 reports; the other ranks get ``NoLog``. A resumed run opens a new tracker run, which starts at the
checkpoint's step: the steps after the checkpoint are trained (and logged) again, and a tracker run does not
take a step it has already seen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_atomically
from .errors import ConfigError

if TYPE_CHECKING:  # the config checks report_to against TRACKERS: it imports this module
    from .config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Tracker:
    package: str  # the module that must be importable
    install: str  # the command that installs it


TRACKERS = {
    "tensorboard": Tracker("tensorboard", "pip install tensorboard"),
    "wandb": Tracker("wandb", "pip install wandb"),
    "mlflow": Tracker("mlflow", "pip install mlflow-skinny"),  # the client without the server's dependencies
}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def trackers_of(config: TrainConfig) -> list[str]:
    """The trackers a run of ``config`` reports to: those of ``report_to`` ("all": every one installed, as the
    Trainer reads it), and tensorboard with ``tensorboard = true``. A tracker whose package is not installed is
    a ConfigError naming the package and the command that installs it."""
    if tuple(config.report_to) == ("all",):
        names = [name for name, tracker in TRACKERS.items() if _installed(tracker.package)]
    else:
        names = [name for name in config.report_to if name != "none"]
    if config.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    for name in names:
        if not _installed(TRACKERS[name].package):
            raise ConfigError(f"report_to {name}: the {TRACKERS[name].package} package is not installed; "
                              f"install it with: {TRACKERS[name].install}")
    return names


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


# ----------------------------------------------------------------------------
# The reporters: write(kind, step, values) and close(stopped), where stopped is the "end" record's reason
# ("max_steps", "early_stopping", "interrupted"), or None when the run ended without one (an error).
# ----------------------------------------------------------------------------


class JsonLines:
    """out_dir/log.jsonl. A fresh run starts it anew; a run resumed at step N keeps the records up to step N
    (those of the steps it redoes go, so no step is logged twice) and appends its own."""

    def __init__(self, out_dir: Path, resumed_step: int | None):
        path = out_dir / "log.jsonl"
        kept = _records_through(path, resumed_step) if resumed_step is not None else []
        write_atomically(path, lambda temporary: temporary.write_text("".join(kept), encoding="utf-8"))
        self.file = open(path, "a", encoding="utf-8")
        self.where = f"{path}"

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()

    def close(self, stopped: str | None) -> None:
        self.file.close()


def _records_through(path: Path, step: int) -> list[str]:
    """The lines of the log at ``path`` whose step is at most ``step``; a line torn by a kill is dropped."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
    return kept


class TensorBoard:
    def __init__(self, out_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.where = f"tensorboard in {out_dir / 'tensorboard'}"

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        for key, value in _scalars(values).items():
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self, stopped: str | None) -> None:
        self.writer.close()


def _env_or(variable: str, value: str) -> str:
    """The user's setting of wandb's ``variable``, read now, else ember's ``value``. Passed to wandb.init
    explicitly: wandb reads its variables once per process, so a second run in the same process (a notebook,
    the tests) would otherwise go where the first one went."""
    return os.environ.get(variable, value)


class WandB:
    def __init__(self, out_dir: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(mode=_env_or("WANDB_MODE", "offline"), dir=_env_or("WANDB_DIR", str(out_dir)),
                              project=_env_or("WANDB_PROJECT", "ember"), name=_env_or("WANDB_NAME", out_dir.name),
                              config=config, reinit="create_new")  # never takes over a run the caller has open
        folder = Path(self.run.dir).parent
        self.where = (f"wandb offline run {folder} (upload: wandb sync {folder})" if self.run.settings.mode == "offline"
                      else f"wandb run {getattr(self.run, 'url', None) or folder}")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        scalars = _scalars(values)
        if scalars:
            self.run.log({f"{kind}/{key}": value for key, value in scalars.items()}, step=step)

    def close(self, stopped: str | None) -> None:
        self.run.finish(exit_code=0 if stopped is not None else 1)


class MLflow:
    def __init__(self, out_dir: Path, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 refuses its file store unless this is set (a database store needs SQLAlchemy)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out_dir / "mlruns").resolve().as_uri()
        # The client, not mlflow's module-level active run: a caller's own MLflow run is left alone.
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ember")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        self.where = f"mlflow run {self.run_id} in {uri}"
        self.client.log_batch(self.run_id, params=[Param(key, json.dumps(value) if not isinstance(value, str)
                                                         else value) for key, value in config.items()])

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{key}", float(value), now, step) for key, value in _scalars(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, stopped: str | None) -> None:
        status = "FAILED" if stopped is None else "KILLED" if stopped == "interrupted" else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)


_OPEN = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class RunLog:
    """The run's records, written to log.jsonl and to each tracker of the config (see the module's notes).

    Each run segment's records start with a "config" record at the step it starts from and end with one
    "end" record; ``contextlib.closing(log)`` closes every reporter however the run ends.
    """

    def __init__(self, out_dir: Path, config: TrainConfig, resumed_step: int | None):
        names = trackers_of(config)  # a missing package is refused before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        self.reporters: list = [JsonLines(out_dir, resumed_step)]
        self.stopped: str | None = None
        try:
            for name in names:
                self.reporters.append(_OPEN[name](out_dir, config.to_dict()))
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        """Where the records go, one place per reporter, for the run's opening lines."""
        return "; ".join(reporter.where for reporter in self.reporters)

    def write(self, kind: str, step: int, **values) -> None:
        if kind == "end":
            self.stopped = values.get("stopped")
        for reporter in self.reporters:
            reporter.write(kind, step, values)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close(self.stopped)


class NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, kind: str, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass
