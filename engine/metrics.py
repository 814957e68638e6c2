"""Held-out reports: per-class scores in scikit-learn's layout, and entity-level NER scores from seqeval.

``classification_report`` scores integer predictions per class (a sentence's
label, or each token's tag) and prints as ``sklearn.metrics.classification_report``
does: precision, recall, F1 and support per class, then accuracy, the macro
average and the support-weighted average. It is computed here, without
scikit-learn, from one confusion matrix.

``entity_report`` is how NER is judged: an entity counts only when its type and
its whole span are right (CoNLL's conlleval). Scoring tags one by one, ``O``
included, flatters a model: predicting ``B-PER O O`` for ``B-PER I-PER O`` gets
2 of 3 tags right but no entity. The scores come from ``seqeval`` (the library
the Hugging Face token-classification examples use), in its default,
conlleval-compatible mode; it is an optional dependency (``pip install
seqeval``), imported only here, because it pulls in scikit-learn and SciPy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Sequence

import torch

from .errors import ConfigError

SEQEVAL_MISSING = "entity-level NER scores need seqeval: pip install seqeval"


@dataclasses.dataclass(frozen=True)
class ClassScores:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass(frozen=True)
class Average:
    """An average over classes: ``macro`` (unweighted), ``weighted`` (by support) or ``micro`` (pooled counts)."""

    precision: float
    recall: float
    f1: float
    support: int


def _layout(rows: Sequence[ClassScores], averages: Sequence[tuple[str, Average]], digits: int,
            accuracy: float | None = None) -> str:
    """scikit-learn's text layout (``classification_report``, which seqeval's copies), character for character."""
    headers = ("precision", "recall", "f1-score", "support")
    width = max([len(row.name) for row in rows] + [len("weighted avg"), digits])
    row_format = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    text = "{:>{width}s} ".format("", width=width) + "".join(f" {h:>9}" for h in headers) + "\n\n"
    for row in rows:
        text += row_format.format(row.name, row.precision, row.recall, row.f1, row.support, width=width, digits=digits)
    text += "\n"
    if accuracy is not None:
        support = sum(row.support for row in rows)
        text += "{:>{width}s} ".format("accuracy", width=width) + " " * 20 + f" {accuracy:>9.{digits}f} {support:>9}\n"
    for heading, average in averages:
        text += row_format.format(heading, average.precision, average.recall, average.f1, average.support,
                                  width=width, digits=digits)
    return text.rstrip("\n")


# ----------------------------------------------------------------------------
# Per-class scores (sequence labels, or every token's tag)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    macro_f1: float  # = macro.f1, kept as the name the logs and the early-stopping metric use
    classes: tuple[ClassScores, ...]
    macro: Average
    weighted: Average

    def format(self, digits: int = 4) -> str:
        """The report as ``sklearn.metrics.classification_report(..., digits=digits)`` prints it."""
        return _layout(self.classes, [("macro avg", self.macro), ("weighted avg", self.weighted)], digits,
                       accuracy=self.accuracy)


def classification_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> ClassificationReport:
    """Scores of integer ``predictions`` against ``labels`` (same shape; entries -100 are ignored).

    Every class in ``class_names`` has a row, in that order. A class that is
    never predicted has precision 0 and one that never occurs recall 0 (F1 0),
    as scikit-learn reports them with ``zero_division=0``; the macro average
    counts such classes too, the weighted average weighs each class by its
    support.
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    keep = labels != -100
    predictions, labels = predictions[keep].long().cpu(), labels[keep].long().cpu()
    n = len(class_names)
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < n:
            raise ValueError(f"{name} must be class ids in [0, {n}) (or -100 in labels), "
                             f"got values in [{int(values.min())}, {int(values.max())}]")
    confusion = torch.zeros(n, n, dtype=torch.long)  # [true, predicted]
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    true_positive = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), 0.0)
    recall = torch.where(actual > 0, true_positive / actual.clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    classes = tuple(
        ClassScores(class_names[i], precision[i].item(), recall[i].item(), f1[i].item(), int(actual[i].item()))
        for i in range(n)
    )
    total = labels.numel()
    weights = actual / total if total else torch.zeros(n, dtype=torch.double)
    macro = Average(precision.mean().item(), recall.mean().item(), f1.mean().item(), total)
    weighted = Average((weights * precision).sum().item(), (weights * recall).sum().item(),
                       (weights * f1).sum().item(), total)
    accuracy = true_positive.sum().item() / max(total, 1)
    return ClassificationReport(accuracy=accuracy, macro_f1=macro.f1, classes=classes, macro=macro,
                                weighted=weighted)


# ----------------------------------------------------------------------------
# Entity-level scores (NER)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EntityReport:
    """seqeval's report: one row per entity type (support = true entities), then micro, macro, weighted."""

    types: tuple[ClassScores, ...]
    micro: Average
    macro: Average
    weighted: Average
    token_accuracy: float  # tags right among the scored tokens, O included: what the entity scores correct

    @property
    def entity_f1(self) -> float:
        """The micro-averaged entity F1: conlleval's overall FB1, the number NER papers report."""
        return self.micro.f1

    def format(self, digits: int = 4) -> str:
        """The report as ``seqeval.metrics.classification_report(..., digits=digits)`` prints it."""
        return _layout(self.types, [("micro avg", self.micro), ("macro avg", self.macro),
                                    ("weighted avg", self.weighted)], digits)


def require_seqeval() -> None:
    """A ConfigError with the install command when seqeval is missing (located, not imported: it is slow)."""
    if importlib.util.find_spec("seqeval") is None:
        raise ConfigError(SEQEVAL_MISSING)


def _rows(values) -> list[torch.Tensor]:
    """One 1-D tensor per sentence from a (B, S) tensor, a 1-D tensor (one sentence), or a list of either."""
    if isinstance(values, torch.Tensor):
        values = [values]
    rows = []
    for value in values:
        value = torch.as_tensor(value)
        if value.dim() not in (1, 2):
            raise ValueError(f"expected sentences as (S,) or (B, S) tensors, got shape {tuple(value.shape)}")
        rows.extend(value.reshape(-1, value.shape[-1]).cpu() if value.dim() == 2 else [value.cpu()])
    return rows


def tag_sequences(predictions, labels, tag_names: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Tag-id predictions and labels as tag-name sentences, each sentence's -100 positions dropped.

    ``predictions`` and ``labels``: each a (B, S) tensor of one batch, a 1-D
    tensor of one sentence, or a list of these (batches of different lengths);
    a row is one sentence. Rows stay separate so that no entity runs from one
    sentence into the next.
    """
    prediction_rows, label_rows = _rows(predictions), _rows(labels)
    if [tuple(r.shape) for r in prediction_rows] != [tuple(r.shape) for r in label_rows]:
        raise ValueError("predictions and labels differ in shape")
    n = len(tag_names)
    predicted, true = [], []
    for prediction, label in zip(prediction_rows, label_rows):
        keep = label != -100
        prediction, label = prediction[keep].tolist(), label[keep].tolist()
        for name, ids in (("predictions", prediction), ("labels", label)):
            if ids and not 0 <= min(ids) <= max(ids) < n:
                raise ValueError(f"{name} must be tag ids in [0, {n}) (or -100 in labels), "
                                 f"got values in [{min(ids)}, {max(ids)}]")
        predicted.append([tag_names[i] for i in prediction])
        true.append([tag_names[i] for i in label])
    return predicted, true


def entity_report(predictions, labels, tag_names: Sequence[str]) -> EntityReport:
    """Entity-level precision, recall and F1 per type and averaged, from tag-id ``predictions`` and ``labels``.

    ``tag_names[i]`` is the name of tag id ``i``, in a BIO scheme (``O``,
    ``B-person``, ``I-person``, ...). See ``tag_sequences`` for the accepted
    shapes; label positions -100 (padding, special tokens, a word's later
    sub-word tokens) are not scored. seqeval's default mode is conlleval's: an
    ``I-`` tag after ``O`` or after another type starts an entity.
    """
    require_seqeval()
    from seqeval.metrics import classification_report as seqeval_report

    predicted, true = tag_sequences(predictions, labels, tag_names)
    scored = sum(len(sentence) for sentence in true)
    right = sum(p == t for ps, ts in zip(predicted, true) for p, t in zip(ps, ts))
    if not any(tag[:2] in ("B-", "I-") for sentence in true + predicted for tag in sentence):
        # No entity on either side: seqeval has nothing to average (and raises on empty names).
        zero = Average(0.0, 0.0, 0.0, 0)
        return EntityReport((), zero, zero, zero, right / max(scored, 1))
    scores = seqeval_report(true, predicted, output_dict=True, zero_division=0)

    def average(key: str) -> Average:
        s = scores.pop(key)
        return Average(float(s["precision"]), float(s["recall"]), float(s["f1-score"]), int(s["support"]))

    micro, macro, weighted = average("micro avg"), average("macro avg"), average("weighted avg")
    types = tuple(ClassScores(name, float(s["precision"]), float(s["recall"]), float(s["f1-score"]),
                              int(s["support"])) for name, s in scores.items())
    return EntityReport(types, micro, macro, weighted, right / max(scored, 1))
