"""The training loop. It reads top to bottom: the model, logs, the run's named steps, then ``train`` itself.

    result = train(load_config())          # the default job

``train`` is a short loop over the steps below it (nanoGPT's ``train.py`` is
the model): start, resume, open the log, one accumulated step, the optimizer
step (or a skipped one), evaluate, checkpoint, finish. Every piece of the run
they share lives in one ``Run``.

A start that fails (bad data, a model that does not load, a refused resume)
leaves ``out_dir`` as it found it: nothing is written there until the run
has started and resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import resource
import signal
import sys
import time
import warnings
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .atomic import remove_stale_temporaries, write_atomically
from .checkpoint import (check_config, copy_parameters, latest, list_checkpoints, load_checkpoint, load_trainable,
                         remove_damaged, save_checkpoint)
from .config import ConfigError, TrainConfig, TrainingError
from .data import DataPosition, model_folder, next_batch
from .device import resolve_device
from .lora import LoRAConfig, apply_lora, lora_report
from .metrics import ClassificationReport
from .optim import build
from .patch import patch
from .peft_format import save_adapter
from .precision import Precision, decide
from .schedule import lr_factor
from .tasks import TASKS


@dataclasses.dataclass
class LoopState:
    """What a checkpoint must hold besides tensors for a resumed run to continue exactly."""

    step: int = 0
    position: DataPosition = dataclasses.field(default_factory=DataPosition)
    bad_steps: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        """The inverse of ``dataclasses.asdict``: checkpoints hold the loop state as plain data."""
        return cls(**{**saved, "position": DataPosition(**saved["position"])})


@dataclasses.dataclass
class TrainResult:
    steps: int
    stopped: str  # "max_steps", "early_stopping", "interrupted"
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    report: ClassificationReport | None
    seconds: float
    peak_memory_mb: float
    out_dir: Path
    losses: list[float]


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@contextmanager
def _named_load_errors(folder: Path, what: str):
    """A folder transformers cannot read (garbage config, truncated weights, ...) as a ConfigError naming it."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model folder {str(folder)!r}: cannot load its {what}: {reason}") from None


def load_tokenizer(folder: Path):
    import transformers

    with _named_load_errors(folder, "tokenizer"):
        return transformers.AutoTokenizer.from_pretrained(folder)


def load_model(config: TrainConfig, folder: Path, class_names: list[str]) -> nn.Module:
    """The task's model from ``folder``, with a fresh classification head where there is one."""
    import transformers

    with _quiet_transformers(), _named_load_errors(folder, "model"):
        if config.task == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            model_class = {"sequence-classification": transformers.AutoModelForSequenceClassification,
                           "token-classification": transformers.AutoModelForTokenClassification}[config.task]
            model = model_class.from_pretrained(
                folder, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                label2id={name: i for i, name in enumerate(class_names)}, dtype=torch.float32)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.max_length > limit:
        raise ConfigError(f"max_length {config.max_length} is longer than the model allows ({limit} positions)")
    return model


@contextmanager
def _quiet_transformers():
    """transformers reports the fresh head's weights as missing, which is the point here."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def head_name(model: nn.Module) -> str:
    for name in ("classifier", "score", "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"cannot find the output head of {type(model).__name__}")


def prepare_model(model: nn.Module, config: TrainConfig, precision) -> nn.Module:
    """ember's kernels, LoRA or full fine-tuning, dtype and gradient checkpointing."""
    if config.ember_kernels:
        patch(model)
    if config.lora_r:
        head = head_name(model)
        # LoRA on every Linear of the body. A fresh classification head is trained
        # whole (PEFT's modules_to_save); a causal LM's head stays frozen.
        targets = [name for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name != head and not name.startswith(head + ".")]
        lora = LoRAConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target_modules=targets if config.lora_targets == "all-linear" else config.lora_targets,
                          quantize_base="nf4" if config.qlora else None)
        try:
            model = apply_lora(model, lora)
        except ValueError as error:  # apply_lora names what matched nothing and what there is
            raise ConfigError(f"lora_targets {config.lora_targets!r}: {error}") from None
        if config.task != "causal-lm":
            for p in getattr(model, head).parameters():
                p.requires_grad_(True)
    if precision.param_dtype != torch.float32:
        model.to(precision.param_dtype)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _task_and_model(config: TrainConfig, precision: Precision, device: torch.device):
    """The tokenizer comes first (the task tokenizes its data), the data before the model (the head's classes)."""
    folder = model_folder(config.model)
    task = TASKS[config.task](config, load_tokenizer(folder), device)
    model = load_model(config, folder, task.class_names)
    return task, prepare_model(model, config, precision).to(device)



