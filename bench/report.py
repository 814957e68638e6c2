"""Turn a benchmark run (JSON) into markdown tables and PNG plots.

    ember bench report RUN.json [BASELINE.json] [--plots DIR]

One table per suite: a row per size, a column per provider, each cell the
measurement and ember's ratio against that provider ("0.42x": ember takes 0.42
of its time or memory; below 1 is better for ember). With a baseline run, a
last column gives ember's change against it, to catch regressions. The metric
is time on a GPU run and extra peak memory on a CPU run (CPU times are not
performance).
"""

from __future__ import annotations

import json
from pathlib import Path


def _metric(run: dict) -> tuple[str, str]:
    """(result key, column unit) of the run's headline metric."""
    return ("time_ms", "ms") if run["env"]["device"] == "cuda" else ("peak_extra_rss_mb", "MiB peak extra RSS")


def _size(params: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


def _cell(row: dict | None, key: str, ours: float | None, ours_name: str) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return {"skipped": "skipped", "oom": "OOM"}.get(row["status"], "error")
    value = row.get(key)
    if value is None:
        return "-"
    text = f"{value:.3f}" if value < 10 else f"{value:,.1f}"
    if ours is not None and row["provider"] != ours_name and value > 0:
        text += f" ({ours / value:.2f}x)"
    return text


# The provider whose ratios a suite's table shows: ember's own entry.
EMBER = {"optimizer": "adamw8bit"}
# Suite-specific measurements, each shown as its own table.
EXTRAS = {"state_bytes_per_param": "state bytes / parameter", "saved_activations_mb": "MiB saved for backward",
          "largest_tensor_mb": "MiB, largest tensor created"}


def _table(rows: list[dict], key: str, ember_provider: str, baseline_rows: list[dict] | None) -> list[str]:
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    header = ["size"] + providers + ([f"{ember_provider} vs baseline"] if baseline_rows is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in dict.fromkeys(_size(row["params"]) for row in rows):
        by_provider = {row["provider"]: row for row in rows if _size(row["params"]) == size}
        ours = by_provider.get(ember_provider)
        ours_value = ours.get(key) if ours and ours["status"] == "ok" else None
        cells = [size] + [_cell(by_provider.get(p), key, ours_value, ember_provider) for p in providers]
        if baseline_rows is not None:
            cells.append(_against_baseline(baseline_rows, size, key, ember_provider, ours_value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def tables(run: dict, baseline: dict | None = None) -> str:
    key, unit = _metric(run)
    env = run["env"]
    lines = [f"# ember bench: {env.get('gpu') or env['cpu']} ({env['device']}), "
             f"ember {str(env.get('ember_git_sha'))[:10]}, torch {env['versions'].get('torch')}, {env['time']}"]
    if env["device"] != "cuda":
        lines.append("\nCPU run: memory is measured per case in a fresh process; wall times are not performance.")
    if run.get("ceilings"):
        lines.append("\nCeilings measured in this run: " +
                     ", ".join(f"{k} {v:,.1f}" for k, v in run["ceilings"].items()))
    for suite in dict.fromkeys(row["suite"] for row in run["results"]):
        rows = [row for row in run["results"] if row["suite"] == suite]
        ours = EMBER.get(suite, "ember")
        baseline_rows = [r for r in baseline["results"] if r["suite"] == suite] if baseline else None
        lines += [f"\n## {suite}: {unit} (in brackets: {ours} / provider)\n"] + _table(rows, key, ours, baseline_rows)
        for extra, label in EXTRAS.items():
            if any(extra in row for row in rows):
                lines += [f"\n{suite}: {label}\n"] + _table(rows, extra, ours, None)
        problems = [f"- {row['provider']} at {_size(row['params'])}: {row['message']}"
                    for row in rows if row["status"] not in ("ok", "skipped")]
        skipped = sorted({f"- {row['message']}" for row in rows if row["status"] == "skipped"})
        lines += (["\nNot measured:"] + problems + skipped) if problems or skipped else []
    return "\n".join(lines) + "\n"


def _against_baseline(baseline_rows: list[dict], size: str, key: str, ours_name: str, ours: float | None) -> str:
    for row in baseline_rows:
        if (row["provider"], _size(row["params"])) == (ours_name, size) and row["status"] == "ok":
            return f"{ours / row[key]:.2f}x" if ours is not None and row.get(key) else "-"
    return "-"


def plots(run: dict, out_dir: Path) -> list[Path]:
    """One PNG per suite: the headline metric against size, a line per provider (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, unit = _metric(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suite in dict.fromkeys(row["suite"] for row in run["results"]):
        rows = [row for row in run["results"] if row["suite"] == suite and row["status"] == "ok"]
        if not rows:
            continue
        sizes = list(dict.fromkeys(_size(row["params"]) for row in run["results"] if row["suite"] == suite))
        figure, axes = plt.subplots(figsize=(8, 4.5))
        for provider in dict.fromkeys(row["provider"] for row in rows):
            points = [(sizes.index(_size(r["params"])), r[key]) for r in rows if r["provider"] == provider]
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=provider)
        axes.set_xticks(range(len(sizes)), [s.replace(", ", "\n") for s in sizes], fontsize=6)
        axes.set_ylabel(unit)
        axes.set_title(f"{suite} ({run['env'].get('gpu') or run['env']['device']})")
        axes.legend()
        figure.tight_layout()
        path = out_dir / f"{suite}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
