"""What the loop trains on: each task turns examples into batches and evaluates a model.

- ``ClassificationTask``: sequence classification; (text, label) pairs, the
  held-out report is accuracy, macro-F1 and per-class precision/recall/F1.
- ``TokenClassificationTask``: (words, tags) sentences from a CoNLL file or
  .csv/.jsonl rows; a word's tag goes to its first sub-word token, the others
  are not scored. BIO tags (NER) are scored per entity with seqeval, other tag
  sets (part of speech, ...) per tag with the report above; both per word.
- ``CausalLMTask``: documents (a .txt file split at blank lines, or rows of a
  .jsonl/.csv file, optionally prompt/response pairs whose prompt is masked
  from the loss), each ending in EOS. Packed: the documents of a batch are laid
  one after another in one row with position ids restarting at each document,
  which ``attn_implementation="ember"`` runs through the varlen kernel, so no
  document attends to another and no token is padding. The held-out metric is
  perplexity.

Both count their targets per batch, so the loop can normalize the loss by the
targets of a whole accumulated batch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import distributed
from .conll import read_conll, tag_names
from .data import load_classification, read_labelled_rows, read_rows, resolve, row_text, split_held_out
from .errors import ConfigError
from .metrics import classification_report, entity_report, require_seqeval

if TYPE_CHECKING:  # the config validates its task against TASKS: it imports this module
    from .config import TrainConfig



def held_out_batches(task, model):
    """(batch, examples) over the task's held-out examples in batches of ``task.eval_batch_size``, the model in
    eval mode meanwhile; ``examples`` are the batch's examples, empty for a batch whose results must be dropped.

    With several processes each rank takes every N-th example, and every rank runs the same number of
    forwards (FSDP2's forward is a collective): a rank short of a batch runs a stand-in it does not count.
    """
    processes = distributed.current()
    examples = task.eval_examples[processes.rank :: processes.world_size]
    most = -(-len(task.eval_examples) // processes.world_size)  # the first rank's share, the largest
    was_training = model.training
    model.eval()
    try:
        for start in range(0, most, task.eval_batch_size):
            chunk = examples[start : start + task.eval_batch_size]
            yield task.batch(chunk or task.eval_examples[:1]), chunk
    finally:
        model.train(was_training)


class ClassificationTask:
    kind = "sequence-classification"
    peft_task_type = "SEQ_CLS"  # what an exported adapter records: PEFT's class for the task
    metric_names = ("loss", "accuracy", "macro_f1")  # what evaluate reports
    eval_batch_size = 64

    def __init__(self, config: TrainConfig, tokenizer, device: torch.device):
        self.config, self.tokenizer, self.device = config, tokenizer, device
        data = load_classification(config)
        self.train_examples, self.eval_examples, self.class_names = data.train, data.eval, data.class_names

    def describe(self) -> str:
        return (f"{len(self.train_examples)} train / {len(self.eval_examples)} held-out examples, "
                f"classes {self.class_names}")

    def batch(self, examples: list[tuple[str, int]]) -> dict:
        encoded = self.tokenizer([text for text, _ in examples], truncation=True, max_length=self.config.max_length,
                                 padding=True, return_tensors="pt")
        batch = {key: value.to(self.device) for key, value in encoded.items()}
        batch["labels"] = torch.tensor([label for _, label in examples], device=self.device)
        return batch

    @staticmethod
    def targets(batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, model, batch: dict, normalizer: int) -> torch.Tensor:
        return _loss(model, batch, normalizer, shift=False)

    @torch.no_grad()
    def evaluate(self, model, precision):
        loss_sum, predictions, labels = 0.0, [], []
        for batch, examples in held_out_batches(self, model):
            targets = batch.pop("labels").reshape(-1)  # (examples,) or, per token, (examples * tokens,)
            with precision.autocast():
                logits = model(**batch).logits.float()
            if not examples:
                continue
            logits = logits.reshape(-1, logits.shape[-1])
            loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            predictions.append(logits.argmax(-1).cpu())
            labels.append(targets.cpu())
        if distributed.current().several:  # every rank's predictions: the report needs them all
            loss_sum = distributed.sum_over_ranks(loss_sum, self.device)
            predictions, labels = (sum(distributed.gather(part), []) for part in (predictions, labels))
        labels = torch.cat(labels)
        report = classification_report(torch.cat(predictions), labels, self.class_names)
        metrics = {"loss": loss_sum / max(int((labels != -100).sum()), 1), "accuracy": report.accuracy,
                   "macro_f1": report.macro_f1}
        return metrics, report


# Token classification reads these as CoNLL files (token<TAB>tag lines, a blank line between sentences).
CONLL_SUFFIXES = (".conll", ".txt", ".tsv", ".iob", ".bio")
ENTITY_METRICS = ("loss", "accuracy", "entity_precision", "entity_recall", "entity_f1")  # BIO tags: NER
TAG_METRICS = ("loss", "accuracy", "macro_f1")  # any other tag set


class TokenClassificationTask(ClassificationTask):
    kind = "token-classification"
    metric_names = tuple(dict.fromkeys(ENTITY_METRICS + TAG_METRICS))  # what evaluate may report
    peft_task_type = "TOKEN_CLS"  # what an exported adapter records: PEFT's class for the task

    def __init__(self, config: TrainConfig, tokenizer, device: torch.device):
        self.config, self.tokenizer, self.device = config, tokenizer, device
        sentences = tagged_sentences(config)
        self.class_names = tag_names(sentences)
        if len(self.class_names) < 2:
            raise ConfigError(f"data {config.data!r}: every word has the tag {self.class_names[0]!r}; "
                              f"token classification needs at least 2 tags")
        # NER is judged by entity (type and whole span right), which only means something for BIO tags.
        self.by_entity = all(tag == "O" or tag[:2] in ("B-", "I-") for tag in self.class_names)
        reported = ENTITY_METRICS if self.by_entity else TAG_METRICS
        if config.early_stopping_metric and config.early_stopping_metric not in reported:
            scheme = "BIO tags (scored by entity)" if self.by_entity else "tags that are not BIO (scored per tag)"
            raise ConfigError(f"early_stopping_metric: data {config.data!r} has {scheme}, which report "
                              f"{', '.join(reported)}; got {config.early_stopping_metric!r}")
        if self.by_entity:
            require_seqeval()
        # A word cut off by max_length gets no prediction: it is scored as "O" (an entity there is missed).
        self.scored_names = self.class_names if "O" in self.class_names else [*self.class_names, "O"]
        index = {tag: i for i, tag in enumerate(self.class_names)}
        indexed = [(words, [index[tag] for tag in tags]) for words, tags in sentences]
        self.train_examples, self.eval_examples = split_held_out(indexed, config)

    def describe(self) -> str:
        scored = "by entity (seqeval)" if self.by_entity else "per tag"
        return (f"{len(self.train_examples)} train / {len(self.eval_examples)} held-out sentences, "
                f"{len(self.class_names)} tags {self.class_names}, scored {scored}")

    def batch(self, examples: list[tuple[list[str], list[int]]]) -> dict:
        encoded = self.tokenizer([words for words, _ in examples], is_split_into_words=True, truncation=True,
                                 max_length=self.config.max_length, padding=True, return_tensors="pt")
        labels = torch.full(encoded["input_ids"].shape, -100, dtype=torch.long)
        for row, (_, tags) in enumerate(examples):
            previous = None
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word != previous:  # a word's first sub-word token carries its tag
                    labels[row, position] = tags[word]
                previous = word
        batch = {key: value.to(self.device) for key, value in encoded.items()}
        batch["labels"] = labels.to(self.device)
        return batch

    @torch.no_grad()
    def evaluate(self, model, precision):
        """BIO tags: the loss per scored token, every held-out word's tag accuracy, and seqeval's entity-level
        micro precision, recall and F1 (the report holds them per type and averaged). Other tags: per tag."""
        if not self.by_entity:
            return super().evaluate(model, precision)
        outside = self.scored_names.index("O")
        loss_sum, scored, predicted, true = 0.0, 0, [], []
        for batch, examples in held_out_batches(self, model):
            labels = batch.pop("labels")  # (B, S), a tag id at each word's first sub-word token, else -100
            with precision.autocast():
                logits = model(**batch).logits.float()  # (B, S, tags)
            if not examples:
                continue
            loss_sum += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    reduction="sum").item()
            scored += int((labels != -100).sum())
            best, labels = logits.argmax(-1).cpu(), labels.cpu()
            for row, (_, tags) in enumerate(examples):
                words = best[row][labels[row] != -100]  # (words kept,): one prediction per word, in order
                cut = torch.full((len(tags) - len(words),), outside, dtype=torch.long)
                predicted.append(torch.cat([words, cut]))
                true.append(torch.tensor(tags, dtype=torch.long))
        if distributed.current().several:  # every rank's sentences: the entity scores need them all
            loss_sum, scored = distributed.sum_over_ranks([loss_sum, float(scored)], self.device)
            predicted, true = (sum(distributed.gather(part), []) for part in (predicted, true))
        report = entity_report(predicted, true, self.scored_names)
        metrics = {"loss": loss_sum / max(scored, 1), "accuracy": report.token_accuracy,
                   "entity_precision": report.micro.precision, "entity_recall": report.micro.recall,
                   "entity_f1": report.entity_f1}
        return metrics, report


def tagged_sentences(config: TrainConfig) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence: from a CoNLL file (by its suffix, see ``CONLL_SUFFIXES``), or from the rows
    of a .csv/.jsonl file whose text and label columns hold the words and tags (lists, or space-separated)."""
    path = resolve(config.data, "data")
    if path.suffix in CONLL_SUFFIXES:
        return read_conll(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"data {config.data!r}: token classification reads a CoNLL file "
                          f"({', '.join(CONLL_SUFFIXES)}: token<TAB>tag lines, a blank line between sentences) "
                          f"or .csv/.jsonl rows; got {path.name!r}")
    sentences = []
    for i, row in enumerate(read_labelled_rows(config)):
        words, tags = (_sequence(row.get(column), column, i, config)
                       for column in (config.text_column, config.label_column))
        if len(words) != len(tags):
            raise ConfigError(f"data {config.data!r}, row {i}: {len(words)} words but {len(tags)} tags")
        sentences.append((words, tags))
    return sentences


def _sequence(value, column: str, row: int, config: TrainConfig) -> list[str]:
    """A row's words or tags: a whitespace-separated string or a list of strings."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in value):
        return [str(item) for item in value]
    raise ConfigError(f"data {config.data!r}, row {row}: {column!r} is "
                      f"{'missing' if value is None else 'not a string or a list of strings'}")


def _documents(config: TrainConfig) -> list[tuple[str, str]]:
    """(prompt, text) pairs; the prompt is "" unless prompt_column names one."""
    path = resolve(config.data, "data")
    if path.suffix == ".txt":
        chunks = [chunk.strip() for chunk in Path(path).read_text(encoding="utf-8").split("\n\n")]
        return [("", chunk) for chunk in chunks if chunk]
    rows = read_rows(path, config)
    if rows and config.text_column not in rows[0]:
        raise ConfigError(f"data {config.data!r} has no column {config.text_column!r}; it has {', '.join(rows[0])}")
    if config.prompt_column and rows and config.prompt_column not in rows[0]:
        raise ConfigError(f"data {config.data!r} has no column {config.prompt_column!r}")
    prompts = [row_text(row, i, dataclasses.replace(config, text_column=config.prompt_column))
               if config.prompt_column else "" for i, row in enumerate(rows)]
    return [(prompt, row_text(row, i, config)) for i, (prompt, row) in enumerate(zip(prompts, rows))]


class CausalLMTask:
    kind = "causal-lm"
    peft_task_type = "CAUSAL_LM"  # what an exported adapter records: PEFT's class for the task
    metric_names = ("loss", "perplexity")  # what evaluate reports
    eval_batch_size = 8  # whole documents of up to max_length tokens each
    class_names: list[str] = []

    def __init__(self, config: TrainConfig, tokenizer, device: torch.device):
        self.config, self.tokenizer, self.device = config, tokenizer, device
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        documents = [self._tokenize(prompt, text) for prompt, text in _documents(config)]
        documents = [d for d in documents if (torch.tensor(d[1]) != -100).sum() > 1]
        if not documents:
            raise ConfigError(f"data {config.data!r} is empty")
        # Deterministic split: every k-th document is held out, so both halves span the whole text.
        if config.eval_size >= len(documents):
            raise ConfigError(f"eval_size {config.eval_size} leaves no training data ({len(documents)} documents)")
        stride = len(documents) // config.eval_size if config.eval_size else 0
        held_out = set(range(0, stride * config.eval_size, stride)) if stride else set()
        self.eval_examples = [d for i, d in enumerate(documents) if i in held_out]
        self.train_examples = [d for i, d in enumerate(documents) if i not in held_out]
        if config.train_size:
            self.train_examples = self.train_examples[: config.train_size]

    def _tokenize(self, prompt: str, text: str) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one document, at most max_length tokens, EOS last; the prompt has label -100."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + text_ids)[: self.config.max_length - 1] + ([self.eos] if self.eos is not None else [])
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        # The first token has no predecessor inside the document: in a packed row, the
        # token before it belongs to another document, so it is never a target.
        labels[0] = -100
        return ids, labels

    def describe(self) -> str:
        tokens = sum(len(ids) for ids, _ in self.train_examples)
        return (f"{len(self.train_examples)} train documents ({tokens:,} tokens) / {len(self.eval_examples)} held-out, "
                f"{'packed' if self.config.pack else 'padded'} to {self.config.max_length} tokens")

    def batch(self, documents: list[tuple[list[int], list[int]]]) -> dict:
        if self.config.pack:
            # One row, documents back to back; position ids restart at each: varlen attention.
            ids = [token for d, _ in documents for token in d]
            labels = [label for _, ls in documents for label in ls]
            positions = [p for d, _ in documents for p in range(len(d))]
            tensor = lambda values: torch.tensor([values], device=self.device)  # noqa: E731
            return {"input_ids": tensor(ids), "position_ids": tensor(positions), "labels": tensor(labels)}
        width = max(len(d) for d, _ in documents)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos or 0)
        ids = torch.full((len(documents), width), pad, dtype=torch.long)
        labels = torch.full((len(documents), width), -100, dtype=torch.long)
        mask = torch.zeros((len(documents), width), dtype=torch.long)
        for row, (d, ls) in enumerate(documents):
            ids[row, : len(d)], labels[row, : len(ls)], mask[row, : len(d)] = torch.tensor(d), torch.tensor(ls), 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}

    @staticmethod
    def targets(batch: dict) -> int:
        # Position t is scored against label t + 1: the first label of a row is never a target.
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch: dict, normalizer: int) -> torch.Tensor:
        return _loss(model, batch, normalizer, shift=True)

    @torch.no_grad()
    def evaluate(self, model, precision):
        loss_sum, targets = 0.0, 0
        for batch, examples in held_out_batches(self, model):
            with precision.autocast():
                summed = self.loss(model, batch, 1).float().item()
            if examples:
                loss_sum, targets = loss_sum + summed, targets + self.targets(batch)
        if distributed.current().several:
            loss_sum, targets = distributed.sum_over_ranks([loss_sum, float(targets)], self.device)
        loss = loss_sum / max(targets, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, None


def _loss(model, batch: dict, normalizer: int, *, shift: bool) -> torch.Tensor:
    """The batch's summed loss divided by ``normalizer``: through ember's kernels when the model is patched
    (for a causal LM without building logits), else stock cross-entropy on the logits. ``shift``: position t
    is scored against label t + 1."""
    if getattr(distributed.unwrapped(model), "_ember_patched", False):
        return model(**batch, num_items_in_batch=normalizer).loss
    labels = batch["labels"]
    if shift:
        labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits.float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       reduction="sum") / normalizer


TASKS = {"sequence-classification": ClassificationTask, "token-classification": TokenClassificationTask,
         "causal-lm": CausalLMTask}
