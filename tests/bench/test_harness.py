"""The benchmark harness on the CPU at tiny sizes: fresh-process measurements, skips, OOM rows, JSON, reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
import types

import pytest
import torch

from ember.bench import harness
from ember.bench.suites import SUITES
from ember.cli import main

CPU = torch.device("cpu")
TINY = {
    "attention": {"pass": "fwd_bwd", "batch": 1, "heads": 2, "kv_heads": 1, "seq": 256, "head_dim": 32,
                  "causal": True, "padded": False},
    "cross_entropy": dict(tokens=256, hidden=64, vocab=4000),
    "lora": dict(tokens=64, in_features=128, out_features=96, rank=8, base="dense", dropout=0.05),
    "optimizer": dict(million_params=1),
    "train_step": dict(model="llama-tiny", mode="lora", tokens=32),
}


@pytest.mark.parametrize("suite", sorted(TINY))
def test_each_suite_measures_in_a_fresh_process(suite):
    providers = SUITES[suite].providers
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
    """QLoRA and full fine-tuning steps run for ember and for the stock baseline (QLoRA: PEFT over bitsandbytes)."""
    for provider in ("ember", "torch"):
        for mode in ("qlora", "full"):
            row = harness.run_case("train_step", provider, dict(TINY["train_step"], mode=mode), CPU, timeout=300)
            assert row["status"] == "ok", row
            assert row["trainable_params"] > 0


def test_a_failing_case_is_an_error_row_and_a_slow_one_times_out():
    bad = dict(TINY["attention"], heads=3, kv_heads=2)  # query heads must be a multiple of the key/value heads
    row = harness.run_case("attention", "ember", bad, CPU, timeout=300)
    assert row["status"] == "error" and "ValueError" in row["message"] and "heads" in row["message"], row
    row = harness.run_case("train_step", "ember", TINY["train_step"], CPU, timeout=0.01)
    assert row["status"] == "error" and "no result within" in row["message"], row


def test_cuda_only_providers_are_skipped_on_a_cpu_without_a_process(monkeypatch):
    monkeypatch.setattr(harness, "measure_cpu", lambda *a, **k: pytest.fail("a process was started"))
    for suite, provider in (("attention", "sdpa_cudnn"), ("attention", "sdpa_efficient")):
        row = harness.run_case(suite, provider, TINY[suite], CPU)
        assert row["status"] == "skipped" and row["message"] == f"{provider}: needs a CUDA device"


class _FakeNvml:
    """Stands in for pynvml: a GPU whose power rises with every reading."""
    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 0, 1, 0

    def __init__(self):
        self.readings, self.open = 0, 0

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetPowerUsage(self, handle):
        self.readings += 1
        return 100_000 + 1000 * self.readings  # milliwatts

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980 if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 55

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=(1000 + self.readings) * 2**20)

    def nvmlSystemGetDriverVersion(self):
        return b"580.65.06"


def test_nvml_sampler_summarizes_and_releases_nvml(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = harness.NvmlSampler(0)
    sampler.start()
    while fake.readings < 5:
        time.sleep(0.005)
    summary = sampler.summary()
    n = summary["nvml_samples"]
    assert n == fake.readings >= 5 and fake.open == 0
    assert summary["nvml_power_w_median"] == (100_000 + 1000 * (n // 2 + 1)) / 1000
    assert summary["nvml_used_mb_peak"] == 1000 + n and summary["nvml_sm_clock_mhz_median"] == 1980
    assert harness._driver_version() == "580.65.06" and fake.open == 0


def test_nvml_missing_gives_no_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    sampler = harness.NvmlSampler(0)
    sampler.start()
    assert sampler.summary() == {} and harness._driver_version() is None


def test_cuda_measurement_logic_with_the_device_calls_stood_in(monkeypatch):
    """measure_cuda's bookkeeping (warm-up, allocator peak above the inputs, quantiles, TFLOP/s, NVML) on the CPU,
    with torch.cuda's counters and do_bench replaced: the GPU tier below runs the real thing."""
    import triton.testing

    calls = []
    allocated = iter([100 * 2**20])  # memory_allocated after setup and warm-up
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 164 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 256 * 2**20)
    asked = {}

    def do_bench(fn, rep, return_mode):
        asked.update(rep=rep, return_mode=return_mode)
        fn()
        return [3.0, 1.0, 2.0, 2.0, 1.5, 4.0, 2.5, 1.5, 2.0, 3.0, 2.0]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    row = harness.measure_cuda(SUITES["cross_entropy"].setup, "torch", TINY["cross_entropy"], CPU)
    assert calls[:2] == ["sync", "reset"]  # the warm-up call is outside the measured peak
    assert (row["time_ms"], row["time_ms_p20"], row["time_ms_p80"], row["repeats"]) == (2.0, 1.5, 3.0, 11)
    assert asked["return_mode"] == "all" and asked["rep"] >= 100
    assert row["peak_allocated_mb"] == 64 and row["peak_reserved_mb"] == 256
    assert row["tflops"] == pytest.approx(6 * 256 * 64 * 4000 / 2e-3 / 1e12)
    assert row["gbps"] > 0 and row["nvml_samples"] >= 1 and row["nvml_power_w_median"] > 100


