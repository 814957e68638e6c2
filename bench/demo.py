"""``ember demo``: one LM-head loss through ember's fused linear cross-entropy and through stock PyTorch.

Forward and backward on random hidden states at a real model's shape
(SmolLM2-135M by default). It prints both losses, the largest gradient
difference, and the largest tensor each one created: the (tokens x vocabulary)
logits that ember never builds.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ember.kernels import linear_cross_entropy
from ember.kernels.backend import backend_for

from .memory import TensorSizeTracker

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_demo(tokens: int, hidden: int, vocab: int, dtype: str, device: torch.device) -> bool:
    """Print the comparison; True when the two losses agree."""
    generator = torch.Generator().manual_seed(0)
    torch_dtype = DTYPES[dtype]
    hidden_states = torch.randn(tokens, hidden, generator=generator).to(device, torch_dtype)
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(device, torch_dtype)
    target = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    target[: tokens // 4] = -100  # a masked prompt, as in supervised fine-tuning

    def measure(loss_fn):
        h = hidden_states.clone().requires_grad_()
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

    ember = measure(lambda h, w: linear_cross_entropy(h, w, target))
    stock = measure(lambda h, w: F.cross_entropy((h @ w.T).float(), target))

    logits_mib = tokens * vocab * 4 / 2**20
    timing_note = "" if device.type == "cuda" else " (CPU wall time, not GPU performance)"
    print(f"linear cross-entropy, {tokens} tokens x H {hidden} x V {vocab}, {dtype} "
          f"on {device} [ember backend: {backend_for(hidden_states)}]")
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
    return agree
