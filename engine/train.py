"""The training loop. It reads top to bottom: config, init, model, data, optimizer, schedule, resume, loop.

    result = train(load_config())          # the default job
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, TrainingError
from .data import DataPosition, model_folder, next_batch
from .lora import LoRAConfig, apply_lora, lora_report, save_adapter
from .metrics import ClassificationReport
from .optim import build
from .patch import patch
from .precision import decide
from .tasks import TASKS

@dataclasses.dataclass
class LoopState:
    step: int = 0
    position: DataPosition = dataclasses.field(default_factory=DataPosition)
    bad_steps: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0


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


def load_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def load_model(config: TrainConfig, folder: Path, class_names: list[str]) -> nn.Module:
    """The task's model from ``folder``, with a fresh classification head where there is one."""
    import transformers

    with _quiet_transformers():
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


def _head_name(model: nn.Module) -> str:
    for name in ("classifier", "score", "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ConfigError(f"cannot find the output head of {type(model).__name__}")


def prepare_model(model: nn.Module, config: TrainConfig, precision) -> nn.Module:
    """ember's kernels, LoRA or full fine-tuning, dtype and gradient checkpointing."""
    if config.ember_kernels:
        patch(model)
    if config.lora_r:
        head = _head_name(model)
        # LoRA on every Linear of the body. A fresh classification head is trained
        # whole (PEFT's modules_to_save); a causal LM's head stays frozen.
        targets = [name for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name != head and not name.startswith(head + ".")]
        lora = LoRAConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target_modules=targets if config.lora_targets == "all-linear" else config.lora_targets,
                          quantize_base="nf4" if config.qlora else None)
        model = apply_lora(model, lora)
        if config.task != "causal-lm":
            for p in getattr(model, head).parameters():
                p.requires_grad_(True)
    if precision.param_dtype != torch.float32:
        model.to(precision.param_dtype)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------
