"""Turn a benchmark run (JSON) into markdown tables and PNG plots.

    ember bench report RUN.json [BASELINE.json] [--out DIR]

One table per suite and metric: a row per size, a column per provider, each
cell the measurement and, in brackets, ember's value divided by that
provider's ("0.42x": ember takes 0.42 of its time or memory; below 1 is better
for ember). The headline metric is the median time on a GPU run and the extra
peak memory on a CPU run (CPU times are not performance); throughput tables
give, in brackets, the percentage of the card's ceiling measured in the same
run instead. With a baseline run, a last column gives ember's change against
it (above 1.00x is a regression). Only the parameters that vary within a suite
label its rows; the fixed ones are written once above the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ember.engine.errors import ConfigError

# The provider whose ratios a suite's table shows: ember's own entry.
EMBER = {"optimizer": "adamw8bit"}

# Memory below this (MiB) is shown as ~0: the CPU's resident memory moves by 4 KiB pages, and a page or two is noise.
NEGLIGIBLE_MB = 0.01

# What a suite's memory columns mean, printed under its heading.
NOTES = {
    "optimizer": "Memory columns: what one step allocates beyond the parameters, their gradients and the optimizer "
                 "state, which all exist before it (the state's size is the state bytes / parameter table). "
                 "torch's fused AdamW updates in place and allocates nothing (~0); on a CPU, ember's adamw8bit runs "
                 "its PyTorch path, which dequantizes the moments into fp32 temporaries.",
}

# The tables after the headline, in order: (result key, label, what the brackets hold). A table is shown when a
# row has the key; "ratio" is ember / provider, "ceiling:K" the percentage of the run's measured ceiling K.
EXTRAS = [
    ("tflops", "TFLOP/s (in brackets: % of the bf16 matmul ceiling measured in this run)",
     "ceiling:matmul_bf16_tflops"),
    ("gbps", "GB/s (in brackets: % of the device copy ceiling measured in this run)", "ceiling:copy_gbps"),
    ("peak_allocated_mb", "MiB peak allocated during one call, above the inputs (torch allocator)", "ratio"),
    ("nvml_used_mb_peak", "MiB device memory in use, peak (NVML: also sees memory outside the torch allocator)",
     "ratio"),
    ("largest_tensor_mb", "MiB, largest tensor created", "ratio"),
    ("saved_activations_mb", "MiB saved for backward", "ratio"),
    # The layer suite's headline on memory (issue 17): what autograd keeps for the backward of one layer, per token,
    # parameters excluded and 16-bit weight copies made in the forward included (ember.bench.memory.HeldActivations).
    ("held_bytes_per_token_per_layer", "bytes held for the backward per token per layer (autograd's saved tensors; "
     "parameters excluded)", "ratio"),
    ("state_bytes_per_param", "state bytes / parameter", "ratio"),
]


def _headline(run: dict) -> tuple[str, str]:
    """(result key, unit) of the run's headline metric."""
    return ("time_ms", "ms, median") if run["env"]["device"] == "cuda" else ("peak_extra_rss_mb", "MiB peak extra RSS")


def describe_size(params: dict) -> str:
    """A case's parameters as one label, e.g. "seq=1024, head_dim=64" (also the harness's progress lines)."""
    return ", ".join(f"{key}={value}" for key, value in params.items())


def _varying(rows: list[dict]) -> tuple[list[str], dict]:
    """The parameter names whose values differ across ``rows``, and the fixed ones with their value."""
    values: dict[str, list] = {}
    for row in rows:
        for key, value in row["params"].items():
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    varying = [key for key, seen in values.items() if len(seen) > 1 or any(key not in r["params"] for r in rows)]
    fixed = {key: seen[0] for key, seen in values.items() if key not in varying}
    return varying, fixed


def _label(params: dict, keys: list[str]) -> str:
    return ", ".join(f"{key}={params[key]}" for key in keys if key in params) or "-"


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"


