"""The benchmark harness on the CPU at tiny sizes: fresh-process measurements, skips, OOM rows, JSON, reports."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ember.bench import harness, report
from ember.bench.suites import SUITES
from ember.engine.cli import main

CPU = torch.device("cpu")
TINY = {
    "attention": dict(batch=1, heads=2, kv_heads=1, seq=256, head_dim=32, causal=True),
    "cross_entropy": dict(tokens=256, hidden=64, vocab=4000),
    "lora": dict(tokens=64, in_features=128, out_features=96, rank=8, base="dense"),
    "optimizer": dict(million_params=1),
    "train_step": dict(model="llama-tiny", mode="lora", tokens=32),
}


@pytest.mark.parametrize("suite", sorted(TINY))
def test_each_suite_measures_in_a_fresh_process(suite):
    _, _, providers = SUITES[suite]
    rows = [harness.run_case(suite, provider, TINY[suite], CPU, timeout=300) for provider in providers[:2]]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["timing_note"] == harness.CPU_TIMING_NOTE
        assert row["peak_extra_rss_mb"] >= 0 and row["largest_tensor_mb"] > 0 or suite == "optimizer"
    if suite == "cross_entropy":
        ember, torch_row = rows
        # The stock path builds the (tokens, vocab) fp32 logits; ember's PyTorch path works in 1024-row tiles.
        assert torch_row["largest_tensor_mb"] == pytest.approx(256 * 4000 * 4 / 2**20)
        assert ember["largest_tensor_mb"] <= torch_row["largest_tensor_mb"]
    if suite == "optimizer":
        assert [round(r["state_bytes_per_param"], 2) for r in rows] == [8.0, 2.03]
    if suite == "lora":
        assert rows[0]["saved_activations_mb"] < rows[1]["saved_activations_mb"]  # ember keeps no dropout(x)


def test_train_step_modes():
    """QLoRA and full fine-tuning steps run for ember; the missing QLoRA baseline is a skip, not a fake."""
    for mode in ("qlora", "full"):
        row = harness.run_case("train_step", "ember", dict(TINY["train_step"], mode=mode), CPU, timeout=300)
        assert row["status"] == "ok", row
    row = harness.run_case("train_step", "torch", dict(TINY["train_step"], mode="qlora"), CPU)
    assert row["status"] == "skipped" and "QLoRA baseline" in row["message"]


def test_missing_peers_are_skipped_not_faked(monkeypatch):
    real_find_spec = importlib.util.find_spec
    # flash-attn absent even where it is installed (on CPU the case runs in a child, where it is absent anyway).
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    row = harness.run_case("attention", "flash_attn", TINY["attention"], CPU)
    assert row["status"] == "skipped" and "flash_attn is not installed" in row["message"]


def test_out_of_memory_is_a_result(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(harness, "measure_cpu", out_of_memory)
    row = harness.run_case("attention", "torch", dict(seq=16384), CPU)
    assert row == dict(suite="attention", provider="torch", params=dict(seq=16384), status="oom",
                       message="out of memory at seq=16384")


def _fake_run(device: str, values: dict[str, float]) -> dict:
    key = "time_ms" if device == "cuda" else "peak_extra_rss_mb"
    results = [dict(suite="attention", provider=p, params=dict(seq=1024), status="ok", **{key: v})
               for p, v in values.items()]
    results.append(dict(suite="attention", provider="flash_attn", params=dict(seq=1024), status="skipped",
                        message="flash_attn: flash_attn is not installed"))
    results.append(dict(suite="attention", provider="torch", params=dict(seq=16384), status="oom",
                        message="out of memory at seq=16384"))
    env = dict(device=device, cpu="x86_64", time="2026-11-23T00:00:00", ember_git_sha="abc", versions={"torch": "2"},
               gpu="NVIDIA H100" if device == "cuda" else None)
    return dict(env=env, quick=True, ceilings={}, results=results)


def test_report_tables_give_ratios_and_regressions():
    run = _fake_run("cuda", {"ember": 2.0, "torch": 8.0, "sdpa": 4.0})
    baseline = _fake_run("cuda", {"ember": 1.0, "torch": 8.0, "sdpa": 4.0})
    text = report.tables(run, baseline)
    assert "## attention: ms (in brackets: ember / provider)" in text
    assert "| seq=1024 | 2.000 | 8.000 (0.25x) | 4.000 (0.50x) | skipped | 2.00x |" in text  # 2x slower than before
    assert "| seq=16384 | - | OOM | - | - | - |" in text
    assert "- torch at seq=16384: out of memory at seq=16384" in text
    assert "- flash_attn: flash_attn is not installed" in text
    cpu_text = report.tables(_fake_run("cpu", {"ember": 10.0, "torch": 40.0}))
    assert "MiB peak extra RSS" in cpu_text and "wall times are not performance" in cpu_text


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    written = report.plots(_fake_run("cuda", {"ember": 2.0, "torch": 8.0}), tmp_path)
    assert [p.name for p in written] == ["attention.png"] and written[0].stat().st_size > 1000


def test_bench_command_writes_json_and_reports(tmp_path, monkeypatch, capsys):
    """`ember bench` end to end, with the sizes shrunk to TINY."""
    for suite, (sizes, setup, providers) in list(SUITES.items()):
        monkeypatch.setitem(SUITES, suite, (lambda quick, device, s=suite: [TINY[s]], setup, providers[:2]))
    assert main(["bench", "cross_entropy", "optimizer", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    run_path = next(tmp_path.glob("bench-cpu-*.json"))
    run = json.loads(run_path.read_text())
    assert {r["suite"] for r in run["results"]} == {"cross_entropy", "optimizer"}
    assert run["env"]["versions"]["torch"] and run["env"]["device"] == "cpu" and run["quick"] is True
    capsys.readouterr()
    assert main(["bench", "report", str(run_path), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "## cross_entropy" in out and "## optimizer" in out and "state bytes / parameter" in out


def test_bench_command_errors(capsys):
    assert main(["bench", "nonsense"]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err
    assert main(["bench", "report", "missing.json"]) == 2
    assert "'missing.json' does not exist" in capsys.readouterr().err
