"""Classification metrics: accuracy, macro-F1 and a per-class precision/recall/F1 report."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class ClassScores:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    macro_f1: float
    classes: tuple[ClassScores, ...]

    def format(self) -> str:
        width = max([len(c.name) for c in self.classes] + [8])
        lines = [f"{'class':<{width}}  precision  recall     f1  support"]
        for c in self.classes:
            lines.append(f"{c.name:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:5.4f}  {c.support:7d}")
        total = sum(c.support for c in self.classes)
        lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {self.accuracy:5.4f}  {total:7d}")
        lines.append(f"{'macro-F1':<{width}}  {'':9}  {'':6}  {self.macro_f1:5.4f}  {total:7d}")
        return "\n".join(lines)


def classification_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> ClassificationReport:
    """Scores of integer ``predictions`` against ``labels`` (same shape; entries -100 are ignored).

    A class that is never predicted has precision 0, one that never occurs has
    recall 0 (and F1 0), as scikit-learn reports them with zero_division=0.
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    keep = labels != -100
    predictions, labels = predictions[keep].long().cpu(), labels[keep].long().cpu()
    n = len(class_names)
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
    accuracy = true_positive.sum().item() / max(labels.numel(), 1)
    return ClassificationReport(accuracy=accuracy, macro_f1=f1.mean().item(), classes=classes)
