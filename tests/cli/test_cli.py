"""The `ember` command line."""

from __future__ import annotations

import subprocess

from ember.cli import main


def test_demo_runs_and_shows_ember_avoids_the_logits(capsys):
    assert main(["demo", "--tokens", "64", "--hidden", "32", "--vocab", "5000"]) == 0
    out = capsys.readouterr().out
    assert "losses agree" in out
    ember_line = next(line for line in out.splitlines() if line.strip().startswith("ember "))
    stock_line = next(line for line in out.splitlines() if line.strip().startswith("stock PyTorch"))
    assert "(64, 5000)" in stock_line and "(64, 5000)" not in ember_line


def test_bad_arguments_give_a_one_line_error():
    result = subprocess.run(["ember", "demo", "--tokens", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "ember: error: --tokens must be >= 1"