def _cell(row: dict | None, key: str, bracket: str, ours: float | None, ours_name: str, ceilings: dict) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"skipped": "skipped", "oom": "OOM"}.get(row["status"], "error")
    value = row.get(key)
    if value is None:
        return "-"
    if key.endswith("_mb") and value < NEGLIGIBLE_MB:
        # Nothing measurable: a ratio against it would be noise over noise (27.5 MiB / one 4 KiB page = 7000x).
        text = "~0"
        if bracket == "ratio" and ours is not None and row["provider"] != ours_name and ours >= NEGLIGIBLE_MB:
            text += f" ({ours_name} +{_number(ours)})"
        return text
    text = _number(value)
    if bracket == "ratio":
        if ours is not None and row["provider"] != ours_name and value > 0:
            text += f" ({ours / value:.2f}x)"
    elif ceilings.get(bracket.split(":", 1)[1]):
        text += f" ({100 * value / ceilings[bracket.split(':', 1)[1]]:.0f}%)"
    return text


def _table(rows: list[dict], key: str, bracket: str, ember_provider: str, ceilings: dict,
           baseline_rows: list[dict] | None) -> list[str]:
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    varying, _ = _varying(rows)
    header = ["size"] + providers
    header += [f"{ember_provider} vs baseline"] if baseline_rows is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in dict.fromkeys(describe_size(row["params"]) for row in rows):
        by_provider = {row["provider"]: row for row in rows if describe_size(row["params"]) == size}
        ours = by_provider.get(ember_provider)
        ours_value = ours.get(key) if ours and ours["status"] == "ok" else None
        params = next(iter(by_provider.values()))["params"]
        cells = [_label(params, varying)]
        cells += [_cell(by_provider.get(p), key, bracket, ours_value, ember_provider, ceilings) for p in providers]
        if baseline_rows is not None:
            cells.append(_against_baseline(baseline_rows, size, key, ember_provider, ours_value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(run: dict, baseline: dict | None = None) -> str:
    key, unit = _headline(run)
    env, ceilings = run["env"], run.get("ceilings") or {}
    lines = [f"# ember bench: {env.get('gpu') or env['cpu']} ({env['device']}), "
             f"ember {str(env.get('ember_git_sha'))[:10]}, torch {env['versions'].get('torch')}, {env['time']}"]
    if env["device"] != "cuda":
        lines.append("\nCPU run: memory is measured per case in a fresh process; wall times are not performance.")
    if ceilings:
        lines.append("\nCeilings measured in this run: " + ", ".join(f"{k} {v:,.1f}" for k, v in ceilings.items()))
    for suite in dict.fromkeys(row["suite"] for row in run["results"]):
        rows = [row for row in run["results"] if row["suite"] == suite]
        ours = EMBER.get(suite, "ember")
        baseline_rows = [r for r in baseline["results"] if r["suite"] == suite] if baseline else None
        _, fixed = _varying(rows)
        lines.append(f"\n## {suite}: {unit} (in brackets: {ours} / provider)\n")
        if suite in NOTES:
            lines.append(NOTES[suite] + "\n")
        if fixed:
            lines.append(f"All rows: {describe_size(fixed)}.\n")
        lines += _table(rows, key, "ratio", ours, ceilings, baseline_rows)
        for extra, label, bracket in EXTRAS:
            shown = [row for row in rows if extra != "gbps" or "tflops" not in row]  # GB/s where FLOPs say nothing
            if extra != key and any(extra in row for row in shown):
                lines += [f"\n{suite}: {label}\n"] + _table(rows, extra, bracket, ours, ceilings, None)
        problems = [f"- {row['provider']} at {describe_size(row['params'])}: {row['message']}"
                    for row in rows if row["status"] not in ("ok", "skipped")]
        skipped = sorted({f"- {row['message']}" for row in rows if row["status"] == "skipped"})
        lines += (["\nNot measured:"] + problems + skipped) if problems or skipped else []
    return "\n".join(lines) + "\n"


def _against_baseline(baseline_rows: list[dict], size: str, key: str, ours_name: str, ours: float | None) -> str:
    for row in baseline_rows:
        if (row["provider"], describe_size(row["params"])) == (ours_name, size) and row["status"] == "ok":
            return f"{ours / row[key]:.2f}x" if ours is not None and row.get(key) else "-"
    return "-"


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

# What each figure plots, by device: (result key, axis label, file suffix).
PLOTTED = {
    "cuda": [("time_ms", "time (ms, median)", "time"), ("peak_allocated_mb", "MiB peak allocated", "memory")],
    "cpu": [("peak_extra_rss_mb", "MiB peak extra RSS", "memory"),
            ("largest_tensor_mb", "MiB, largest tensor created", "largest-tensor")],
}


def _x_axis(rows: list[dict], varying: list[str]) -> str | None:
    """The parameter to put on the x axis: the varying one with the most distinct values (a size, usually)."""
    counts = {key: len({str(r["params"].get(key)) for r in rows}) for key in varying}
    return max(counts, key=counts.get) if counts else None


def plots(run: dict, out_dir: Path) -> list[Path]:
    """Per suite, one PNG per metric: the metric against the main size parameter, a line per provider, and a
    panel per combination of the other varying parameters (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    title_device = run["env"].get("gpu") or run["env"]["device"]
    for suite in dict.fromkeys(row["suite"] for row in run["results"]):
        every_row = [row for row in run["results"] if row["suite"] == suite]
        varying, fixed = _varying(every_row)
        x_key = _x_axis(every_row, varying)
        panel_keys = [key for key in varying if key != x_key]
        panels = list(dict.fromkeys(_label(r["params"], panel_keys) for r in every_row))
        for key, axis_label, suffix in PLOTTED[run["env"]["device"]]:
            rows = [row for row in every_row if row["status"] == "ok" and row.get(key) is not None]
            if not rows:
                continue
            columns = min(3, len(panels))
            figure, axes = plt.subplots(math.ceil(len(panels) / columns), columns, squeeze=False,
                                        figsize=(5 * columns, 3.6 * math.ceil(len(panels) / columns)))
            for index, panel in enumerate(panels):
                axis = axes[index // columns][index % columns]
                _panel(axis, [r for r in rows if _label(r["params"], panel_keys) == panel], every_row, x_key, key)
                axis.set_title(panel if panel_keys else "", fontsize=8)
                axis.set_xlabel(x_key or "", fontsize=8)
                axis.set_ylabel(axis_label, fontsize=8)
            for index in range(len(panels), axes.size):
                axes[index // columns][index % columns].set_visible(False)
            figure.suptitle(f"{suite} on {title_device}" + (f" ({describe_size(fixed)})" if fixed else ""), fontsize=9)
            figure.tight_layout()
            path = out_dir / f"{suite}-{suffix}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            written.append(path)
    return written


def _panel(axis, rows: list[dict], every_row: list[dict], x_key: str | None, key: str) -> None:
    """One line per provider; numeric sizes on a log2 axis, anything else as categories."""
    xs = list(dict.fromkeys(r["params"].get(x_key) for r in every_row))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in xs)
    for provider in dict.fromkeys(r["provider"] for r in rows):
        points = [(r["params"].get(x_key), r[key]) for r in rows if r["provider"] == provider]
        positions = [x if numeric else xs.index(x) for x, _ in points]
        axis.plot(positions, [y for _, y in points], marker="o", label=provider)
    if numeric:
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs], fontsize=7)
        axis.minorticks_off()
    else:
        axis.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=7)
    axis.tick_params(axis="y", labelsize=7)
    if rows:
        axis.legend(fontsize=6)


def load(path: str | Path) -> dict:
    """A run written by ``ember bench``; a missing or unreadable file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{str(path)!r} is not a JSON run written by 'ember bench': {error}") from None
