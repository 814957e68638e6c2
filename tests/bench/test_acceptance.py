"""The one-command acceptance run: its CPU dry run end to end, the smoke's judgement, the isolation bookkeeping,
the summary's ratios."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import ember.kernels
from ember.bench import acceptance, report


def test_the_cpu_dry_run_writes_every_file_and_says_why(tmp_path, monkeypatch, capsys):
    """Where CUDA is absent the command says so and runs the dry run: the smoke of every public kernel on the
    PyTorch path, a few small benchmark cases in a child process, the report, the plots and the summary."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert acceptance.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CUDA is not available: running the CPU dry run" in out and "# ember acceptance:" in out

    names = {p.name for p in tmp_path.iterdir()}
    assert {"acceptance.json", "summary.md", "report.md", "bench.json", "smoke.json"} <= names
    if importlib.util.find_spec("matplotlib") is not None:
        assert {"attention-memory.png", "cross_entropy-memory.png", "optimizer-memory.png"} <= names
    assert not any(name.startswith(".") for name in names)  # the children's scratch files are gone

    record = json.loads((tmp_path / "acceptance.json").read_text())
    assert record["device"] == "cpu" and record["why_cpu"] == "CUDA is not available"
    assert record["tests"]["status"] == "skipped"
    assert sorted(record["files"]) == sorted(n for n in names if n != "tests")

    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert [row["status"] for row in smoke] == ["ok"] * len(smoke)
    covered = {name for case, names_, _ in acceptance.SMOKE if case in {r["kernel"] for r in smoke} for name in names_}
    assert set(ember.kernels.__all__) <= covered

    run = report.load(tmp_path / "bench.json")  # what `ember bench report` reads
    assert run["env"]["device"] == "cpu" and run["env"]["versions"]["torch"]
    assert [(r["suite"], r["provider"], r["status"]) for r in run["results"]] == [
        (suite, provider, "ok") for suite, (providers, _) in acceptance.DRY_RUN_CASES.items() for provider in providers]
    assert "## cross_entropy" in (tmp_path / "report.md").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "**CUDA is not available**: a CPU dry run" in summary
    assert f"Smoke: {len(smoke)} of {len(smoke)} kernel x dtype checks pass." in summary
    assert "| cross_entropy | ember | stock PyTorch | 1 |" in summary


def test_every_public_kernel_has_a_smoke_case():
    cases, uncovered = acceptance.smoke_cases()
    assert uncovered == [], f"add a smoke case to ember.bench.acceptance.SMOKE for {uncovered}"
    assert {"flash_attention", "linear_cross_entropy", "lora_linear", "adamw8bit", "nf4"} <= set(cases)


def test_the_smoke_fails_a_wrong_kernel_and_reports_one_that_raises(monkeypatch):
    from ember.kernels.cross_entropy import cross_entropy_ref

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(ember.kernels, "cross_entropy", lambda x, t: cross_entropy_ref(x, t) * 1.001)
    [row] = acceptance.run_smoke_case("cross_entropy", "cpu", ["float32"])
    assert row["status"] == "failed" and "V=1003 out0: error" in row["message"] and "> 2 x stock" in row["message"]

    def broken(x, t):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ember.kernels, "cross_entropy", broken)
    [row] = acceptance.run_smoke_case("cross_entropy", "cpu", ["float32"])
    assert row["status"] == "error" and "illegal memory access" in row["message"]


@pytest.mark.gpu
def test_the_smoke_passes_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("GPU tier: no CUDA device")
    for case in acceptance.smoke_cases()[0]:
        for row in acceptance.run_smoke_case(case, "cuda", ["float16", "bfloat16"]):
            assert row["status"] == "ok", row


