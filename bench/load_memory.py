"""Host peak memory of loading a model for QLoRA: transformers' whole-model load against ember's streaming loader.

    python -m ember.bench.load_memory                                  # SmolLM2-135M (asset:smollm2-135m)
    python -m ember.bench.load_memory --model=path/or/org/name --dtype=bfloat16

Each way of loading runs in a fresh process, whose peak resident set is the
honest figure: it counts every byte the process held, the checkpoint's
mapped pages included. The process first imports and builds what both ways
import and build lazily, then restarts the kernel's peak counter (VmHWM,
through ``/proc/self/clear_refs``; where that is refused, ``ru_maxrss`` since
the start) and records its resident set (the baseline): peak minus baseline
is what loading itself cost.

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


def _reset_peak() -> bool:
    """Restart the kernel's peak resident set (VmHWM) from now; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """The peak resident set since ``_reset_peak`` (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _warm_up(folder) -> None:
    """What both ways import or build lazily (the model's module, accelerate, safetensors, the quantizer's tables),
    done before the baseline: otherwise it counts as loading (about 150 MiB here)."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import transformers

    from ember.kernels.nf4 import quantize_nf4

    config = transformers.AutoConfig.from_pretrained(folder)
    with accelerate.init_empty_weights():
        transformers.AutoModelForCausalLM.from_config(config)
    quantize_nf4(torch.randn(256, 256), blocksize=64, double_quant=True)


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
    _warm_up(folder)
    # Imports can peak above what they keep (seen: ~85 MiB more under TRITON_INTERPRET=1), and that peak
    # would hide the loading's: the peak is restarted here.
    peak_reset = _reset_peak()
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
                final_rss_mib=round(_rss_mib(), 1), seconds=round(seconds, 2), peak_reset=peak_reset,
                base_bytes=report.base_bytes,
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
