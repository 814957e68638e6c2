"""Host peak memory of loading a model for QLoRA: transformers' whole-model load against ember's streaming loader.

    python -m ember.bench.load_memory                                  # SmolLM2-135M (asset:smollm2-135m)
    python -m ember.bench.load_memory --model=path/or/org/name --dtype=bfloat16

Each way of loading runs in a fresh process, whose peak resident set
(``ru_maxrss``) is the honest figure: it counts every byte the process ever
held, the checkpoint's mapped pages included. The process first imports what
both ways import and records its resident set then (the baseline), so the
difference is what loading itself cost.

- ``whole``: the path ember used before its streaming loader, and the one
  transformers users take: ``AutoModelForCausalLM.from_pretrained`` in fp32,
  then ``apply_lora`` with ``quantize_base="nf4"`` on every Linear of the body;
- ``streaming``: ``ember.engine.loading.load_pretrained`` quantizing the same
  layers while it reads them, the rest in ``--dtype``, then ``apply_lora``
  (which adopts the NF4 layers).

The model ends the same either way (the test suite checks that the NF4 codes
are identical); only the memory on the way differs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WAYS = ("whole", "streaming")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def measure_one(way: str, model: str, dtype_name: str) -> dict:
    """Load ``model`` for QLoRA the ``way`` asked, in this process; its memory figures."""
    import torch
    import transformers  # noqa: F401  (imported by both ways: part of the baseline)

    from ember.engine.data import model_folder
    from ember.engine.loading import load_pretrained
    from ember.engine.lora import LoRAConfig, apply_lora, lora_report

    folder = model_folder(model)
    dtype = getattr(torch, dtype_name)
    lora = LoRAConfig(r=16, alpha=32, target_modules="all-linear", quantize_base="nf4")
    baseline = _rss_mib()
    started = time.perf_counter()
    if way == "whole":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        apply_lora(loaded, lora)
        loaded.to(dtype)
    else:
        loaded = load_pretrained(folder, task="causal-lm", dtype=dtype, quantize="all-linear")
        apply_lora(loaded, lora)
    seconds = time.perf_counter() - started
    report = lora_report(loaded)
    return dict(way=way, model=model, dtype=dtype_name, baseline_rss_mib=round(baseline, 1),
                peak_rss_mib=round(_peak_mib(), 1), loading_mib=round(_peak_mib() - baseline, 1),
                final_rss_mib=round(_rss_mib(), 1), seconds=round(seconds, 2), base_bytes=report.base_bytes,
                total_params=report.total_params)


def measure(model: str, dtype_name: str, ways=WAYS) -> list[dict]:
    """Every way in its own fresh process."""
    results = []
    for way in ways:
        out = subprocess.run([sys.executable, "-m", "ember.bench.load_memory", f"--model={model}",
                              f"--dtype={dtype_name}", f"--one={way}"], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"measuring {way!r} failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="asset:smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--one", choices=WAYS, help="measure one way in this process (what the others call)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.model, args.dtype)))
        return
    print("| way | dtype | peak RSS (MiB) | of which loading (MiB) | RSS after (MiB) | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for row in measure(args.model, args.dtype):
        print(f"| {row['way']} | {row['dtype']} | {row['peak_rss_mib']:.0f} | {row['loading_mib']:.0f} | "
              f"{row['final_rss_mib']:.0f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
