"""Held-out reports: per-class scores in scikit-learn's layout, entity-level NER scores from seqeval."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ember.engine import metrics
from ember.engine.errors import ConfigError
from ember.engine.metrics import classification_report, entity_report, tag_sequences

# The hand-computed example: a: tp 1, predicted 3, actual 1 -> p 1/3, r 1, f1 0.5; b: tp 2, predicted 2,
# actual 3 -> p 1, r 2/3, f1 0.8; c: tp 1, predicted 1, actual 2 -> p 1, r 0.5, f1 2/3. The -5 sits at an
# ignored position.
PREDICTIONS, LABELS, NAMES = [0, 0, 1, 1, 2, 0, -5], [0, 1, 1, 1, 2, 2, -100], ["a", "b", "c"]


def test_classification_report_by_hand():
    report = classification_report(torch.tensor(PREDICTIONS), torch.tensor(LABELS), NAMES)
    assert report.accuracy == pytest.approx(4 / 6)
    assert [c.support for c in report.classes] == [1, 3, 2]
    assert [c.precision for c in report.classes] == pytest.approx([1 / 3, 1, 1])
    assert [c.f1 for c in report.classes] == pytest.approx([0.5, 0.8, 2 / 3])
    assert report.macro_f1 == report.macro.f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert (report.macro.precision, report.macro.recall) == pytest.approx((7 / 9, 13 / 18))
    # Weighted by support (1, 3, 2) of 6: recall weighted by support is the accuracy.
    assert (report.weighted.precision, report.weighted.recall, report.weighted.f1) == pytest.approx(
        ((1 / 3 + 3 + 2) / 6, 4 / 6, (0.5 + 3 * 0.8 + 2 * 2 / 3) / 6))
    assert report.macro.support == report.weighted.support == 6
    assert report.format(digits=2) == "\n".join([
        "              precision    recall  f1-score   support",
        "",
        "           a       0.33      1.00      0.50         1",
        "           b       1.00      0.67      0.80         3",
        "           c       1.00      0.50      0.67         2",
        "",
        "    accuracy                           0.67         6",
        "   macro avg       0.78      0.72      0.66         6",
        "weighted avg       0.89      0.67      0.71         6"])


@pytest.mark.parametrize("digits", [2, 4])
def test_classification_report_is_sklearns(digits):
    """Text and numbers as scikit-learn prints them, with a long class name, an absent class and a wrong guess."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    predictions, labels = [0, 0, 1, 1, 2, 0, 3, 1, 1], [0, 1, 1, 1, 2, 2, 1, 3, -100]
    names = ["a", "b", "c", "dd", "a-rather-long-class-name"]
    report = classification_report(torch.tensor(predictions), torch.tensor(labels), names)
    kept = [(p, t) for p, t in zip(predictions, labels) if t != -100]
    y_pred, y_true = [p for p, _ in kept], [t for _, t in kept]
    options = dict(labels=range(len(names)), target_names=names, zero_division=0)
    expected = sklearn_metrics.classification_report(y_true, y_pred, digits=digits, **options)
    assert report.format(digits) == expected.rstrip("\n")
    values = sklearn_metrics.classification_report(y_true, y_pred, output_dict=True, **options)
    assert report.accuracy == pytest.approx(values["accuracy"])
    for ours, key in ((report.macro, "macro avg"), (report.weighted, "weighted avg")):
        assert (ours.precision, ours.recall, ours.f1) == pytest.approx(
            (values[key]["precision"], values[key]["recall"], values[key]["f1-score"]))


def test_classification_report_refuses_ids_outside_the_classes():
    with pytest.raises(ValueError, match=r"predictions must be class ids in \[0, 3\).*\[0, 3\]"):
        classification_report(torch.tensor([0, 3]), torch.tensor([0, 1]), NAMES)
    with pytest.raises(ValueError, match="differ in shape"):
        classification_report(torch.tensor([0, 1]), torch.tensor([0]), NAMES)


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
O, B_PER, I_PER, B_LOC, I_LOC = range(5)