# ----------------------------------------------------------------------------
# Interrupts, logs, random states
# ----------------------------------------------------------------------------


@contextmanager
def interrupt_flag():
    """Ctrl-C sets a flag instead of raising: the loop finishes its step, saves and stops."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["set"] = True
        print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # peak resident set, KiB on Linux


class RunLog:
    """JSON lines in out_dir/log.jsonl, and TensorBoard events when asked for.

    The log describes the run in out_dir once: a fresh run starts it anew, a
    run resumed at step N keeps the records up to step N (those of the steps
    it redoes go, so no step is logged twice) and appends its own, starting
    with a "config" record at step N. Each run segment ends with one "end"
    record.
    """

    def __init__(self, out_dir: Path, tensorboard: bool, resumed_step: int | None):
        if tensorboard:  # checked before anything is written
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ConfigError(f"tensorboard = true needs the tensorboard package ({error})") from None
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "log.jsonl"
        kept = _records_through(path, resumed_step) if resumed_step is not None else []
        write_atomically(path, lambda temporary: temporary.write_text("".join(kept), encoding="utf-8"))
        self.file = open(path, "a", encoding="utf-8")
        self.writer = SummaryWriter(str(out_dir / "tensorboard")) if tensorboard else None

    def write(self, kind: str, step: int, **values) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:  # contextlib.closing(log) closes it however the run ends
        self.file.close()
        if self.writer is not None:
            self.writer.close()


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


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------
# The run and its steps
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything one training run holds, built once by ``start`` and read by each step."""

    config: TrainConfig
    device: torch.device
    precision: Precision
    out_dir: Path
    task: object  # one of TASKS
    model: nn.Module
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    log: RunLog | None = None  # opened by open_log once the run has started and resumed
    state: LoopState = dataclasses.field(default_factory=LoopState)
    losses: list[float] = dataclasses.field(default_factory=list)  # one per optimizer step of this process
    tokens_seen: int = 0
    started: float = 0.0  # when the loop started (time.time())
    saved_step: int | None = None  # the step of the latest checkpoint on disk


