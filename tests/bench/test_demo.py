"""`ember demo`: both losses agree, and only stock PyTorch builds the logits."""

from __future__ import annotations

import torch

from ember.bench.demo import run_demo


def test_demo_agrees_and_shows_ember_avoids_the_logits(capsys):
    assert run_demo(64, 32, 5000, "fp32", torch.device("cpu"))
    out = capsys.readouterr().out
    assert "losses agree" in out
    ember_line = next(line for line in out.splitlines() if line.strip().startswith("ember "))
    stock_line = next(line for line in out.splitlines() if line.strip().startswith("stock PyTorch"))
    assert "(64, 5000)" in stock_line and "(64, 5000)" not in ember_line