def test_entity_f1_is_not_token_accuracy():
    """The issue's case: 2 of 3 tags right, but the one entity's span is cut short, so no entity is right."""
    pytest.importorskip("seqeval")
    labels = torch.tensor([[B_PER, I_PER, O]])
    report = entity_report(torch.tensor([[B_PER, O, O]]), labels, TAGS)
    token_scores = classification_report(torch.tensor([B_PER, O, O]), labels[0], TAGS)
    assert report.token_accuracy == token_scores.accuracy == pytest.approx(2 / 3)
    assert report.entity_f1 == 0.0 and report.micro.precision == report.micro.recall == 0.0
    perfect = entity_report(labels, labels, TAGS)
    assert perfect.entity_f1 == perfect.token_accuracy == 1.0
    assert [(t.name, t.f1, t.support) for t in perfect.types] == [("PER", 1.0, 1)]


def test_entity_report_by_hand_and_as_seqeval_prints_it():
    """Two sentences of a (2, 5) batch padded with -100. True: PER LOC | LOC PER; predicted: PER (right), no LOC |
    LOC (right), LOC where PER is. PER: p 1/1, r 1/2; LOC: p 1/2, r 1/2; micro: p 2/3, r 2/4."""
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    labels = torch.tensor([[B_PER, I_PER, O, B_LOC, -100], [B_LOC, O, B_PER, -100, -100]])
    predictions = torch.tensor([[B_PER, I_PER, O, O, B_LOC], [B_LOC, O, B_LOC, I_PER, O]])  # padding ignored
    report = entity_report(predictions, labels, TAGS)
    assert [(t.name, t.precision, t.recall, t.support) for t in report.types] == [
        ("LOC", 0.5, 0.5, 2), ("PER", 1.0, 0.5, 2)]
    assert (report.micro.precision, report.micro.recall, report.entity_f1) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert (report.macro.precision, report.macro.recall, report.macro.f1) == pytest.approx((0.75, 0.5, 7 / 12))
    assert report.micro.support == report.macro.support == 4
    assert report.token_accuracy == pytest.approx(5 / 7)
    predicted, true = tag_sequences(predictions, labels, TAGS)
    assert true == [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    expected = seqeval_metrics.classification_report(true, predicted, digits=4, zero_division=0)
    assert report.format() == expected.rstrip("\n")


def test_entities_stop_at_the_end_of_a_sentence():
    """A sentence's last B-PER and the next sentence's first I-PER are two entities, not one: sentences are the rows
    of a batch, or batches of different lengths in a list, never one flattened stream."""
    pytest.importorskip("seqeval")
    labels = [torch.tensor([[O, B_PER]]), torch.tensor([[B_PER, O, -100]])]
    predictions = [torch.tensor([[O, B_PER]]), torch.tensor([[I_PER, O, O]])]  # I- after nothing starts an entity
    assert entity_report(predictions, labels, TAGS).entity_f1 == 1.0
    flat = entity_report(torch.tensor([O, B_PER, I_PER, O]), torch.tensor([O, B_PER, B_PER, O]), TAGS)
    assert flat.entity_f1 == 0.0  # as one sentence, the two PER become one wrong span


def test_entity_report_without_entities_and_bad_input():
    pytest.importorskip("seqeval")
    report = entity_report(torch.tensor([[O, O]]), torch.tensor([[O, -100]]), TAGS)
    assert report.entity_f1 == 0.0 and report.types == () and report.token_accuracy == 1.0
    with pytest.raises(ValueError, match=r"predictions must be tag ids in \[0, 5\)"):
        entity_report(torch.tensor([[O, 7]]), torch.tensor([[O, O]]), TAGS)
    with pytest.raises(ValueError, match="differ in shape"):
        entity_report(torch.tensor([[O, O]]), torch.tensor([[O]]), TAGS)


def test_missing_seqeval_is_one_line_with_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "seqeval" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="^entity-level NER scores need seqeval: pip install seqeval$"):
        metrics.require_seqeval()
