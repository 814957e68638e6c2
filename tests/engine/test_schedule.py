"""The learning-rate schedules."""

from __future__ import annotations

import pytest

from ember.engine.config import TrainConfig
from ember.engine.schedule import lr_factor


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(schedule):
    config = TrainConfig(schedule=schedule, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    factors = [lr_factor(step, config) for step in range(111)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warm-up to the peak
    assert factors[10] == pytest.approx(1.0)
    middle = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[schedule]
    assert factors[60] == pytest.approx(middle)
    assert factors[110] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    if schedule == "cosine":
        assert factors[35] > 0.55 + 0.45 * 0.5  # cosine stays high longer than linear
