"""The `ember` command line. It only puts library pieces together, and nothing imports it.

    ember train [CONFIG.toml|.yaml] [--key=value | --key value ...]   fine-tune (no arguments: the default job)
    torchrun --nproc_per_node=N $(which ember) train ...       the same on N processes (DDP or FSDP2)
    ember eval  [CONFIG.toml|.yaml] [--key=value | --key value ...]   held-out metrics of the latest checkpoint
    ember bench [run] [SUITE ...] [--quick] [--providers P,Q] [--out DIR] [--device cpu|cuda]
                                                  benchmarks against stock PyTorch and peers (JSON)
    ember bench report RUN.json [BASELINE.json] [--out DIR]   markdown tables and PNG plots of a run
    ember demo [--tokens N] [--hidden H] [--vocab V] [--dtype bf16|fp16|fp32] [--device cpu|cuda]

It sits at the top of the layers: kernels <- engine <- bench <- this module.
`train` runs ``ember.engine.train.train`` on the config from
``ember.engine.config.load_config``; its default job fine-tunes
all-MiniLM-L6-v2 with LoRA on Rotten Tomatoes critic snippets, offline, in a
few minutes on a CPU. `demo` is ``ember.bench.demo``. Configuration problems
end with a one-line error and exit status 2, a run that cannot go on with
status 1; Ctrl-C saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import warnings
from pathlib import Path

from ember.bench import harness, report
from ember.bench.demo import DTYPES, run_demo
from ember.bench.suites import SUITES
from ember.engine import distributed
from ember.engine.config import describe_keys, load_command_line
from ember.engine.device import resolve_device
from ember.engine.errors import ConfigError, TrainingError
from ember.engine.train import evaluate_checkpoint, train

EXIT_CONFIG_ERROR, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _train(args: argparse.Namespace) -> int:
    result = train(load_command_line(args.overrides))
    if not distributed.current().main:  # rank 0 reports for every process
        return EXIT_INTERRUPTED if result.stopped == "interrupted" else 0
    print(f"held-out after {result.steps} steps: "
          + ", ".join(f"{key} {value:.4f}" for key, value in result.eval_after.items()))
    if result.report is not None:
        print(result.report.format())
    print(f"training time {result.seconds:.1f} s, peak memory {result.peak_memory_mb:,.0f} MiB, "
          f"outputs in {result.out_dir}")
    if result.stopped == "interrupted":
        print("interrupted: the latest checkpoint is complete; continue with --resume=true", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _eval(args: argparse.Namespace) -> int:
    metrics, classification = evaluate_checkpoint(load_command_line(args.overrides))
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    if classification is not None:
        print(classification.format())
    return 0


def _bench_run(args: argparse.Namespace) -> int:
    providers = [name for name in args.providers.split(",") if name] if args.providers else None
    path = harness.run(args.suites or list(SUITES), quick=args.quick, out_dir=Path(args.out),
                       device=resolve_device(args.device), providers=providers)
    print(f"results: {path}\nreport:  ember bench report {path}")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    run = report.load(args.run)
    baseline = report.load(args.baseline) if args.baseline else None
    print(report.tables(run, baseline), end="")
    try:
        written = report.plots(run, Path(args.out))
        print(f"\nplots: {', '.join(str(p) for p in written)}")
    except ImportError:
        print("\nplots: matplotlib is not installed (pip install -e '.[bench]')")
    return 0


def _demo(args: argparse.Namespace) -> int:
    for name in ("tokens", "hidden", "vocab"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    return 0 if run_demo(args.tokens, args.hidden, args.vocab, args.dtype, resolve_device(args.device)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Triton kernels and a lean fine-tuning engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    width = max(60, shutil.get_terminal_size().columns - 2)  # as argparse wraps its own help
    for name, handler, text in (("train", _train, "fine-tune a model (no arguments: the default job)"),
                                ("eval", _eval, "evaluate the latest checkpoint of a run")):
        # The config file and the keys (--key=value, --key value) are read by ember.engine.config: argparse
        # would take the value of '--lr 3e-4' for the config file. The keys' help comes from the config dataclass.
        command = commands.add_parser(
            name, help=text, usage=f"ember {name} [CONFIG.toml|.yaml] [--key=value | --key value ...]",
            description=textwrap.fill(text + ". Every key can be set in the config file (TOML or YAML), as "
                                      "--key=value or as --key value; later sources win: defaults, preset, file, "
                                      "command line. Hugging Face TrainingArguments names are taken for the keys "
                                      "that list them.", width),
            epilog="config keys:\n" + describe_keys(width),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        command.set_defaults(handler=handler, takes_overrides=True)

    bench = commands.add_parser("bench", help="benchmarks against stock PyTorch and peers; 'report' prints tables",
                                description="'ember bench [SUITE ...]' is 'ember bench run [SUITE ...]'.")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    run = bench_commands.add_parser("run", help="run suites and write a JSON file (the default)")
    run.add_argument("suites", nargs="*", metavar="SUITE", help=f"{', '.join(SUITES)} (default: all)")
    run.add_argument("--quick", action="store_true", help="small sizes (a few minutes on a CPU)")
    run.add_argument("--providers", default=None,
                     help="comma-separated providers to run, e.g. ember,sdpa_flash (default: all)")
    run.add_argument("--out", default="bench-results", help="folder for the JSON run (default: bench-results)")
    run.add_argument("--device", choices=["cpu", "cuda"], default="auto", help="default: cuda if available")
    run.set_defaults(handler=_bench_run)
    report_command = bench_commands.add_parser("report", help="markdown tables and PNG plots of a run")
    report_command.add_argument("run", help="a JSON file written by 'ember bench'")
    report_command.add_argument("baseline", nargs="?", default=None, help="an earlier run to compare against")
    report_command.add_argument("--out", default="bench-results", help="folder for the plots (default: bench-results)")
    report_command.set_defaults(handler=_bench_report)

    demo = commands.add_parser("demo", help="fused linear cross-entropy against stock PyTorch at a real LM-head shape")
    demo.add_argument("--tokens", type=int, default=2048, help="rows of hidden states (default: 2048)")
    demo.add_argument("--hidden", type=int, default=576, help="hidden size H (default: 576, SmolLM2-135M)")
    demo.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (default: 49152, SmolLM2)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    demo.add_argument("--device", choices=["cpu", "cuda"], default="auto", help="default: cuda if available")
    demo.set_defaults(handler=_demo)
    return parser


def _with_default_bench_command(argv: list[str]) -> list[str]:
    """'ember bench [SUITE ...]' means 'ember bench run [SUITE ...]', as it always has."""
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in ("run", "report", "-h", "--help")):
        return ["bench", "run", *argv[1:]]
    return argv


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"ember: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a skipped step or checkpoint: one line, not a source listing
    parser = build_parser()
    args, overrides = parser.parse_known_args(_with_default_bench_command(sys.argv[1:] if argv is None else argv))
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except TrainingError as error:
        print(f"ember: the run stopped: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    finally:
        distributed.shutdown()  # the process group `train` joined under torchrun
