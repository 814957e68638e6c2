"""Reports: markdown tables with ratios, rows labelled by what varies, throughput against ceilings, plots."""

from __future__ import annotations

import json

import pytest

from ember.bench import report
from ember.engine.errors import ConfigError


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
    assert "## attention: ms, median (in brackets: ember / provider)" in text
    assert "| seq=1024 | 2.000 | 8.000 (0.25x) | 4.000 (0.50x) | skipped | 2.00x |" in text  # 2x slower than before
    assert "| seq=16384 | - | OOM | - | - | - |" in text
    assert "- torch at seq=16384: out of memory at seq=16384" in text
    assert "- flash_attn: flash_attn is not installed" in text
    cpu_text = report.tables(_fake_run("cpu", {"ember": 10.0, "torch": 40.0}))
    assert "MiB peak extra RSS" in cpu_text and "wall times are not performance" in cpu_text


def test_report_labels_rows_by_what_varies_and_gives_throughput_against_ceilings():
    def row(provider, seq, ms, tflops, allocated):
        return dict(suite="attention", provider=provider, status="ok", time_ms=ms, tflops=tflops,
                    peak_allocated_mb=allocated, params={"pass": "fwd", "heads": 16, "seq": seq})
    run = _fake_run("cuda", {})
    run["ceilings"] = {"matmul_bf16_tflops": 800.0, "copy_gbps": 4000.0}
    run["results"] = [row("ember", 1024, 1.0, 400.0, 10.0), row("sdpa_flash", 1024, 2.0, 200.0, 40.0),
                      row("ember", 2048, 3.0, 500.0, 20.0), row("sdpa_flash", 2048, 4.0, 300.0, 80.0)]
    text = report.tables(run)
    assert "All rows: pass=fwd, heads=16." in text
    assert "| size | ember | sdpa_flash |" in text
    assert "| seq=1024 | 1.000 | 2.000 (0.50x) |" in text
    assert "attention: TFLOP/s (in brackets: % of the bf16 matmul ceiling measured in this run)" in text
    assert "| seq=2048 | 500.0 (62%) | 300.0 (38%) |" in text
    assert "| seq=2048 | 20.0 | 80.0 (0.25x) |" in text  # peak allocated
    assert "GB/s" not in text  # no row has bytes moved


def test_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = _fake_run("cuda", {"ember": 2.0, "torch": 8.0})
    for result in run["results"]:
        result["peak_allocated_mb"] = 5.0
    written = report.plots(run, tmp_path)
    assert [p.name for p in written] == ["attention-time.png", "attention-memory.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    cpu_run = _fake_run("cpu", {"ember": 10.0, "torch": 40.0})
    for result in cpu_run["results"]:
        result.update(largest_tensor_mb=1.0, params=dict(result["params"], causal=result["provider"] == "ember"))
    written = report.plots(cpu_run, tmp_path / "cpu")
    assert [p.name for p in written] == ["attention-memory.png", "attention-largest-tensor.png"]


def test_plot_axis_is_the_size_and_panels_the_rest():
    rows = [dict(params={"pass": p, "seq": s, "heads": 8}) for p in ("fwd", "bwd") for s in (512, 1024, 2048)]
    varying, fixed = report._varying(rows)
    assert varying == ["pass", "seq"] and fixed == {"heads": 8}
    assert report._x_axis(rows, varying) == "seq"


def test_load_names_a_missing_or_foreign_file(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_fake_run("cpu", {"ember": 1.0})))
    assert report.load(run)["env"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="'.*missing.json' does not exist"):
        report.load(tmp_path / "missing.json")
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.raises(ConfigError, match="is not a JSON run written by 'ember bench'"):
        report.load(tmp_path / "notes.txt")


def test_memory_too_small_to_measure_reads_as_zero_with_the_difference_not_a_ratio():
    """torch's fused AdamW allocates nothing during a step (one 4 KiB page of RSS): its cell is '~0' with how much
    more ember's optimizer allocates, and the optimizer table says what its memory columns count."""
    run = _fake_run("cpu", {})
    run["results"] = [dict(suite="optimizer", provider=p, params=dict(million_params=16), status="ok",
                           peak_extra_rss_mb=rss, largest_tensor_mb=largest, state_bytes_per_param=state)
                      for p, rss, largest, state in (("adamw", 4 / 1024, 0.0, 8.0), ("adamw8bit", 29.1, 61.0, 2.03),
                                                     ("bnb_adamw8bit", 0.0, 0.0, 2.03))]
    text = report.tables(run)
    assert "| size | adamw | adamw8bit | bnb_adamw8bit |" in text
    assert "| - | ~0 (adamw8bit +29.1) | 29.1 | ~0 (adamw8bit +29.1) |" in text  # headline: peak extra RSS
    assert "| - | ~0 (adamw8bit +61.0) | 61.0 | ~0 (adamw8bit +61.0) |" in text  # largest tensor
    assert "| - | 8.000 (0.25x) | 2.030 | 2.030 (1.00x) |" in text  # state bytes / parameter
    assert "torch's fused AdamW updates in place" in text
    run["results"][1]["peak_extra_rss_mb"] = 0.0  # ember's own value negligible too: no difference to give
    assert "| - | ~0 | ~0 | ~0 |" in report.tables(run)


def test_layer_suite_reports_held_bytes_per_token_per_layer_with_its_ratio_to_stock():
    run = _fake_run("cpu", {})
    run["results"] = [dict(suite="layer", provider=p, params=dict(model=model, scope="layer", tokens=512),
                           status="ok", peak_extra_rss_mb=rss, held_bytes_per_token_per_layer=held,
                           held_per_layer_x_hidden=held / hidden, held_total_mb=1.0)
                      for model, hidden, p, rss, held in (("llama", 512, "ember", 20.0, 15208.0),
                                                          ("llama", 512, "torch", 40.0, 35962.0),
                                                          ("bert-base", 768, "ember", 30.0, 25024.0),
                                                          ("bert-base", 768, "torch", 60.0, 61024.0))]
    text = report.tables(run)
    assert "layer: bytes held for the backward per token per layer" in text
    assert "| model=llama | 15,208.0 | 35,962.0 (0.42x) |" in text
    assert "| model=bert-base | 25,024.0 | 61,024.0 (0.41x) |" in text
    # The headline (peak extra RSS) is still the first table, the held bytes after it.
    assert text.index("| model=llama | 20.0 | 40.0 (0.50x) |") < text.index("| model=llama | 15,208.0 |")
