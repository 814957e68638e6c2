"""The precision policy: decided once, logged with its reason, and each policy trains on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from ember.engine.optim import AdamW8bit
from ember.engine.precision import POLICIES, decide
from ember.kernels import linear_cross_entropy
from ember.kernels.backend import forced_backend


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_auto_on_cpu_follows_native_bf16_and_is_logged(caplog, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger="ember.precision"):
        precision = decide("auto", "cpu")
    if native:
        assert precision.policy == "bf16" and precision.autocast_dtype == torch.bfloat16
        assert "precision: bf16 (auto: the CPU supports bf16" in caplog.text
    else:
        assert precision.policy == "fp32" and precision.autocast_dtype is None
        assert "precision: fp32 (auto: the CPU has no native bf16" in caplog.text
    assert precision.param_dtype == torch.float32 and not precision.loss_scaling and not precision.stochastic_rounding
    assert decide("bf16", "cpu").policy == "bf16"  # asked for, bf16 runs on any CPU


@pytest.mark.parametrize("policy", POLICIES)
def test_policies(policy):
    precision = decide(policy, "cpu")
    expected = {
        # policy: (param dtype, autocast dtype, loss scaling, stochastic rounding)
        "bf16": (torch.float32, torch.bfloat16, False, False),
        "fp16": (torch.float32, torch.float16, True, False),
        "bf16-pure": (torch.bfloat16, None, False, True),
        "fp32": (torch.float32, None, False, False),
    }[policy]
    assert (precision.param_dtype, precision.autocast_dtype, precision.loss_scaling,
            precision.stochastic_rounding) == expected
    assert precision.reason == "requested (the CPU)"
    assert precision.grad_scaler().is_enabled() == (policy == "fp16")


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_trains_a_causal_lm_head(policy):
    """A tiny LM (embedding -> linear -> ember's fused linear cross-entropy) trains under each policy on the CPU,
    with AdamW8bit taking the policy's loss scaling and stochastic rounding."""
    precision = decide(policy, "cpu")
    torch.manual_seed(0)
    vocab, hidden = 300, 64
    embedding = nn.Embedding(vocab, hidden)
    proj = nn.Linear(hidden, hidden)
    head = nn.Parameter(torch.randn(vocab, hidden) / hidden**0.5)
    modules = [embedding, proj]
    for module in modules:
        module.to(precision.param_dtype)
    head.data = head.data.to(precision.param_dtype)
    params = [p for m in modules for p in m.parameters()] + [head]
    optimizer = AdamW8bit(params, lr=1e-2, stochastic_rounding=precision.stochastic_rounding)
    scaler = precision.grad_scaler()
    tokens = torch.randint(0, vocab, (16, 33))
    losses = []
    with forced_backend("torch"):
        for _ in range(30):
            with precision.autocast():
                hidden_states = torch.tanh(proj(embedding(tokens[:, :-1])))
                loss = linear_cross_entropy(hidden_states.reshape(-1, hidden), head, tokens[:, 1:].reshape(-1))
            assert loss.dtype == torch.float32
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    assert all(p.dtype == precision.param_dtype for p in params)
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_input():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, bf16-pure, fp32; got 'fp8'"):
        decide("fp8", "cpu")
    with pytest.raises(ValueError, match="device: expected one of auto, cpu, cuda"):
        decide("bf16", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            decide("auto", "cuda")
