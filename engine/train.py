"""The training loop. It reads top to bottom: the model, logs, the run's named steps, then ``train`` itself.

    result = train(load_config())          # the default job

``train`` is a short loop over the steps below it (nanoGPT's ``train.py`` is
the model): start, resume, open the log, one accumulated step, the optimizer
step (or a skipped one), evaluate, checkpoint, finish. Every piece of the run
they share lives in one ``Run``.

A start that fails (bad data, a model that does not load, a refused resume)
leaves ``out_dir`` as it found it: nothing is written there until the run
has started and resumed.

Under torchrun (``ember.engine.distributed``) every rank runs this same loop
on its shard of each global batch; the decisions that must agree (a step's
loss, an interrupt, early stopping) are made on values reduced over ranks.
Only rank 0 prints, shows progress, logs and exports.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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

from . import distributed
from .atomic import remove_stale_temporaries, write_atomically
from .checkpoint import (check_config, copy_parameters, is_sharded, latest, list_checkpoints, load_checkpoint,
                         load_shards, load_state, load_trainable, remove_damaged, save_checkpoint,
                         save_sharded_checkpoint)
from .config import ConfigError, TrainConfig, TrainingError
from .data import DataPosition, model_folder, next_batch
from .device import resolve_device
from .distributed import Processes
from .loading import load_pretrained
from .lora import LoRAConfig, apply_lora, lora_report
from .metrics import ClassificationReport, EntityReport
from .optim import build
from .patch import patch
from .peft_format import save_adapter
from .peft_methods import StepHooks, describe, step_hooks, uses_peft, write_adapter
from .peft_methods import wrap as wrap_with_peft
from .precision import Precision, decide
from .reporting import NoLog, RunLog, trackers_of
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
    report: ClassificationReport | EntityReport | None  # held-out, after training (None for a causal LM)
    seconds: float
    peak_memory_mb: float
    out_dir: Path
    losses: list[float]
    report_before: ClassificationReport | EntityReport | None = None  # held-out, before training


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


def load_model(config: TrainConfig, folder: Path, class_names: list[str], device: torch.device | None = None
               ) -> nn.Module:
    """The task's model from ``folder`` on ``device``, with a fresh classification head where there is one; with
    QLoRA its LoRA targets are quantized to NF4 while loading (``ember.engine.loading``)."""
    heads = {} if config.task == "causal-lm" else dict(
        num_labels=len(class_names), id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)})
    quantize = functools.partial(lora_targets, config=config) if config.qlora else None
    with _quiet_transformers(), _named_load_errors(folder, "model"):
        model = load_pretrained(folder, task=config.task, dtype=torch.float32, device=device, quantize=quantize,
                                **heads)
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
    """ember's kernels, LoRA (or another of PEFT's methods) or full fine-tuning, dtype and gradient checkpointing."""
    if config.ember_kernels:
        # ember's evaluation scores causal LMs from the loss alone: no (tokens, vocab) logits at eval either.
        patch(model, return_logits="never")
    if uses_peft(config):
        model = wrap_with_peft(model, config, head=None if config.task == "causal-lm" else head_name(model))
    elif config.lora_r:
        head = head_name(model)
        lora = LoRAConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target_modules=lora_targets(model, config), quantize_base="nf4" if config.qlora else None)
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


def lora_targets(model: nn.Module, config: TrainConfig) -> list[str] | str:
    """LoRA on every Linear of the body. A fresh classification head is trained whole (PEFT's modules_to_save);
    a causal LM's head stays frozen. Other lora_targets: as given (a regex or a name)."""
    if config.lora_targets != "all-linear":
        return config.lora_targets
    head = head_name(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != head and not name.startswith(head + ".")]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _task_and_model(config: TrainConfig, precision: Precision, device: torch.device):
    """The tokenizer comes first (the task tokenizes its data), the data before the model (the head's classes)."""
    folder = model_folder(config.model)
    task = TASKS[config.task](config, load_tokenizer(folder), device)
    model = load_model(config, folder, task.class_names, device)
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


def _say(*args, **kwargs) -> None:
    """print, on rank 0 only (every rank runs the same loop)."""
    if distributed.current().main:
        print(*args, **kwargs)


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
    processes: Processes = Processes()  # this rank among the run's processes (one process alone by default)
    mode: str | None = None  # "ddp" or "fsdp" with several processes
    module: nn.Module | None = None  # the Hugging Face model (``model`` may be its DDP wrapper)
    log: RunLog | NoLog | None = None  # opened by open_log once the run has started and resumed
    state: LoopState = dataclasses.field(default_factory=LoopState)
    losses: list[float] = dataclasses.field(default_factory=list)  # one per optimizer step of this process
    tokens_seen: int = 0
    started: float = 0.0  # when the loop started (time.time())
    saved_step: int | None = None  # the step of the latest checkpoint on disk
    hooks: StepHooks = dataclasses.field(default_factory=StepHooks)  # a PEFT method's (AdaLoRA's rank allocation)


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
    """Init: processes, seeds, device, precision, out_dir checked; then data, model (wrapped for several
    processes), optimizer, schedule and loss scaling."""
    processes, device = distributed.init(config.device)
    torch.manual_seed(config.seed)  # the same on every rank: FSDP2 and DDP need equal initial weights
    random.seed(config.seed)
    precision = decide(config.precision, device)
    mode = distributed.resolve_mode(config.distributed, config.lora_r) if processes.several else None
    if mode is not None:
        distributed.check(mode, lora_r=config.lora_r, qlora=config.qlora, optimizer=config.optimizer,
                          precision=precision.policy)
    if mode is not None and uses_peft(config):
        raise ConfigError(f"peft_method {config.peft_method!r} runs in one process (its PEFT model under DDP is not "
                          f"tested here); launch one process, or use peft_method = 'lora'")
    out_dir = Path(config.out_dir)
    _check_out_dir(out_dir)
    trackers_of(config)  # a tracker's missing package, refused before the model loads
    _say(f"precision: {precision}")

    task, model = _task_and_model(config, precision, device)
    adapters = describe(model, config) if uses_peft(config) else lora_report(model)
    _say(f"model: {config.model}, {adapters if config.lora_r else 'full fine-tune'}")
    _say(f"data: {task.describe()}")
    module = model
    if mode is not None:
        global_micro_batch = config.batch_size * processes.world_size
        if len(task.train_examples) < global_micro_batch:
            raise ConfigError(f"batch_size {config.batch_size} x {processes.world_size} processes = "
                              f"{global_micro_batch} examples per micro-batch, more than the training set holds "
                              f"({len(task.train_examples)})")
        compute = precision.autocast_dtype if mode == "fsdp" and precision.policy == "bf16" else None
        model = distributed.wrap(model, mode, processes, device, compute)
        _say(f"distributed: {mode} over {processes.world_size} processes, global batch {config.batch_size} x "
             f"{config.grad_accum} x {processes.world_size} = {global_micro_batch * config.grad_accum}")
        # Dropout draws its own masks on each rank from here on.
        torch.manual_seed(config.seed + processes.rank)
        random.seed(config.seed + processes.rank)

    trainable = trainable_parameters(module)  # after FSDP2, whose parameters are this rank's shards
    optimizer = build(config.optimizer, list(trainable.values()), lr=config.lr, betas=config.betas,
                      weight_decay=config.weight_decay, stochastic_rounding=precision.stochastic_rounding)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return Run(config, device, precision, out_dir, task, model, trainable, optimizer, schedule,
               scaler=precision.grad_scaler(), processes=processes, mode=mode, module=module,
               hooks=step_hooks(module, config))


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
    folder, damaged = _latest_on_main(run)
    check_config(folder, run.config.to_dict(), allow_changes=run.config.resume_allow_changes,
                 defaults=TrainConfig().to_dict())
    if is_sharded(folder) and run.mode != "fsdp":
        raise ConfigError(f"checkpoint {folder} holds an FSDP2 run's shards: resume it with several processes "
                          f"and distributed = 'fsdp' ('ember eval' reads it in one process)")
    if not is_sharded(folder) and run.mode == "fsdp":
        raise ConfigError(f"checkpoint {folder} was written by one process or DDP: resume it with one process "
                          f"or distributed = 'ddp'")
    if is_sharded(folder):
        saved = load_state(folder)
        _check_world_size(run, saved, folder)
        _initialize_optimizer_state(run.optimizer)  # DCP reads into existing tensors
        tensors = {"model": run.trainable, "optimizer": run.optimizer.state_dict()["state"]}
        load_shards(folder, tensors)
        saved["optimizer"] = {"state": tensors["optimizer"], "param_groups": saved["optimizer"]["param_groups"]}
    else:
        saved_params, saved = load_checkpoint(folder)
        _check_world_size(run, saved, folder)
        copy_parameters(saved_params, run.trainable, folder)
    try:
        _restore_states(run, saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{folder / 'state.pt'} does not fit this run: {str(error).splitlines()[0]}") from None
    if run.processes.main:
        remove_damaged(run.out_dir, damaged)
    distributed.barrier()
    _say(f"resumed from {folder} at step {run.state.step}")


def _latest_on_main(run: Run) -> tuple[Path, list[Path]]:
    """Rank 0 chooses the checkpoint (and warns about damaged ones); every rank then reads the same one, or
    raises the same error."""
    found = None
    if run.processes.main:
        try:
            found = latest(run.out_dir)
        except ConfigError as error:
            found = error
    found = distributed.from_main(found)
    if isinstance(found, ConfigError):
        raise found
    return found


def _check_world_size(run: Run, saved: dict, folder: Path) -> None:
    """The global batch is batch_size x grad_accum x processes: another number of processes trains another
    run, refused as a changed batch_size is (unless resume_allow_changes). AdamW8bit's sharded state keeps
    an absmax per local shard, which does not reshard."""
    before, now = saved.get("world_size", 1), run.processes.world_size
    if before == now:
        return
    if not run.config.resume_allow_changes:
        raise ConfigError(f"checkpoint {folder} was written by {before} process(es), this run has {now}: the "
                          f"global batch would change; launch {before}, or pass --resume_allow_changes=true")
    if run.mode == "fsdp" and run.config.optimizer == "adamw8bit":
        raise ConfigError(f"checkpoint {folder}: adamw8bit's FSDP2 state was sharded over {before} processes and "
                          f"cannot be resharded to {now} (its absmax blocks are per shard); launch {before}")
    warnings.warn(f"resuming a checkpoint of {before} process(es) on {now}: the global batch changes")


def _initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (as torch.distributed.checkpoint.state_dict does): one step at lr 0 on zero
    gradients, so DCP has tensors to load into; the loaded state then replaces it."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _restore_states(run: Run, saved: dict) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    run.schedule.load_state_dict(saved["schedule"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = LoopState.from_dict(saved["loop"])
    run.hooks.load_state_dict(saved.get("peft_method", {}))
    run.saved_step = run.state.step
    per_rank = saved.get("rng_ranks")
    _set_rng_states(per_rank[run.processes.rank] if per_rank and len(per_rank) == run.processes.world_size
                    else saved["rng"])
    # lr, betas and weight decay may change on resume, but the saved optimizer and schedule carry the old
    # ones: this run's config wins (unchanged values give the same floats, so the resume stays exact).
    config = run.config
    run.schedule.base_lrs = [config.lr] * len(run.optimizer.param_groups)
    for group in run.optimizer.param_groups:
        group.update(initial_lr=config.lr, lr=config.lr * lr_factor(run.schedule.last_epoch, config),
                     betas=config.betas, weight_decay=config.weight_decay)


def open_log(run: Run) -> RunLog | NoLog:
    """The run's log, opened once it has started and resumed; its first record is the config of this segment.
    Ranks other than 0 log nothing."""
    if not run.processes.main:
        run.log = NoLog()
        return run.log
    run.log = RunLog(run.out_dir, run.config, resumed_step=run.saved_step)
    _say(f"logs: {run.log.describe()}")
    remove_stale_temporaries(run.out_dir)  # a final/ export or log rewrite killed mid-write
    run.log.write("config", run.state.step, config=run.config.to_dict(), precision=str(run.precision))
    return run.log


def accumulated_step(run: Run) -> float:
    """Forward and backward over ``grad_accum`` micro-batches; the loss is normalized by the targets of
    the whole accumulated batch. Returns the batch's loss.

    With N processes each micro-batch is a global one of N x batch_size examples, in the order one process
    would read them, and rank r trains on its r-th slice; the targets are counted over every rank (one
    all-reduce), and each rank's loss is multiplied by N because DDP and FSDP2 average the gradients over
    ranks: the update is the one a single process makes with N x batch_size."""
    config, task, world, rank = run.config, run.task, run.processes.world_size, run.processes.rank
    micro_batches = [next_batch(task.train_examples, config.batch_size * world, config.seed, run.state.position)
                     for _ in range(config.grad_accum)]
    micro_batches = [task.batch(examples[rank * config.batch_size : (rank + 1) * config.batch_size])
                     for examples in micro_batches]
    targets = distributed.sum_over_ranks(sum(task.targets(batch) for batch in micro_batches), run.device)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=run.device.type == "cuda") \
        if config.offload_activations else nullcontext()
    loss_total, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        with offload, distributed.gradient_sync(run.model, sync=i == len(micro_batches) - 1):
            with run.precision.autocast():
                loss = task.loss(run.model, batch, targets)
            run.scaler.scale(loss * world if world > 1 else loss).backward()
        loss_total += loss.item()
        tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if world > 1:
        loss_total, tokens = distributed.sum_over_ranks([loss_total, float(tokens)], run.device)
    run.tokens_seen += int(tokens)
    return loss_total


def optimizer_step(run: Run, loss: float) -> None:
    """Clip, step (through the scaler: an fp16 overflow changes nothing), advance the schedule."""
    if run.config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.schedule.step()
    run.hooks.after_optimizer_step(run.state.step)  # AdaLoRA reads the gradients: before they are dropped
    run.optimizer.zero_grad(set_to_none=True)
    run.state.bad_steps = 0
    run.state.step += 1
    run.losses.append(loss)


def skip_step(run: Run, loss: float) -> None:
    """A non-finite loss: drop its gradients; too many in a row end the run."""
    run.optimizer.zero_grad(set_to_none=True)
    run.state.bad_steps += 1
    if run.processes.main:
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


def evaluate(run: Run) -> tuple[dict[str, float], ClassificationReport | EntityReport | None]:
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
    """A checkpoint of this step: trainable tensors, optimizer, schedule, scaler, loop and RNG states.

    Several processes: every rank's RNG state goes in (dropout differs per rank). FSDP2: each rank writes its
    shards through torch.distributed.checkpoint; otherwise rank 0 writes the checkpoint as one process does."""
    optimizer = run.optimizer.state_dict()
    state = {"optimizer": optimizer, "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), "loop": dataclasses.asdict(run.state), "rng": _rng_states(),
             "peft_method": run.hooks.state_dict()}
    if run.processes.several:
        state.update(rng_ranks=distributed.gather(_rng_states()), world_size=run.processes.world_size)
    if run.mode == "fsdp":
        state["optimizer"] = {"param_groups": optimizer["param_groups"]}  # the tensors go to the shards
        tensors = {"model": run.trainable, "optimizer": optimizer["state"]}
        save_sharded_checkpoint(run.out_dir, run.state.step, tensors, state, run.config.to_dict(),
                                run.config.keep_last)
    else:
        if run.processes.main:
            write_extra = (lambda folder: _write_adapter(run.module, run.config, folder / "adapter",
                                                         run.precision)) if run.config.lora_r else None
            save_checkpoint(run.out_dir, run.state.step, run.trainable, state, run.config.to_dict(),
                            run.config.keep_last, write_extra=write_extra)
        distributed.barrier()
    run.saved_step = run.state.step


def _write_adapter(model, config: TrainConfig, folder: Path, precision: Precision | None = None) -> None:
    """ember's LoRA in PEFT's format, complete for PEFT: the task's type, a trained classification head saved whole
    (PEFT's modules_to_save), the base folder, and for QLoRA how the base was quantized and the dtype it computed
    in. PEFT's other methods are saved by PEFT (their trained head included)."""
    if uses_peft(config):
        write_adapter(model, folder)
        return
    head = [head_name(model)] if config.task != "causal-lm" else []
    compute_dtype = None if precision is None else precision.autocast_dtype or precision.param_dtype
    save_adapter(model, folder, task_type=TASKS[config.task].peft_task_type, modules_to_save=head,
                 compute_dtype=compute_dtype)


def _export(model, tokenizer, config: TrainConfig, folder: Path, state_dict: dict | None = None,
            precision: Precision | None = None) -> None:
    """LoRA and PEFT's methods: the adapter in PEFT's format, trained head inside, and for classification the
    fine-tuned model's config (its labels); full fine-tune: a model folder.

    Written to ``folder`` by ``write_atomically``: a kill mid-export leaves the previous export, never half."""
    folder.mkdir()
    if config.lora_r:
        _write_adapter(model, config, folder / "adapter", precision)
    if config.lora_r and config.task != "causal-lm":
        # PEFT's adapter config has no place for labels: the base is built with these (num_labels, id2label,
        # label2id), as AutoConfig.from_pretrained(final) gives them. Not in the adapter folder: a config.json
        # there makes transformers take that folder for a whole model.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's methods: the model
        exported = copy.deepcopy(base.config)
        exported.architectures = [type(base).__name__]
        exported.to_json_file(folder / "config.json")
    if not config.lora_r:
        model.save_pretrained(folder / "model", state_dict=state_dict)
    tokenizer.save_pretrained(folder / "tokenizer")


def _format(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def finish(run: Run, stopped: str, eval_before: dict[str, float],
           report_before: ClassificationReport | EntityReport | None = None) -> TrainResult:
    """The final evaluation and, unless interrupted, the export; the run's result."""
    seconds = time.time() - run.started
    eval_after, report = evaluate(run)
    if stopped != "interrupted":
        full = None
        if run.mode == "fsdp":  # the whole weights, gathered on rank 0 (every rank takes part)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            # A tied weight (a causal LM's head and embeddings) comes once per name; the model folder holds it once.
            tied = ({name for name, _ in run.module.named_parameters(remove_duplicate=False)}
                    - {name for name, _ in run.module.named_parameters()})
            full = {name: tensor for name, tensor in full.items() if name not in tied}
        if run.processes.main:
            export = functools.partial(_export, run.module, run.task.tokenizer, run.config, precision=run.precision)
            if full is not None:
                export = functools.partial(export, state_dict=full)
            write_atomically(run.out_dir / "final", export)
        distributed.barrier()
    memory = peak_memory_mb(run.device)
    run.log.write("end", run.state.step, stopped=stopped, seconds=seconds, peak_memory_mb=memory)
    return TrainResult(steps=run.state.step, stopped=stopped, eval_before=eval_before, eval_after=eval_after,
                       report=report, seconds=seconds, peak_memory_mb=memory, out_dir=run.out_dir, losses=run.losses,
                       report_before=report_before)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune as ``config`` says. Ctrl-C finishes the step, saves a checkpoint and returns
    ``stopped="interrupted"``; ``resume=true`` continues from it exactly."""
    run = start(config)
    resume(run)
    with closing(open_log(run)):
        eval_before, report_before = evaluate(run)
        _say(f"held-out before: {_format(eval_before)}")
        stopped = "max_steps" if run.state.step >= config.max_steps else None  # None: still running
        run.model.train()
        run.started = time.time()
        show = config.progress and run.processes.main
        with interrupt_flag() as interrupted, tqdm(total=config.max_steps, initial=run.state.step,
                                                   disable=not show, desc="train") as progress:
            while stopped is None:
                loss = accumulated_step(run)
                if math.isfinite(loss):
                    optimizer_step(run, loss)
                    report_progress(run, loss, progress)
                    if run.state.step % config.eval_every == 0 and run.state.step < config.max_steps:
                        metrics, _ = evaluate(run)
                        if run.processes.main:
                            progress.write(f"step {run.state.step}: {_format(metrics)}")
                        stopped = "early_stopping" if stops_early(run, metrics) else None
                else:
                    skip_step(run, loss)
                if distributed.sum_over_ranks(int(interrupted["set"]), run.device):  # one rank's Ctrl-C stops all
                    stopped = "interrupted"
                elif stopped is None and run.state.step >= config.max_steps:
                    stopped = "max_steps"
                if (stopped or run.state.step % config.save_every == 0) and run.saved_step != run.state.step:
                    save(run)
        return finish(run, stopped, eval_before, report_before)


# ----------------------------------------------------------------------------
# Evaluating a saved run
# ----------------------------------------------------------------------------


def evaluate_checkpoint(config: TrainConfig) -> tuple[dict, ClassificationReport | EntityReport | None]:
    """Held-out metrics of the latest checkpoint in ``config.out_dir``, the model prepared as for training."""
    folder, _ = latest(Path(config.out_dir))  # damaged ones skipped with a warning, left as they are
    device = resolve_device(config.device)
    precision = decide(config.precision, device)
    task, model = _task_and_model(config, precision, device)
    if is_sharded(folder):  # an FSDP2 run's shards, gathered whole into this one process by DCP
        load_shards(folder, {"model": trainable_parameters(model)})
    else:
        copy_parameters(load_trainable(folder), trainable_parameters(model), folder)
    return task.evaluate(model, precision)
