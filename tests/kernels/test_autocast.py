"""Every ember kernel under torch.autocast, in both 16-bit dtypes.

Under autocast a kernel must behave as the op it replaces: its matmul inputs
cast to the autocast dtype (in the graph, so fp32 leaves get fp32 gradients),
losses in fp32, and no second cast inside. So each kernel run inside autocast
on fp32 inputs must equal, bit for bit, the same kernel run outside autocast on
inputs cast by hand; the kernels' own tests prove that 16-bit run against
float64. The backward is run both outside and inside the autocast block.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from ember.kernels import (
    cross_entropy,
    flash_attention,
    flash_attention_varlen,
    linear_cross_entropy,
    lora_linear,
    quantize_nf4,
)


def _case(name, device):
    """(fp32 inputs, the names autocast must cast, call(inputs) -> output, output is a loss)."""
    randn = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    target = torch.randint(0, 50, (13,), device=device)
    target[3] = -100
    if name == "linear_cross_entropy":
        inputs = dict(hidden=randn(13, 32), weight=randn(50, 32) / 6, bias=randn(50))
        return inputs, ("hidden", "weight", "bias"), lambda t: linear_cross_entropy(
            t["hidden"], t["weight"], target, bias=t["bias"]), True
    if name == "cross_entropy":
        # Logits are read in their own dtype and reduced in fp32: autocast's fp32 copy is never made.
        return dict(logits=randn(13, 50)), (), lambda t: cross_entropy(t["logits"], target, label_smoothing=0.1), True
    if name == "flash_attention":
        inputs = dict(q=randn(2, 4, 17, 32), k=randn(2, 2, 19, 32), v=randn(2, 2, 19, 32))
        return inputs, ("q", "k", "v"), lambda t: flash_attention(t["q"], t["k"], t["v"], causal=True), False
    if name == "flash_attention_varlen":
        cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
        inputs = dict(q=randn(20, 4, 32), k=randn(20, 2, 32), v=randn(20, 2, 32))
        return inputs, ("q", "k", "v"), lambda t: flash_attention_varlen(
            t["q"], t["k"], t["v"], cu, cu, 13, 13, causal=True), False
    weight = randn(24, 32) / 6
    base = quantize_nf4(weight) if name == "lora_linear_nf4" else weight
    # fp32 adapters stay fp32 under autocast (PEFT's default): only x, the dense base and the bias are cast.
    inputs = dict(x=randn(3, 9, 32), lora_a=randn(4, 32) / 6, lora_b=randn(24, 4), bias=randn(24))
    return inputs, ("x", "bias"), lambda t: lora_linear(
        t["x"], base.to(t["x"].dtype) if isinstance(base, torch.Tensor) else base, t["lora_a"], t["lora_b"],
        scaling=2.0, bias=t["bias"]), False


KERNELS = ["linear_cross_entropy", "cross_entropy", "flash_attention", "flash_attention_varlen", "lora_linear",
           "lora_linear_nf4"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_outside", "backward_inside"])
@pytest.mark.parametrize("name", KERNELS)
def test_autocast_equals_casting_by_hand(device, name, dtype, backward_inside):
    inputs, cast_names, call, is_loss = _case(name, device)
    device_type = "cuda" if device == "cuda" else "cpu"

    # Inside autocast, on fp32 leaves.
    leaves = {key: t.clone().requires_grad_() for key, t in inputs.items()}
    with torch.autocast(device_type, dtype=dtype):
        out = call(leaves)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        if backward_inside:
            out.backward(upstream.to(out.dtype))
    if not backward_inside:
        out.backward(upstream.to(out.dtype))

    # Outside autocast, on the same leaves cast by hand.
    by_hand = {key: t.clone().requires_grad_() for key, t in inputs.items()}
    expected = call({key: t.to(dtype) if key in cast_names else t for key, t in by_hand.items()})
    expected.backward(upstream.to(expected.dtype))

    assert out.dtype == (torch.float32 if is_loss else dtype)
    assert torch.equal(out, expected), f"{name}: output differs from the kernel on inputs cast by hand"
    for key in inputs:
        assert leaves[key].grad.dtype == torch.float32, f"{name}: d{key} is {leaves[key].grad.dtype}"
        assert torch.equal(leaves[key].grad, by_hand[key].grad), f"{name}: d{key} differs"