def _check_out_dir(out_dir: Path) -> None:
    """A ConfigError now, rather than after the model has loaded, when out_dir cannot hold the run."""
    existing = next(folder for folder in (out_dir, *out_dir.parents) if folder.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"cannot be created: {str(existing)!r} is a file"
        raise ConfigError(f"out_dir {str(out_dir)!r} {where}; expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == out_dir else f"cannot be created in {str(existing)!r}, not writable"
        raise ConfigError(f"out_dir {str(out_dir)!r} {where}")


def start(config: TrainConfig) -> Run:
    """Init: seeds, device, precision, out_dir checked; then data, model, optimizer, schedule and loss scaling."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = resolve_device(config.device)
    precision = decide(config.precision, device)
    out_dir = Path(config.out_dir)
    _check_out_dir(out_dir)
    print(f"precision: {precision}")

    task, model = _task_and_model(config, precision, device)
    print(f"model: {config.model}, {lora_report(model) if config.lora_r else 'full fine-tune'}")
    print(f"data: {task.describe()}")

    trainable = trainable_parameters(model)
    optimizer = build(config.optimizer, list(trainable.values()), lr=config.lr, betas=config.betas,
                      weight_decay=config.weight_decay, stochastic_rounding=precision.stochastic_rounding)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return Run(config, device, precision, out_dir, task, model, trainable, optimizer, schedule,
               scaler=precision.grad_scaler())


def resume(run: Run) -> None:
    """Continue from the latest whole checkpoint with ``resume``; without it, refuse to write over checkpoints.

    Damaged checkpoints are skipped with a warning; a saved config that differs from this run's in what is
    trained is refused (``resume_allow_changes`` lets it through). Only once the checkpoint is loaded does
    the housekeeping change out_dir.
    """
    if not list_checkpoints(run.out_dir):
        return
    if not run.config.resume:
        raise ConfigError(f"{run.out_dir} already holds checkpoints: pass --resume=true to continue, "
                          f"or choose another out_dir")
    folder, damaged = latest(run.out_dir)
    check_config(folder, run.config.to_dict(), allow_changes=run.config.resume_allow_changes)
    saved_params, saved = load_checkpoint(folder)
    copy_parameters(saved_params, run.trainable, folder)
    try:
        _restore_states(run, saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{folder / 'state.pt'} does not fit this run: {str(error).splitlines()[0]}") from None
    remove_damaged(run.out_dir, damaged)
    print(f"resumed from {folder} at step {run.state.step}")


def _restore_states(run: Run, saved: dict) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    run.schedule.load_state_dict(saved["schedule"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = LoopState.from_dict(saved["loop"])
    run.saved_step = run.state.step
    _set_rng_states(saved["rng"])
    # lr, betas and weight decay may change on resume, but the saved optimizer and schedule carry the old
    # ones: this run's config wins (unchanged values give the same floats, so the resume stays exact).
    config = run.config
    run.schedule.base_lrs = [config.lr] * len(run.optimizer.param_groups)
    for group in run.optimizer.param_groups:
        group.update(initial_lr=config.lr, lr=config.lr * lr_factor(run.schedule.last_epoch, config),
                     betas=config.betas, weight_decay=config.weight_decay)


def open_log(run: Run) -> RunLog:
    """The run's log, opened once it has started and resumed; its first record is the config of this segment."""
    run.log = RunLog(run.out_dir, run.config.tensorboard, resumed_step=run.saved_step)
    remove_stale_temporaries(run.out_dir)  # a final/ export or log rewrite killed mid-write
    run.log.write("config", run.state.step, config=run.config.to_dict(), precision=str(run.precision))
    return run.log


def accumulated_step(run: Run) -> float:
    """Forward and backward over ``grad_accum`` micro-batches; the loss is normalized by the targets of
    the whole accumulated batch. Returns the batch's loss."""
    config, task = run.config, run.task
    micro_batches = [task.batch(next_batch(task.train_examples, config.batch_size, config.seed, run.state.position))
                     for _ in range(config.grad_accum)]
    targets = sum(task.targets(batch) for batch in micro_batches)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=run.device.type == "cuda") \
        if config.offload_activations else nullcontext()
    loss_total = 0.0
    for batch in micro_batches:
        with offload:
            with run.precision.autocast():
                loss = task.loss(run.model, batch, targets)
            run.scaler.scale(loss).backward()
        loss_total += loss.item()
        run.tokens_seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
            else batch["input_ids"].numel()
    return loss_total


def optimizer_step(run: Run, loss: float) -> None:
    """Clip, step (through the scaler: an fp16 overflow changes nothing), advance the schedule."""
    if run.config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.bad_steps = 0
    run.state.step += 1
    run.losses.append(loss)


def skip_step(run: Run, loss: float) -> None:
    """A non-finite loss: drop its gradients; too many in a row end the run."""
    run.optimizer.zero_grad(set_to_none=True)
    run.state.bad_steps += 1
    warnings.warn(f"step {run.state.step}: loss is {loss}; step skipped "
                  f"({run.state.bad_steps} in a row, the run stops at {run.config.max_bad_steps})")
    if run.state.bad_steps >= run.config.max_bad_steps:
        raise TrainingError(f"{run.state.bad_steps} non-finite losses in a row at step {run.state.step}: "
                            f"lower lr, or use precision bf16/fp32")


def report_progress(run: Run, loss: float, progress: tqdm) -> None:
    lr = run.schedule.get_last_lr()[0]
    tokens_per_s = run.tokens_seen / (time.time() - run.started)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
    progress.update(1)
    if run.state.step % run.config.log_every == 0:
        run.log.write("train", run.state.step, loss=loss, lr=lr, tokens_per_s=tokens_per_s,
                      peak_memory_mb=peak_memory_mb(run.device))


def evaluate(run: Run) -> tuple[dict[str, float], ClassificationReport | None]:
    """Held-out metrics of the model as it is now, written to the log."""
    metrics, report = run.task.evaluate(run.model, run.precision)
    run.log.write("eval", run.state.step, **metrics)
    return metrics, report


def stops_early(run: Run, metrics: dict[str, float]) -> bool:
    """True when ``early_stopping_metric`` has not improved for ``early_stopping_patience`` evaluations."""
    name, state = run.config.early_stopping_metric, run.state
    if not name:
        return False
    if name not in metrics:
        raise ConfigError(f"early_stopping_metric {name!r} is not reported; metrics: {', '.join(metrics)}")
    value = metrics[name]
    better = state.best_metric is None or (value < state.best_metric if name == "loss" else value > state.best_metric)
    if better:
        state.best_metric, state.evals_without_improvement = value, 0
        return False
    state.evals_without_improvement += 1
    return state.evals_without_improvement >= run.config.early_stopping_patience


def save(run: Run) -> None:
    """A checkpoint of this step: trainable tensors, optimizer, schedule, scaler, loop and RNG states."""
    state = {"optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), "loop": dataclasses.asdict(run.state), "rng": _rng_states()}
    write_adapter = (lambda folder: save_adapter(run.model, folder / "adapter")) if run.config.lora_r else None
    save_checkpoint(run.out_dir, run.state.step, run.trainable, state, run.config.to_dict(), run.config.keep_last,
                    write_extra=write_adapter)
    run.saved_step = run.state.step


def _export(model, tokenizer, config: TrainConfig, folder: Path) -> None:
    """LoRA: the adapter in PEFT's format (and a trained classification head); full fine-tune: a model folder.

    Written to ``folder`` by ``write_atomically``: a kill mid-export leaves the previous export, never half."""
    from safetensors.torch import save_file

    folder.mkdir()
    if config.lora_r:
        save_adapter(model, folder / "adapter")
    if config.lora_r and config.task != "causal-lm":
        head = head_name(model)
        save_file({f"{head}.{name}": p.detach().cpu().contiguous() for name, p in getattr(model, head).named_parameters()},
                  str(folder / "head.safetensors"))
    if not config.lora_r:
        model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "tokenizer")


def _format(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def finish(run: Run, stopped: str, eval_before: dict[str, float]) -> TrainResult:
    """The final evaluation and, unless interrupted, the export; the run's result."""
    seconds = time.time() - run.started
    eval_after, report = evaluate(run)
    if stopped != "interrupted":
        export = functools.partial(_export, run.model, run.task.tokenizer, run.config)
        write_atomically(run.out_dir / "final", export)
    memory = peak_memory_mb(run.device)
    run.log.write("end", run.state.step, stopped=stopped, seconds=seconds, peak_memory_mb=memory)
    return TrainResult(steps=run.state.step, stopped=stopped, eval_before=eval_before, eval_after=eval_after,
                       report=report, seconds=seconds, peak_memory_mb=memory, out_dir=run.out_dir, losses=run.losses)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune as ``config`` says. Ctrl-C finishes the step, saves a checkpoint and returns
    ``stopped="interrupted"``; ``resume=true`` continues from it exactly."""
    run = start(config)
    resume(run)
    with closing(open_log(run)):
        eval_before, _ = evaluate(run)
        print(f"held-out before: {_format(eval_before)}")
        stopped = "max_steps" if run.state.step >= config.max_steps else None  # None: still running
        run.model.train()
        run.started = time.time()
        with interrupt_flag() as interrupted, tqdm(total=config.max_steps, initial=run.state.step,
                                                   disable=not config.progress, desc="train") as progress:
            while stopped is None:
                loss = accumulated_step(run)
                if math.isfinite(loss):
                    optimizer_step(run, loss)
                    report_progress(run, loss, progress)
                    if run.state.step % config.eval_every == 0 and run.state.step < config.max_steps:
                        metrics, _ = evaluate(run)
                        progress.write(f"step {run.state.step}: {_format(metrics)}")
                        stopped = "early_stopping" if stops_early(run, metrics) else None
                else:
                    skip_step(run, loss)
                if interrupted["set"]:
                    stopped = "interrupted"
                elif stopped is None and run.state.step >= config.max_steps:
                    stopped = "max_steps"
                if (stopped or run.state.step % config.save_every == 0) and run.saved_step != run.state.step:
                    save(run)
        return finish(run, stopped, eval_before)


# ----------------------------------------------------------------------------
# Evaluating a saved run
# ----------------------------------------------------------------------------


def evaluate_checkpoint(config: TrainConfig) -> tuple[dict, ClassificationReport | None]:
    """Held-out metrics of the latest checkpoint in ``config.out_dir``, the model prepared as for training."""
    folder, _ = latest(Path(config.out_dir))  # damaged ones skipped with a warning, left as they are
    device = resolve_device(config.device)
    precision = decide(config.precision, device)
    task, model = _task_and_model(config, precision, device)
    copy_parameters(load_trainable(folder), trainable_parameters(model), folder)
    return task.evaluate(model, precision)