def test_a_process_that_dies_is_replaced_for_the_remaining_sizes(tmp_path, monkeypatch):
    """A child that dies in a case leaves an error row for that case; a fresh one runs the rest. After a sticky CUDA
    error the child has written the row itself and exits 3: no second row."""
    sizes = [dict(million_params=m) for m in (1, 2, 3, 4, 5)]
    monkeypatch.setattr(acceptance, "bench_jobs", lambda device: [("optimizer", "adamw", sizes)])
    calls = []

    def spawn(spec, timeout, env):
        calls.append([p["million_params"] for _, _, ps in spec["jobs"] for p in ps])
        env_row = [dict(env=dict(device="cpu"), ceilings={})] if spec["env"] else []
        rows = [dict(suite="optimizer", provider="adamw", params=p, status="ok", peak_extra_rss_mb=1.0,
                     largest_tensor_mb=1.0)
                for _, _, ps in spec["jobs"] for p in ps]
        if len(calls) == 1:  # segfaults in the second case
            return env_row + rows[:1], "the process exited with status -11: Segmentation fault"
        if len(calls) == 2:  # a sticky CUDA error in the fourth: the child wrote its error row
            return env_row + rows[:1] + [dict(rows[1], status="error", message="CUDA error: illegal address")], \
                "a CUDA error left the process unusable"
        return env_row + rows, None

    monkeypatch.setattr(acceptance, "_spawn", spawn)
    record = acceptance.step_bench("cpu", tmp_path, 100.0, progress=lambda line: None)
    assert calls == [[1, 2, 3, 4, 5], [3, 4, 5], [5]]
    assert [(r["params"]["million_params"], r["status"]) for r in record["results"]] == [
        (1, "ok"), (2, "error"), (3, "ok"), (4, "error"), (5, "ok")]
    assert record["results"][1]["message"] == "the process exited with status -11: Segmentation fault"
    assert record["env"] == dict(device="cpu")


def test_a_spent_budget_is_recorded_not_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(acceptance, "bench_jobs", lambda device: [("optimizer", "adamw", [dict(million_params=1)])])
    record = acceptance.step_bench("cpu", tmp_path, 1.0, progress=lambda line: None)
    assert record["results"][0]["status"] == "error"
    assert record["results"][0]["message"] == "not run: the benchmarks' budget was spent"


def test_ratios_are_geometric_means_over_the_sizes_both_ran():
    def row(provider, seq, ms, status="ok"):
        return dict(suite="attention", provider=provider, params=dict(seq=seq), status=status, time_ms=ms)

    run = dict(env=dict(device="cuda"), results=[
        row("ember", 512, 1.0), row("sdpa_flash", 512, 2.0), row("ember", 1024, 4.0), row("sdpa_flash", 1024, 2.0),
        row("ember", 2048, 3.0), row("sdpa_flash", 2048, None, "oom"),
        row("flash_attn", 512, None, "skipped") | dict(message="flash_attn: flash_attn is not installed")])
    by_peer = {entry["peer"]: entry for entry in acceptance.ratios(run)}
    assert by_peer["sdpa_flash"]["sizes"] == 2
    assert by_peer["sdpa_flash"]["geomean"] == pytest.approx(1.0)  # 0.5x and 2x
    assert (by_peer["sdpa_flash"]["low"], by_peer["sdpa_flash"]["high"]) == pytest.approx((0.5, 2.0))
    assert by_peer["flash_attn"]["sizes"] == 0 and "not installed" in by_peer["flash_attn"]["message"]


def test_junit_counts(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                     '<testcase classname="tests.kernels.test_x" name="test_a[cuda]"><failure/></testcase>'
                     '<testcase classname="tests.kernels.test_x" name="test_b[cuda]"/>'
                     '<testcase classname="tests.kernels.test_x" name="test_c[cuda]"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    assert acceptance._junit_counts(junit) == dict(tests=3, failures=1, errors=0, skipped=1,
                                                   failed_tests=["tests.kernels.test_x::test_a[cuda]"])


def test_steps_can_be_left_out(tmp_path, capsys):
    assert acceptance.main(["--out", str(tmp_path), "--dry-run", "--skip", "smoke,bench"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "**--dry-run asked for**" in summary and "Smoke: skipped (--skip)." in summary
    assert "Benchmarks: 0 cases" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acceptance.json", "bench.json", "report.md", "summary.md"]
    with pytest.raises(SystemExit):
        acceptance.main(["--skip", "everything"])
    assert "--skip: unknown step(s) everything; steps: smoke, tests, bench" in capsys.readouterr().err
