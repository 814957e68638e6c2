"""The classification report: accuracy, macro-F1 and per-class precision, recall and F1."""

from __future__ import annotations

import pytest
import torch

from ember.engine.metrics import classification_report


def test_classification_report_by_hand():
    predictions = [0, 0, 1, 1, 2, 0, -5]
    labels = [0, 1, 1, 1, 2, 2, -100]
    report = classification_report(torch.tensor(predictions), torch.tensor(labels), ["a", "b", "c"])
    # a: tp 1, predicted 3, actual 1 -> p 1/3, r 1, f1 0.5; b: tp 2, pred 2, actual 3 -> p 1, r 2/3, f1 0.8;
    # c: tp 1, pred 1, actual 2 -> p 1, r 0.5, f1 2/3.
    assert report.accuracy == pytest.approx(4 / 6)
    assert [c.support for c in report.classes] == [1, 3, 2]
    assert [c.f1 for c in report.classes] == pytest.approx([0.5, 0.8, 2 / 3])
    assert report.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert "macro-F1" in report.format()
