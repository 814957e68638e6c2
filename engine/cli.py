"""The `ember` command line. It only puts library pieces together.

    ember demo [--tokens N] [--hidden H] [--vocab V] [--dtype bf16|fp16|fp32] [--device cpu|cuda]

`demo` is the main job until the training loop lands: one LM-head loss,
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("tokens", "hidden", "vocab"):
        if getattr(args, name, 1) < 1:
            print(f"ember: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("ember: error: --device cuda given but no CUDA device is available", file=sys.stderr)
            return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