# Schedule, interrupts, logs
# ----------------------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then cosine or linear decay to min_lr_ratio of it at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * decay


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
    """JSON lines in out_dir/log.jsonl, and TensorBoard events when asked for."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "log.jsonl", "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ConfigError(f"tensorboard = true needs the tensorboard package ({error})") from None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, kind: str, step: int, **values) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


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
# The loop
# ----------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    if config.task not in TASKS:
        raise ConfigError(f"task {config.task!r} is not implemented yet; implemented: {', '.join(TASKS)}")

    # -- init: device, precision, output folder, logs
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = _device(config)
    precision = decide(config.precision, device)
    out_dir = Path(config.out_dir)
    log = RunLog(out_dir, config.tensorboard)
    log.write("config", 0, config=config.to_dict(), precision=str(precision))
    print(f"precision: {precision}")

    # -- data and model
    task, model = _task_and_model(config, precision, device)
    trainable = _trainable(model)
    print(f"model: {config.model}, {lora_report(model) if config.lora_r else 'full fine-tune'}")
    print(f"data: {task.describe()}")

    # -- optimizer, schedule, loss scaling
    optimizer = build(config.optimizer, list(trainable.values()), lr=config.lr, betas=config.betas,
                      weight_decay=config.weight_decay, stochastic_rounding=precision.stochastic_rounding)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    scaler = precision.grad_scaler()

    # -- resume
    state = LoopState()
    checkpoints = list_checkpoints(out_dir)
    if config.resume and checkpoints:
        saved_params, saved = load_checkpoint(checkpoints[-1])
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved_params[name])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["loop"]
        _set_rng_states(saved["rng"])
        print(f"resumed from {checkpoints[-1]} at step {state.step}")
    elif checkpoints and not config.resume:
        raise ConfigError(f"{out_dir} already holds checkpoints: pass --resume=true to continue, "
                          f"or choose another out_dir")

    def checkpoint() -> None:
        save_checkpoint(out_dir, state.step, trainable, {
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
            "loop": state, "rng": _rng_states(),
        }, config.to_dict(), config.keep_last,
            write_extra=(lambda folder: save_adapter(model, folder / "adapter")) if config.lora_r else None)

    eval_before, _ = task.evaluate(model, precision)
    print(f"held-out before: {_format(eval_before)}")
    log.write("eval", state.step, **eval_before)

    # -- the loop
    from tqdm import tqdm

    stopped, losses, started = "max_steps", [], time.time()
    tokens_seen = 0
    progress = tqdm(total=config.max_steps, initial=state.step, disable=not config.progress, desc="train")
    model.train()
    with interrupt_flag() as interrupted:
        while state.step < config.max_steps:
            # A whole accumulated batch: the loss is normalized by its number of targets.
            micro_batches = [task.batch(next_batch(task.train_examples, config.batch_size, config.seed,
                                                   state.position)) for _ in range(config.grad_accum)]
            targets = sum(task.targets(batch) for batch in micro_batches)
            loss_total = 0.0
            for batch in micro_batches:
                with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") \
                        if config.offload_activations else nullcontext():
                    with precision.autocast():
                        loss = task.loss(model, batch, targets)
                    scaler.scale(loss).backward()
                loss_total += loss.item()
                tokens_seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                    else batch["input_ids"].numel()
            if not math.isfinite(loss_total):
                optimizer.zero_grad(set_to_none=True)
                state.bad_steps += 1
                warnings.warn(f"step {state.step}: loss is {loss_total}; step skipped "
                              f"({state.bad_steps} in a row, the run stops at {config.max_bad_steps})")
                if state.bad_steps >= config.max_bad_steps:
                    raise TrainingError(f"{state.bad_steps} non-finite losses in a row at step {state.step}: "
                                        f"lower lr, or use precision bf16/fp32")
                continue
            state.bad_steps = 0
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            losses.append(loss_total)

            lr = schedule.get_last_lr()[0]
            elapsed = time.time() - started
            progress.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:.0f}")
            progress.update(1)
            if state.step % config.log_every == 0:
                log.write("train", state.step, loss=loss_total, lr=lr, tokens_per_s=tokens_seen / elapsed,
                          peak_memory_mb=peak_memory_mb(device))

            if state.step % config.eval_every == 0 and state.step < config.max_steps:
                metrics, _ = task.evaluate(model, precision)
                log.write("eval", state.step, **metrics)
                progress.write(f"step {state.step}: {_format(metrics)}")
                if _should_stop_early(metrics, state, config):
                    stopped = "early_stopping"
            if state.step % config.save_every == 0 or stopped != "max_steps" or interrupted["set"]:
                checkpoint()
            if interrupted["set"]:
                stopped = "interrupted"
            if stopped != "max_steps":
                break
    progress.close()
    seconds = time.time() - started

    # -- the end: final evaluation, checkpoint and export
    if stopped == "max_steps" and not (list_checkpoints(out_dir) and
                                       list_checkpoints(out_dir)[-1].name.endswith(f"{state.step:08d}")):
        checkpoint()
    eval_after, report = task.evaluate(model, precision)
    log.write("eval", state.step, **eval_after)
    if stopped != "interrupted":
        _export(model, task.tokenizer, config, out_dir / "final")
    memory = peak_memory_mb(device)
    log.write("end", state.step, stopped=stopped, seconds=seconds, peak_memory_mb=memory)
    log.close()
    return TrainResult(steps=state.step, stopped=stopped, eval_before=eval_before, eval_after=eval_after,
                       report=report, seconds=seconds, peak_memory_mb=memory, out_dir=out_dir, losses=losses)


def evaluate_checkpoint(config: TrainConfig) -> tuple[dict, ClassificationReport | None]:
    """Held-out metrics of the latest checkpoint in ``config.out_dir``, the model prepared as for training."""
    checkpoints = list_checkpoints(Path(config.out_dir))
    if not checkpoints:
        raise ConfigError(f"no checkpoint in {config.out_dir!r} to evaluate")
    device = _device(config)
    precision = decide(config.precision, device)
    task, model = _task_and_model(config, precision, device)
    saved_params, _ = load_checkpoint(checkpoints[-1])
    with torch.no_grad():
        for name, p in _trainable(model).items():
            p.copy_(saved_params[name])
    return task.evaluate(model, precision)


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is available")
    return torch.device(config.device)


def _task_and_model(config: TrainConfig, precision, device: torch.device):
    """The tokenizer comes first (the task tokenizes its data), the data before the model (the head's classes)."""
    folder = model_folder(config.model)
    task = TASKS[config.task](config, load_tokenizer(folder), device)
    model = load_model(config, folder, task.class_names)
    return task, prepare_model(model, config, precision).to(device)


def _should_stop_early(metrics: dict, state: LoopState, config: TrainConfig) -> bool:
    name = config.early_stopping_metric
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
    return state.evals_without_improvement >= config.early_stopping_patience


def _export(model, tokenizer, config: TrainConfig, folder: Path) -> None:
    """LoRA: the adapter in PEFT's format (and a trained classification head); full fine-tune: a model folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if config.lora_r:
        save_adapter(model, folder / "adapter")
    if config.lora_r and config.task != "causal-lm":
        head = _head_name(model)
        save_file({f"{head}.{name}": p.detach().cpu().contiguous() for name, p in getattr(model, head).named_parameters()},
                  str(folder / "head.safetensors"))
    if not config.lora_r:
        model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "tokenizer")


def _format(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