def test_a_slow_gpu_case_is_given_time_for_the_minimum_repeat_count(monkeypatch):
    """do_bench's 100 ms would time a 40 ms case twice: the harness asks for the time of MIN_REPEATS calls."""
    import triton.testing

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    for name in ("memory_allocated", "max_memory_allocated", "max_memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: 0)
    asked = {}

    def do_bench(fn, rep, return_mode):
        asked["rep"] = rep
        return [40.0] * int(rep / 40)

    def slow_setup(provider, params, device):
        return types.SimpleNamespace(fn=lambda: time.sleep(0.04), flops=0, bytes=0, extra={})

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    row = harness.measure_cuda(slow_setup, "torch", {}, CPU)
    assert asked["rep"] >= harness.MIN_REPEATS * 40 and row["repeats"] >= harness.MIN_REPEATS


@pytest.mark.gpu
@pytest.mark.parametrize("suite", sorted(TINY))
def test_cuda_case_is_timed_with_throughput_memory_and_nvml(suite):
    if not torch.cuda.is_available():
        pytest.skip("GPU tier: no CUDA device")
    cuda = torch.device("cuda")
    provider = SUITES[suite].providers[0]
    params = dict(TINY[suite], mode="qlora") if suite == "train_step" else TINY[suite]
    row = harness.run_case(suite, provider, params, cuda)
    assert row["status"] == "ok", row
    assert 0 < row["time_ms_p20"] <= row["time_ms"] <= row["time_ms_p80"]
    assert row["peak_allocated_mb"] >= 0 and row["peak_reserved_mb"] > 0
    assert ("tflops" in row) == (suite != "optimizer") and ("gbps" in row) == (suite in ("attention", "optimizer",
                                                                                          "cross_entropy"))
    ceilings = harness.ceilings(cuda)
    assert ceilings["matmul_bf16_tflops"] > 1 and ceilings["copy_gbps"] > 10


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


def test_bench_command_writes_json_and_reports(tmp_path, monkeypatch, capsys):
    """`ember bench` end to end, with the sizes shrunk to TINY."""
    for name, suite in list(SUITES.items()):
        monkeypatch.setitem(SUITES, name, dataclasses.replace(suite, sizes=lambda quick, device, s=name: [TINY[s]],
                                                              providers=suite.providers[:2]))
    assert main(["bench", "cross_entropy", "optimizer", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    run_path = next(tmp_path.glob("bench-cpu-*.json"))
    run = json.loads(run_path.read_text())
    assert {r["suite"] for r in run["results"]} == {"cross_entropy", "optimizer"}
    assert run["env"]["versions"]["torch"] and run["env"]["device"] == "cpu" and run["quick"] is True
    capsys.readouterr()
    assert main(["bench", "report", str(run_path), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "## cross_entropy" in out and "## optimizer" in out and "state bytes / parameter" in out


def test_bench_command_runs_only_the_providers_asked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(SUITES, "optimizer", dataclasses.replace(SUITES["optimizer"],
                                                                 sizes=lambda quick, device: [TINY["optimizer"]]))
    assert main(["bench", "optimizer", "--providers", "adamw8bit", "--out", str(tmp_path), "--device", "cpu"]) == 0
    run = json.loads(next(tmp_path.glob("bench-cpu-*.json")).read_text())
    assert [row["provider"] for row in run["results"]] == ["adamw8bit"]
    assert main(["bench", "optimizer", "--providers", "ember,sdpa_flash", "--device", "cpu"]) == 2
    assert "unknown provider(s) ember, sdpa_flash for these suites" in capsys.readouterr().err


def test_bench_command_errors(capsys):
    assert main(["bench", "nonsense"]) == 2
    assert "unknown suite 'nonsense'" in capsys.readouterr().err
    assert main(["bench", "report", "missing.json"]) == 2
    assert "'missing.json' does not exist" in capsys.readouterr().err
