"""One command from a fresh GPU machine to a complete, shareable result.

    python -m ember.bench.acceptance [--out DIR] [--dry-run] [--budget-s SECONDS] [--skip smoke,tests,bench]

On one CUDA device, within a time budget (600 s by default: about ten minutes
on an H100 or H200), in this order:

1. smoke: every public kernel of ``ember.kernels`` at a small, awkward shape,
   forward and backward in fp16 and bf16, against its float64 reference by the
   tolerance rule (error at most twice stock PyTorch's in the same dtype, plus
   a small atol). No ``torch.compile``, no compile gate: a minute's check that
   each kernel runs and is right on this card.
2. the GPU test tier: ``pytest -m gpu``, one process per test file, each file's
   results in JUnit XML.
3. benchmarks: ``ember bench --quick``'s suites through ``ember.bench.harness``
   against the installed peers (SDPA, flash-attn, Liger, Cut Cross-Entropy,
   PEFT, bitsandbytes; ``torch.compile`` and SDPA's math backend are left out:
   they measure compile time and a reference, not a peer).
4. the record: the run JSON (``ember bench report`` reads it), the markdown
   report, the plots, the smoke and test results, and a summary with ember's
   ratios against each peer, all in one folder, the summary also printed.

Isolation: a hard CUDA error (an illegal address, a device-side assertion)
leaves a process's CUDA context unusable, so every smoke kernel, every test
file and every (suite, provider) pair of the benchmarks runs in its own
process; a benchmark process that dies or hits such an error is replaced by a
fresh one for the remaining sizes, and the case it died in is an error row.
Peers that are not installed are skipped without a process. Each process gets
what its step's budget leaves after a few seconds' reserve for each process
still to come; what the budget leaves out is recorded as not run, never
dropped silently.

Without CUDA (or with ``--dry-run``) the command says so and runs what a CPU
can in a few seconds: the smoke on the PyTorch path in fp32, one small size of
the attention, cross-entropy, LoRA and optimizer suites for ember and its stock
baseline (memory, measured in one process: the numbers are indicative), and
the same files. The GPU test tier needs a GPU; CI runs the CPU tiers.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

# Benchmark providers left out here (see the module notes), and the peers the summary names.
LEFT_OUT = ("torch_compile", "sdpa_math")
PEERS = {
    "sdpa_flash": "SDPA (flash backend)", "sdpa_efficient": "SDPA (memory-efficient backend)",
    "sdpa_cudnn": "SDPA (cuDNN backend)", "flash_attn": "flash-attn", "liger": "Liger Kernel",
    "cut_cross_entropy": "Cut Cross-Entropy", "peft": "PEFT", "bnb_adamw8bit": "bitsandbytes AdamW8bit",
    "bnb_paged_adamw8bit": "bitsandbytes PagedAdamW8bit", "adamw": "torch AdamW (fused)",
    "torch": "stock PyTorch",
    ("train_step", "torch"): "stock transformers + PEFT (+ bitsandbytes NF4 for QLoRA)",
    ("lora", "peft"): "PEFT (over bitsandbytes for NF4)",
}
# The dry run's cases: one small size of each cheap suite, for ember and its stock baseline. Small enough that
# the dry run takes seconds: it proves the machinery, and its numbers are only indicative.
DRY_RUN_CASES = {
    "attention": (("ember", "torch"), {"pass": "fwd_bwd", "batch": 1, "heads": 2, "kv_heads": 1, "seq": 256,
                                       "head_dim": 32, "causal": True, "padded": False}),
    "cross_entropy": (("ember", "torch"), dict(tokens=256, hidden=64, vocab=4000)),
    "lora": (("ember", "torch"), dict(tokens=64, in_features=128, out_features=96, rank=8, base="dense",
                                      dropout=0.05)),
    "optimizer": (("adamw8bit", "adamw"), dict(million_params=1)),
}
# An error after which a process's CUDA context is unusable: the process is replaced.
_STICKY_CUDA_ERROR = re.compile(r"illegal (memory )?address|device-side assert|unspecified launch failure|"
                                r"misaligned address|illegal instruction|CUDA error: an? |cudaErrorLaunch", re.I)
# Shares of the whole budget: the smoke and the tests are capped, the benchmarks get the rest (and what the first
# two leave). A guess until a GPU run measures it: the smoke compiles every kernel (Triton's disk cache then serves
# the tests and the benchmarks), and the GPU fuzz alone compiles many specializations.
SMOKE_SHARE, TESTS_SHARE = 0.25, 0.35
# Seconds each process not yet started keeps in reserve: a process may use its step's budget less these, so a slow
# compile early does not time out while the time is there, and a hang still leaves the rest a little.
RESERVE_S = {"smoke": 5.0, "tests": 10.0, "bench": 10.0}


# ----------------------------------------------------------------------------
# The smoke: each public kernel at a small shape against its float64 reference
# ----------------------------------------------------------------------------

RELATIVE_ATOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}  # tests/conftest.py's tolerance rule


def _tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _compare(name: str, fn, ref, inputs: list, device, dtype, *, trainable: list[bool] | None = None) -> list[dict]:
    """``fn`` on ``device`` in ``dtype`` against ``ref`` in float64, by the tolerance rule, forward and backward.

    ``inputs``: float tensors (drawn in fp32 on the CPU); ``trainable[i]`` says whether input i gets a gradient.
    Stock PyTorch is ``ref`` computed in ``dtype``; the reference runs on the same device.
    """
    import torch

    trainable = trainable or [True] * len(inputs)

    def run(function, cast):
        leaves = [t.to(device, cast).requires_grad_(g) for t, g in zip(inputs, trainable)]
        outputs = _tuple(function(*leaves))
        generator = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=generator).to(device, o.dtype) for o in outputs]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, cotangents) if wanted else ()
        return [o.detach() for o in outputs] + [g.detach() for g in grads]

    ours, reference, stock = run(fn, dtype), run(ref, torch.float64), run(ref, dtype)
    checks = []
    labels = [f"out{i}" for i in range(len(ours) - sum(trainable))] + [f"d{i}" for i, g in enumerate(trainable) if g]
    for label, actual, exact, plain in zip(labels, ours, reference, stock):
        checks.append(_within_tolerance(f"{name} {label}", actual, exact, plain, dtype))
    return checks


def _within_tolerance(what: str, actual, exact, plain, dtype) -> dict:
    import torch

    actual, exact, plain = actual.double().cpu(), exact.double().cpu(), plain.double().cpu()
    if actual.shape != exact.shape:
        return dict(what=what, ok=False, message=f"shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    if not torch.isfinite(actual).all():
        return dict(what=what, ok=False, message="non-finite values")
    ours = (actual - exact).abs().max().item() if actual.numel() else 0.0
    theirs = (plain - exact).abs().max().item() if actual.numel() else 0.0
    atol = RELATIVE_ATOL[str(dtype).removeprefix("torch.")] * max(exact.abs().max().item() if exact.numel() else 0,
                                                                   1e-3)
    return dict(what=what, ok=ours <= 2 * theirs + atol, error=ours, stock_error=theirs, atol=atol)


def _randn(*shape, scale: float = 1.0):
    import torch

    return torch.randn(*shape) * scale


def _smoke_attention(device, dtype):
    from ember.kernels import flash_attention
    from ember.kernels.attention import attention_ref

    # GQA (4 query heads over 2), 77 queries over 77 keys (not a block multiple), causal, D = 64.
    q, k, v = _randn(2, 4, 77, 64), _randn(2, 2, 77, 64), _randn(2, 2, 77, 64)
    return _compare("causal GQA", lambda *t: flash_attention(*t, causal=True),
                    lambda *t: attention_ref(*t, causal=True), [q, k, v], device, dtype)


def _smoke_attention_varlen(device, dtype):
    import torch

    from ember.kernels import flash_attention_varlen
    from ember.kernels.attention import attention_ref

    lengths = [77, 1, 50]
    offsets = torch.tensor([0, 77, 78, 128], dtype=torch.int32, device=device)

    def ours(q, k, v):
        return flash_attention_varlen(q, k, v, offsets, offsets, max(lengths), max(lengths), causal=True)

    def reference(q, k, v):  # each sequence alone, (S, H, D) -> (1, H, S, D) and back
        pieces, start = [], 0
        for n in lengths:
            one = [t[start:start + n].transpose(0, 1)[None] for t in (q, k, v)]
            pieces.append(attention_ref(*one, causal=True)[0].transpose(0, 1))
            start += n
        return torch.cat(pieces)

    q, k, v = _randn(128, 4, 64), _randn(128, 4, 64), _randn(128, 4, 64)
    return _compare("packed 77+1+50", ours, reference, [q, k, v], device, dtype)


def _target(rows: int, vocab: int, device):
    import torch

    target = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(2))
    target[::7] = -100  # ignored rows
    return target.to(device)


def _smoke_cross_entropy(device, dtype):
    from ember.kernels import cross_entropy
    from ember.kernels.cross_entropy import cross_entropy_ref

    target = _target(77, 1003, device)
    return _compare("V=1003", lambda x: cross_entropy(x, target), lambda x: cross_entropy_ref(x, target),
                    [_randn(77, 1003, scale=3.0)], device, dtype)


def _smoke_linear_cross_entropy(device, dtype):
    from ember.kernels import LinearCrossEntropyLoss, linear_cross_entropy
    from ember.kernels.cross_entropy import linear_cross_entropy_ref

    target = _target(77, 1003, device)
    hidden, weight = _randn(77, 96), _randn(1003, 96, scale=96 ** -0.5)
    checks = []
    # Both backward strategies where the kernel has them (atomic accumulation; d(logits) formed in the forward).
    strategies = ("atomic", "chunked") if "strategy" in inspect.signature(linear_cross_entropy).parameters else (None,)
    for strategy in strategies:
        options = {} if strategy is None else {"strategy": strategy}
        checks += _compare(f"V=1003 {strategy or ''}".strip(),
                           lambda h, w: linear_cross_entropy(h, w, target, **options),
                           lambda h, w: linear_cross_entropy_ref(h, w, target), [hidden, weight], device, dtype)
    module = LinearCrossEntropyLoss()
    return checks + _compare("LinearCrossEntropyLoss", lambda h, w: module(h, w, target),
                             lambda h, w: linear_cross_entropy_ref(h, w, target), [hidden, weight], device, dtype)


def _smoke_lora(device, dtype):
    from ember.kernels import dequantize_nf4, lora_linear, quantize_nf4
    from ember.kernels.lora import lora_linear_ref

    x, weight, a, b = _randn(77, 96), _randn(80, 96, scale=96 ** -0.5), _randn(8, 96, scale=0.1), _randn(80, 8)
    checks = _compare("dense base", lambda x, w, a, b: lora_linear(x, w, a, b, scaling=2.0),
                      lambda x, w, a, b: lora_linear_ref(x, w, a, b, scaling=2.0), [x, weight, a, b], device, dtype,
                      trainable=[True, False, True, True])
    nf4 = quantize_nf4(weight.to(device, dtype))
    dense = dequantize_nf4(nf4).float().cpu()  # the NF4 base's own values are the reference's weight
    # 77 rows read the NF4 base in registers; 300 (from lora.NF4_DEQUANTIZE_ONCE_ROWS = 256) dequantize it once.
    for rows in (77, 300):
        checks += _compare(f"NF4 base, {rows} rows", lambda x, w, a, b: lora_linear(x, nf4, a, b, scaling=2.0),
                           lambda x, w, a, b: lora_linear_ref(x, w, a, b, scaling=2.0),
                           [_randn(rows, 96), dense, a, b], device, dtype, trainable=[True, False, True, True])
    return checks


def _smoke_nf4(device, dtype):
    import torch

    from ember.kernels import dequantize_nf4, quantize_nf4
    from ember.kernels.nf4 import NF4_CODE

    weight = _randn(80, 96).to(device, dtype)
    quantized = quantize_nf4(weight, blocksize=64, double_quant=False)
    codes = torch.stack([quantized.packed >> 4, quantized.packed & 0xF], dim=-1).flatten()[:weight.numel()].long()
    scales = quantized.absmax.double().repeat_interleave(64)[:weight.numel()]
    exact = (NF4_CODE.double().to(codes.device)[codes] * scales).view(weight.shape)
    checks = [_within_tolerance("dequantize", dequantize_nf4(quantized), exact, exact.to(dtype), dtype)]
    # Each value goes to its nearest code: at most half the widest gap between codes, times its block's absmax.
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2
    error = ((exact - weight.double()).abs().flatten() / scales).max().item()
    checks.append(dict(what="quantize to the nearest code", ok=error <= half_gap + 1e-3, error=error, atol=half_gap))
    return checks


def _smoke_adamw8bit(device, dtype):
    from ember.kernels import adamw8bit_init_state, adamw8bit_step
    from ember.kernels.adamw8bit import adamw8bit_step_ref

    params = [_randn(300).to(device, dtype), _randn(17, 256).to(device, dtype)]
    grads = [_randn(*p.shape).to(device, dtype) for p in params]
    states = [adamw8bit_init_state(p) for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    adamw8bit_step(params, grads, states, **hyper)  # a first step: the second starts from non-zero moments
    before = [p.clone() for p in params]
    saved = [{key: t.clone() for key, t in s.items()} for s in states]
    adamw8bit_step(params, grads, states, **hyper)
    checks = []
    for i, (p0, g, s0, p) in enumerate(zip(before, grads, saved, params)):
        exact = adamw8bit_step_ref(p0, g, s0, **hyper)[0]
        checks.append(_within_tolerance(f"param[{i}]", p.reshape(-1), exact, exact.to(dtype), dtype))
    return checks


def _smoke_norm(name):
    def smoke(device, dtype):
        import importlib

        norms = importlib.import_module("ember.kernels.norms")
        fn, ref = getattr(norms, name), getattr(norms, name + "_ref")
        x, weight, bias = _randn(77, 160), 1 + _randn(160, scale=0.1), _randn(160, scale=0.1)
        if name == "rms_norm":
            return _compare("(77, 160)", fn, ref, [x, weight], device, dtype)
        return _compare("(77, 160)", fn, ref, [x, weight, bias], device, dtype)
    return smoke


def _smoke_rotary(device, dtype):
    from ember.kernels import apply_rotary
    from ember.kernels.rotary import apply_rotary_ref

    position = _randn(2, 77, 32).abs() * 10  # (B, S, D): transformers' cos / sin layout
    cos, sin = position.cos(), position.sin()
    return _compare("(2, 4, 77, 32)", lambda q, k, c, s: apply_rotary(q, k, c, s),
                    lambda q, k, c, s: apply_rotary_ref(q, k, c, s),
                    [_randn(2, 4, 77, 32), _randn(2, 2, 77, 32), cos, sin], device, dtype,
                    trainable=[True, True, False, False])


def _smoke_gated(name):
    def smoke(device, dtype):
        import importlib

        gated = importlib.import_module("ember.kernels.gated")
        return _compare("(77, 300)", getattr(gated, name), getattr(gated, name + "_ref"),
                        [_randn(77, 300, scale=2.0), _randn(77, 300)], device, dtype)
    return smoke


# (case, the public names it covers, the check). Every name in ember.kernels.__all__ must be covered.
SMOKE = [
    ("flash_attention", ("flash_attention",), _smoke_attention),
    ("flash_attention_varlen", ("flash_attention_varlen",), _smoke_attention_varlen),
    ("cross_entropy", ("cross_entropy",), _smoke_cross_entropy),
    ("linear_cross_entropy", ("linear_cross_entropy", "LinearCrossEntropyLoss"), _smoke_linear_cross_entropy),
    ("lora_linear", ("lora_linear",), _smoke_lora),
    ("nf4", ("quantize_nf4", "dequantize_nf4", "NF4Weight"), _smoke_nf4),
    ("adamw8bit", ("adamw8bit_step", "adamw8bit_init_state"), _smoke_adamw8bit),
    ("rms_norm", ("rms_norm",), _smoke_norm("rms_norm")),
    ("layer_norm", ("layer_norm",), _smoke_norm("layer_norm")),
    ("apply_rotary", ("apply_rotary",), _smoke_rotary),
    ("swiglu", ("swiglu",), _smoke_gated("swiglu")),
    ("geglu", ("geglu",), _smoke_gated("geglu")),
]


def smoke_cases() -> tuple[list[str], list[str]]:
    """(the cases whose kernels ember.kernels exports, the exported names no case covers)."""
    import ember.kernels

    exported = set(ember.kernels.__all__)
    cases = [case for case, names, _ in SMOKE if exported & set(names)]
    covered = {name for _, names, _ in SMOKE for name in names}
    return cases, sorted(exported - covered)


def run_smoke_case(case: str, device: str, dtypes: list[str]) -> list[dict]:
    """Rows of one case: per dtype, ok / failed (with the failing checks) / error (with the exception)."""
    import torch

    check = {name: fn for name, _, fn in SMOKE}[case]
    rows = []
    for dtype_name in dtypes:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            checks = check(torch.device(device), getattr(torch, dtype_name))
            if device == "cuda":
                torch.cuda.synchronize()
            failed = [c for c in checks if not c["ok"]]
            row = dict(status="failed" if failed else "ok", checks=checks,
                       message="; ".join(f"{c['what']}: " + (c.get("message") or
                                         f"error {c['error']:.3g} > 2 x stock {c.get('stock_error', 0):.3g} "
                                         f"+ atol {c['atol']:.3g}") for c in failed))
        except Exception as error:  # noqa: BLE001  (a kernel that raises is a result)
            row = dict(status="error", message=f"{type(error).__name__}: {error}"[:500])
        rows.append(dict(kernel=case, dtype=dtype_name, seconds=round(time.perf_counter() - start, 3), **row))
    return rows


# ----------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------


def _child(spec: dict) -> int:
    """Entry of a child process: write its results as JSON lines to spec["out"], one line per result."""
    with open(spec["out"], "a") as out:
        def emit(row: dict) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()  # what is written survives a crash later in the process

        if spec["kind"] == "smoke":
            for case in spec["cases"]:
                for row in run_smoke_case(case, spec["device"], spec["dtypes"]):
                    emit(row)
            return 0
        import torch

        from . import harness

        device = torch.device(spec["device"])
        if spec.get("env"):
            emit(dict(env=harness.environment(device), ceilings=harness.ceilings(device)))
        for suite, provider, sizes in spec["jobs"]:
            for params in sizes:
                # On a CPU the dry run's few small cases are measured here: a fresh process per case costs more
                # than the case (the forkserver imports transformers and PEFT).
                row = harness.run_case(suite, provider, params, device, fresh_process=device.type == "cuda")
                emit(row)
                if device.type == "cuda" and row["status"] == "error" and _STICKY_CUDA_ERROR.search(row["message"]):
                    return 3  # this process's CUDA context is gone: the parent starts a fresh one
    return 0


def _spawn(spec: dict, timeout: float, env: dict) -> tuple[list[dict], str | None]:
    """Run a child on ``spec``; (its result lines, None) or (the lines it wrote, why it stopped early)."""
    out = Path(spec["out"])
    out.unlink(missing_ok=True)
    command = [*_python(), "-m", "ember.bench.acceptance", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
        problem = None if done.returncode == 0 else (
            "a CUDA error left the process unusable" if done.returncode == 3 else
            f"the process exited with status {done.returncode}: {_last_line(done.stderr)}")
    except subprocess.TimeoutExpired:
        problem = f"timed out after {timeout:.0f} s (the budget left it)"
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    out.unlink(missing_ok=True)
    return rows, problem


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _python() -> list[str]:
    """The interpreter for child processes and pytest: with -P (3.11+), so that started from the repository root
    the top-level kernels/ folder is not importable as ``kernels``, which transformers and bitsandbytes import."""
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def _child_env(device: str) -> dict:
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "0"  # the CPU user's path is the PyTorch one; the interpreter is CI's tier
    return env


# ----------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------


def _timeout(end: float, items_left: int, reserve: float) -> float:
    """Seconds the next of ``items_left`` processes may take before ``end``, keeping ``reserve`` for each other
    one; 0 when not even its own reserve is left."""
    left = end - time.monotonic() - reserve * (items_left - 1)
    return left if left >= reserve else 0.0


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def step_smoke(device: str, out_dir: Path, budget: float, progress) -> dict:
    cases, uncovered = smoke_cases()
    dtypes = ["float16", "bfloat16"] if device == "cuda" else ["float32"]
    env, end, rows = _child_env(device), time.monotonic() + budget, []
    # On CUDA a process per kernel (a sticky error stays in it); on a CPU one process for all (nothing is sticky).
    groups = [[case] for case in cases] if device == "cuda" else [cases]
    for index, group in enumerate(groups):
        timeout = _timeout(end, len(groups) - index, RESERVE_S["smoke"])
        spec = dict(kind="smoke", cases=group, device=device, dtypes=dtypes, out=str(out_dir / ".smoke.jsonl"))
        got, problem = _spawn(spec, timeout, env) if timeout else ([], "not run: the smoke's budget was spent")
        rows += got
        done = {(r["kernel"], r["dtype"]) for r in got}
        rows += [dict(kernel=case, dtype=dtype, status="error", message=problem) for case in group for dtype in dtypes
                 if (case, dtype) not in done]
        for row in rows[-len(group) * len(dtypes):]:
            progress(f"smoke  {row['kernel']:24s} {row['dtype']:9s} {row['status']}"
                     + (f": {row['message']}" if row["status"] != "ok" else ""))
    rows += [dict(kernel=name, dtype="-", status="missing", message="no smoke case: add one to ember.bench.acceptance")
             for name in uncovered]
    (out_dir / "smoke.json").write_text(json.dumps(rows, indent=1))
    return dict(rows=rows, passed=sum(r["status"] == "ok" for r in rows), total=len(rows))


def _gpu_test_files(root: Path, timeout: float, env: dict) -> tuple[list[str], str | None]:
    """The test files with tests marked gpu (``pytest -m gpu --collect-only``)."""
    command = [*_python(), "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [], f"collecting the GPU tests timed out after {timeout:.0f} s"
    files = list(dict.fromkeys(line.split("::")[0] for line in done.stdout.splitlines() if "::" in line))
    if done.returncode not in (0, 5):  # 5: nothing collected
        return files, f"collecting the GPU tests failed: {_last_line(done.stdout + done.stderr)}"
    return files, None


def _junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}"
                              for s in suites for case in s.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def step_tests(out_dir: Path, budget: float, progress) -> dict:
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests").is_dir():
        return dict(status="skipped", message=f"no tests/ folder beside ember's sources ({root}): "
                                              "run from a clone of the repository")
    env, end = dict(os.environ), time.monotonic() + budget
    files, problem = _gpu_test_files(root, budget / 4, env)
    results = []
    if problem:
        results.append(dict(file="(collection)", status="error", message=problem))
    (out_dir / "tests").mkdir(exist_ok=True)
    for index, file in enumerate(files):
        timeout = _timeout(end, len(files) - index, RESERVE_S["tests"])
        junit = out_dir / "tests" / (Path(file).stem + ".xml")
        command = [*_python(), "-m", "pytest", "-m", "gpu", file, "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]
        start = time.monotonic()
        if not timeout:
            results.append(dict(file=file, status="not run", message="the test tier's budget was spent"))
            continue
        try:
            done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
            row = dict(file=file, status="ok" if done.returncode == 0 else "failed", summary=_last_line(done.stdout))
            if junit.exists():
                row.update(_junit_counts(junit))
        except subprocess.TimeoutExpired:
            row = dict(file=file, status="timeout", message=f"timed out after {timeout:.0f} s (the budget left it)")
        row["seconds"] = round(time.monotonic() - start, 1)
        results.append(row)
        progress(f"tests  {file:44s} {row['status']}: {row.get('summary') or row.get('message')}")
    (out_dir / "tests.json").write_text(json.dumps(results, indent=1))
    totals = {key: sum(r.get(key, 0) for r in results) for key in ("tests", "failures", "errors", "skipped")}
    status = "ok" if results and all(r["status"] == "ok" for r in results) else "failed"
    return dict(status=status, files=results, **totals)


def bench_jobs(device: str) -> list[tuple[str, str, list[dict]]]:
    """(suite, provider, sizes) to run: --quick's sizes and providers on CUDA; the dry run's few on a CPU."""
    import torch

    from .suites import SUITES

    if device != "cuda":
        return [(suite, provider, [params])
                for suite, (providers, params) in DRY_RUN_CASES.items() for provider in providers]
    return [(suite, provider, SUITES[suite].sizes(True, torch.device("cuda"))) for suite in SUITES
            for provider in SUITES[suite].providers if provider not in LEFT_OUT]


def step_bench(device: str, out_dir: Path, budget: float, progress, jobs: list | None = None) -> dict:
    """The benchmark record of ``jobs`` (default: ``bench_jobs(device)``), also written as bench.json."""
    import torch

    from .suites import SUITES

    env, end = _child_env(device), time.monotonic() + budget
    scratch = str(out_dir / ".bench.jsonl")
    record = dict(env=None, quick=True, ceilings={}, acceptance=True, results=[])
    if device == "cuda" and jobs != []:  # the environment and the card's ceilings, once, in a process of their own
        got, problem = _spawn(dict(kind="bench", env=True, jobs=[], device=device, out=scratch),
                              min(120.0, budget / 4), env)
        if not got:
            raise RuntimeError(f"could not read the environment: {problem}")
        record.update(env=got[0]["env"], ceilings=got[0]["ceilings"])
    jobs = bench_jobs(device) if jobs is None else jobs
    runnable = []
    for suite, provider, sizes in jobs:
        reason = SUITES[suite].unavailable(provider, torch.device(device))
        if reason is not None:  # a missing peer: skip rows, no process
            record["results"] += [dict(suite=suite, provider=provider, params=p, status="skipped", message=reason)
                                  for p in sizes]
        else:
            runnable.append((suite, provider, sizes))
    # On CUDA a process per (suite, provider); on a CPU one process runs the dry run's few cases.
    groups = [[job] for job in runnable] if device == "cuda" else [runnable]
    for index, group in enumerate(groups):
        pending = [(suite, provider, list(sizes)) for suite, provider, sizes in group]
        while pending:
            timeout = _timeout(end, len(groups) - index, RESERVE_S["bench"])
            if not timeout:
                for suite, provider, sizes in pending:
                    record["results"] += [dict(suite=suite, provider=provider, params=p, status="error",
                                               message="not run: the benchmarks' budget was spent") for p in sizes]
                break
            spec = dict(kind="bench", env=record["env"] is None, device=device, jobs=pending, out=scratch)
            rows, problem = _spawn(spec, timeout, env)
            if spec["env"] and rows and "env" in rows[0]:
                record.update(env=rows[0]["env"], ceilings=rows[0]["ceilings"])
                rows = rows[1:]
            record["results"] += rows
            for row in rows:
                progress(f"bench  {row['suite']:14s} {row['provider']:20s} {_size(row['params']):56s} {_headline(row)}")
            pending = _after(pending, len(rows))
            if pending and not problem:
                problem = "the process ended without a result for this case"
            if pending:  # the case it stopped in is an error row; a fresh process takes the rest
                suite, provider, sizes = pending[0]
                if not rows or problem != "a CUDA error left the process unusable":  # else its error row is in
                    record["results"].append(dict(suite=suite, provider=provider, params=sizes[0], status="error",
                                                  message=problem))
                    progress(f"bench  {suite:14s} {provider:20s} {_size(sizes[0]):56s} error: {problem}")
                    pending = _after(pending, 1)
    if record["env"] is None:  # no process ran (every peer missing): the parent describes the machine
        from .harness import environment

        record["env"] = environment(torch.device(device))
    path = out_dir / "bench.json"
    path.write_text(json.dumps(record, indent=1))
    return record


def _after(pending: list, done: int) -> list:
    """``pending`` without its first ``done`` cases, in order."""
    rest = []
    for suite, provider, sizes in pending:
        skip = min(done, len(sizes))
        done -= skip
        if sizes[skip:]:
            rest.append((suite, provider, sizes[skip:]))
    return rest


def _size(params: dict) -> str:
    from .report import describe_size

    return describe_size(params)


def _headline(row: dict) -> str:
    from .harness import _headline as headline

    return headline(row)


# ----------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------


def ratios(run: dict, key: str | None = None) -> list[dict]:
    """Per suite and peer: ember's ``key`` over the peer's (default: the headline, time on a GPU and peak extra
    memory on a CPU), geometric mean, min and max over the sizes where both ran."""
    from .report import EMBER, NEGLIGIBLE_MB, describe_size

    key = key or ("time_ms" if run["env"]["device"] == "cuda" else "peak_extra_rss_mb")
    out = []
    for suite in dict.fromkeys(row["suite"] for row in run["results"]):
        rows = [row for row in run["results"] if row["suite"] == suite]
        ours_name = EMBER.get(suite, "ember")
        ours = {describe_size(r["params"]): r.get(key) for r in rows
                if r["provider"] == ours_name and r["status"] == "ok"}
        for peer in dict.fromkeys(r["provider"] for r in rows if r["provider"] != ours_name):
            peer_rows = [r for r in rows if r["provider"] == peer]
            pairs = [(ours[describe_size(r["params"])], r[key]) for r in peer_rows if r["status"] == "ok"
                     and ours.get(describe_size(r["params"])) is not None and r.get(key) is not None]
            message = next((r.get("message") for r in peer_rows if r["status"] != "ok"), None)
            if key.endswith("_mb"):  # memory under a page or two is noise: no ratio against it (see report.py)
                measurable = [(a, b) for a, b in pairs if a >= NEGLIGIBLE_MB and b >= NEGLIGIBLE_MB]
                if len(measurable) < len(pairs):
                    message = message or f"~0 MiB at {len(pairs) - len(measurable)} size(s): no ratio against noise"
                pairs = measurable
            label = PEERS.get((suite, peer)) or PEERS.get(peer, peer)
            entry = dict(suite=suite, ours=ours_name, peer=peer, label=label, sizes=len(pairs),
                         statuses=sorted({r["status"] for r in peer_rows}), message=message)
            if pairs:
                logs = [math.log(a / b) for a, b in pairs]
                entry.update(geomean=math.exp(sum(logs) / len(logs)), low=math.exp(min(logs)), high=math.exp(max(logs)))
            out.append(entry)
    return out


def summary_text(record: dict) -> str:
    env = record["env"]
    device = env["device"]
    lines = [f"# ember acceptance: {env.get('gpu') or env.get('cpu')} ({device}), ember "
             f"{str(env.get('ember_git_sha'))[:10]}, torch {env['versions'].get('torch')}, "
             f"triton {env['versions'].get('triton')}, {record['seconds']:.0f} s", ""]
    if device != "cuda":
        lines += [f"**{record['why_cpu']}**: a CPU dry run. The GPU test tier did not run; the smoke ran on the "
                  "PyTorch path in fp32; the benchmarks ran one small size per suite and measure memory, not speed.",
                  ""]
    smoke = record["smoke"]
    lines.append(f"Smoke: {smoke['status']}." if "status" in smoke else
                 f"Smoke: {smoke['passed']} of {smoke['total']} kernel x dtype checks pass.")
    lines += [f"- {r['kernel']} ({r['dtype']}): {r['status']}: {r['message']}" for r in smoke["rows"]
              if r["status"] != "ok"]
    tests = record["tests"]
    if tests.get("files") is not None:
        lines.append(f"GPU test tier: {tests['tests']} tests in {len(tests['files'])} files: "
                     f"{tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped.")
        lines += [f"- {r['file']}: {r['status']}: {r.get('message') or ', '.join(r.get('failed_tests', [])[:5])}"
                  for r in tests["files"] if r["status"] != "ok"]
    else:
        lines.append(f"GPU test tier: {tests['status']}: {tests['message']}")
    results = record["bench"]["results"]
    counts = {status: sum(r["status"] == status for r in results) for status in ("ok", "skipped", "oom", "error")}
    lines.append(f"Benchmarks: {len(results)} cases: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    metrics = ([("time_ms", "time", "faster"), ("peak_allocated_mb", "peak allocated memory", "leaner")]
               if device == "cuda" else [("peak_extra_rss_mb", "peak extra memory", "leaner")])
    for key, unit, better in metrics:
        lines += ["", f"ember / peer, {unit} (geometric mean over the sizes where both ran; below 1.00x ember is "
                      f"{better})" + (":" if device == "cuda" else "; the dry run's sizes are tiny, its ratios show "
                                      "that the machinery works, not how ember compares:"), "",
                  "| suite | ember | peer | sizes | geomean | range |", "|---|---|---|---|---|---|"]
        for entry in ratios(record["bench"], key):
            if "geomean" in entry:
                cells = [f"{entry['geomean']:.2f}x", f"{entry['low']:.2f}x - {entry['high']:.2f}x"]
            else:
                cells = ["-", (entry["message"] or "no size where both ran")[:80]]
            lines.append(f"| {entry['suite']} | {entry['ours']} | {entry['label']} | {entry['sizes']} | "
                         + " | ".join(cells) + " |")
    lines += ["", "Files: " + ", ".join(record["files"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------


STEPS = ("smoke", "tests", "bench")


def run(out_dir: Path, *, dry_run: bool = False, budget_s: float = 600.0, skip: tuple[str, ...] = (),
        progress=print) -> dict:
    """The whole acceptance run into ``out_dir`` (less the ``skip``ped steps); returns its record (also written as
    acceptance.json)."""
    import torch

    from . import report

    start = time.monotonic()
    budget = Budget(budget_s)
    cuda = torch.cuda.is_available() and not dry_run
    device = "cuda" if cuda else "cpu"
    why_cpu = None
    if not cuda:
        why_cpu = "--dry-run asked for" if dry_run else "CUDA is not available"
        progress(f"{why_cpu}: running the CPU dry run (smoke on the PyTorch path, a few benchmark cases, no GPU tests)")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(device=device, why_cpu=why_cpu, budget_s=budget_s,
                  time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    asked_off = "skipped (--skip)"
    record["smoke"] = (step_smoke(device, out_dir, budget_s * SMOKE_SHARE, progress) if "smoke" not in skip
                       else dict(rows=[], passed=0, total=0, status=asked_off))
    if "tests" in skip:
        record["tests"] = dict(status="skipped", message=asked_off)
    elif cuda:
        record["tests"] = step_tests(out_dir, min(budget_s * TESTS_SHARE, budget.left()), progress)
    else:
        record["tests"] = dict(status="skipped", message="no CUDA device: the GPU tier needs one (CI runs the CPU "
                                                         "tiers: pytest)")
    bench = step_bench(device, out_dir, budget.left(), progress, jobs=[] if "bench" in skip else None)
    record.update(env=bench["env"], bench=bench)
    (out_dir / "report.md").write_text(report.tables(bench))
    try:
        plots = [p.name for p in report.plots(bench, out_dir)]
    except ImportError:
        plots = []
        progress("plots: matplotlib is not installed (pip install -e '.[bench]')")
    record["seconds"] = time.monotonic() - start
    record["files"] = sorted(["acceptance.json", "summary.md", "report.md", "bench.json", *plots]
                             + (["smoke.json"] if "smoke" not in skip else [])
                             + (["tests.json", "tests/"] if cuda and "tests" not in skip else []))
    text = summary_text(record)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "acceptance.json").write_text(json.dumps({k: v for k, v in record.items() if k != "bench"}, indent=1,
                                                        default=str))
    progress("\n" + text)
    return record


def passed(record: dict) -> bool:
    """Every smoke check passes, no GPU test fails, and no case of ember's own errs (a peer's error is its own)."""
    from .report import EMBER

    ours = {"ember", *EMBER.values()}
    bench_ok = all(r["status"] != "error" for r in record["bench"]["results"] if r["provider"] in ours)
    tests_ok = record["tests"]["status"] in ("ok", "skipped")
    return record["smoke"]["passed"] == record["smoke"]["total"] and tests_ok and bench_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.bench.acceptance", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="acceptance-results", help="the folder for every file (default: "
                                                                    "acceptance-results)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run even where CUDA is available")
    parser.add_argument("--budget-s", type=float, default=600.0, help="time budget in seconds (default: 600)")
    parser.add_argument("--skip", default="", help=f"steps to leave out, comma-separated: {', '.join(STEPS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child))
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    skip = tuple(step for step in args.skip.split(",") if step)
    if set(skip) - set(STEPS):
        parser.error(f"--skip: unknown step(s) {', '.join(sorted(set(skip) - set(STEPS)))}; steps: {', '.join(STEPS)}")
    record = run(Path(args.out), dry_run=args.dry_run, budget_s=args.budget_s, skip=skip)
    return 0 if passed(record) else 1


if __name__ == "__main__":
    raise SystemExit(main())
