"""The `ember` command line. It only puts library pieces together.

    ember train [CONFIG.toml] [--key=value ...]   fine-tune (no arguments: the default job)
    ember eval  [CONFIG.toml] [--key=value ...]   held-out metrics of the run's latest checkpoint
    ember bench [SUITE ...] [--quick] [--out DIR] benchmarks against stock PyTorch and peers (JSON)
    ember bench report RUN.json [BASELINE.json]   markdown tables and PNG plots of a run
    ember demo [--tokens N] [--hidden H] [--vocab V] [--dtype bf16|fp16|fp32] [--device cpu|cuda]

`train` runs ``ember.engine.train.train`` on the config from
``ember.engine.config.load_config``; its default job fine-tunes
all-MiniLM-L6-v2 with LoRA on Rotten Tomatoes critic snippets, offline, in a
few minutes on a CPU. Configuration problems and a run that cannot go on end
with a one-line error and exit status 2 (1 for a failed run); Ctrl-C saves a
checkpoint and exits with 130.

`demo`: one LM-head loss,
forward and backward, through ember's fused linear cross-entropy and through
stock PyTorch (logits, then cross-entropy), on random hidden states at a real
model's shape (SmolLM2-135M by default). It prints both losses, the largest
gradient difference, and the largest tensor each one created: the logits
that ember never builds.
"""

from __future__ import annotations

import argparse
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from ember.bench.memory import TensorSizeTracker
    from ember.kernels import linear_cross_entropy
    from ember.kernels.backend import backend_for

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden**0.5).to(device, dtype)
    target = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    target[: args.tokens // 4] = -100  # a masked prompt, as in supervised fine-tuning

    def run(loss_fn):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with TensorSizeTracker(ignore_shapes=[weight.shape, weight.shape[::-1]]) as tracker:
            loss = loss_fn(h, w)
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach().float(), h.grad, w.grad, time.perf_counter() - start, tracker

    ember = run(lambda h, w: linear_cross_entropy(h, w, target))
    stock = run(lambda h, w: F.cross_entropy((h @ w.T).float(), target))

    logits_mib = args.tokens * args.vocab * 4 / 2**20
    timing_note = "" if device.type == "cuda" else " (CPU wall time, not GPU performance)"
    print(f"linear cross-entropy, {args.tokens} tokens x H {args.hidden} x V {args.vocab}, {args.dtype} "
          f"on {device} [ember backend: {backend_for(hidden)}]")
    print(f"  fp32 logits would take {logits_mib:,.0f} MiB; largest tensor below leaves out the (V, H) weight "
          f"gradient, which both create")
    for name, (loss, _, _, seconds, tracker) in (("ember", ember), ("stock PyTorch", stock)):
        print(f"  {name:14s} loss {loss.item():.5f}  largest tensor {tracker.largest_bytes / 2**20:8,.1f} MiB "
              f"{tracker.largest_shape}  time {seconds:.2f} s{timing_note}")
    for name, ours, theirs in (("d_hidden", ember[1], stock[1]), ("d_weight", ember[2], stock[2])):
        difference = (ours.float() - theirs.float()).abs().max().item()
        print(f"  max |{name} ember - stock| = {difference:.2e}")
    agree = abs(ember[0].item() - stock[0].item()) <= 1e-2 * max(1.0, abs(stock[0].item()))
    print("  losses agree" if agree else "  LOSSES DISAGREE")
    return 0 if agree else 1


def _train(args: argparse.Namespace) -> int:
    from ember.engine.config import load_config
    from ember.engine.train import train

    result = train(load_config(args.config, args.overrides))
    print(f"held-out after {result.steps} steps: "
          + ", ".join(f"{key} {value:.4f}" for key, value in result.eval_after.items()))
    if result.report is not None:
        print(result.report.format())
    print(f"training time {result.seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MiB, "
          f"outputs in {result.out_dir}")
    if result.stopped == "interrupted":
        print("interrupted: the latest checkpoint is complete; continue with --resume=true", file=sys.stderr)
        return 130
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ember.engine.config import load_config
    from ember.engine.train import evaluate_checkpoint

    metrics, report = evaluate_checkpoint(load_config(args.config, args.overrides))
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    if report is not None:
        print(report.format())
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ember.bench import harness, report
    from ember.bench.suites import SUITES

    if args.suites and args.suites[0] == "report":
        if len(args.suites) not in (2, 3):
            print("ember: error: usage: ember bench report RUN.json [BASELINE.json]", file=sys.stderr)
            return 2
        missing = [name for name in args.suites[1:] if not Path(name).is_file()]
        if missing:
            print(f"ember: error: {missing[0]!r} does not exist", file=sys.stderr)
            return 2
        run = report.load(args.suites[1])
        baseline = report.load(args.suites[2]) if len(args.suites) == 3 else None
        print(report.tables(run, baseline), end="")
        try:
            written = report.plots(run, Path(args.out))
            print(f"\nplots: {', '.join(str(p) for p in written)}")
        except ImportError:
            print("\nplots: matplotlib is not installed (pip install -e '.[bench]')")
        return 0
    suites = args.suites or list(SUITES)
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        print(f"ember: error: unknown suite {unknown[0]!r}; suites: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    providers = [name for name in args.providers.split(",") if name] if args.providers else None
    try:
        path = harness.run(suites, quick=args.quick, out_dir=Path(args.out), device=device, providers=providers)
    except ValueError as error:  # an unknown provider
        print(f"ember: error: {error}", file=sys.stderr)
        return 2
    print(f"results: {path}\nreport:  ember bench report {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Triton kernels and a lean fine-tuning engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="fused linear cross-entropy against stock PyTorch at a real LM-head shape")
    demo.add_argument("--tokens", type=int, default=2048, help="rows of hidden states (default: 2048)")
    demo.add_argument("--hidden", type=int, default=576, help="hidden size H (default: 576, SmolLM2-135M)")
    demo.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (default: 49152, SmolLM2)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    demo.set_defaults(handler=_demo)
    bench = commands.add_parser("bench", help="benchmarks against stock PyTorch and peers; 'report' prints tables")
    bench.add_argument("suites", nargs="*", help="attention, cross_entropy, lora, optimizer, train_step "
                                                 "(default: all); or: report RUN.json [BASELINE.json]")
    bench.add_argument("--quick", action="store_true", help="small sizes (a few minutes on a CPU)")
    bench.add_argument("--providers", default=None,
                       help="comma-separated providers to run, e.g. ember,sdpa_flash (default: all)")
    bench.add_argument("--out", default="bench-results", help="folder for the JSON run (or the report's plots)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    bench.set_defaults(handler=_bench)
    for name, handler, text in (("train", _train, "fine-tune a model (no arguments: the default job)"),
                                ("eval", _eval, "evaluate the latest checkpoint of a run")):
        command = commands.add_parser(name, help=text, description=text + ". Keys: see ember.engine.config.")
        command.add_argument("config", nargs="?", default=None, help="a TOML file of config keys")
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides = unknown
    if unknown and args.command not in ("train", "eval"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("tokens", "hidden", "vocab"):
        if getattr(args, name, 1) < 1:
            print(f"ember: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("ember: error: --device cuda given but no CUDA device is available", file=sys.stderr)
            return 2
    from ember.engine.config import ConfigError, TrainingError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"ember: the run stopped: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
