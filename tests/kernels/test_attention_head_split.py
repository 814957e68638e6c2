"""The attention forward's head dim in two power-of-two pieces (80 = 64 + 16, 96 = 64 + 32, ...).

The forward splits a head dim that is not a power of two into BLOCK_D and a
tail BLOCK_D_TAIL (``_fwd_head_split``): two products for the scores and one
output accumulator per piece, stored as two column ranges. These tests run
split head dims (and padded ones, for the rule's other side) through the
forward and the backward, which still pads, on the forward's output, against
float64 with the tolerance rule: causal/window, key padding, packed sequences,
softcap, dropout, GQA, fp32 and fp16, on the pointer loads and on the TMA loads
forced on in the interpreter. The forward runs a small tile (32 queries x 16
keys) as its only config, so every sequence crosses several key blocks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton

from ember.kernels import attention as attention_module
from ember.kernels import launch as launch_module
from ember.kernels import flash_attention, flash_attention_varlen
from ember.kernels.attention import _fwd_head_split, attention_ref
from ember.kernels.backend import backend_for


@pytest.mark.parametrize("head_dim, pieces", [
    (80, (64, 16)), (96, (64, 32)), (48, (32, 16)),
    # a tail under 16 (a dot's shortest reduction) or not a power of two: padded, one piece
    (72, (128, 0)), (112, (128, 0)), (40, (64, 0)), (24, (32, 0)), (200, (256, 0)),
    # over 128: padded (the d256 specs' tiles are gated for one piece only)
    (160, (256, 0)), (192, (256, 0)), (144, (256, 0)),
    # powers of two: one piece, no padding
    (16, (16, 0)), (64, (64, 0)), (128, (128, 0)), (256, (256, 0)),
])
def test_split_rule(head_dim, pieces):
    assert _fwd_head_split(head_dim) == dict(BLOCK_D=pieces[0], BLOCK_D_TAIL=pieces[1])


@pytest.fixture
def small_tile(monkeypatch, device):
    """The forward specs run a 32x16 tile as their only config (the backward keeps its own)."""
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no head-dim pieces")
    tile = triton.Config(dict(BLOCK_M=32, BLOCK_N=16), num_warps=4, num_stages=1)
    for key, spec in attention_module._SPECS.items():
        if key[0] == "fwd":
            monkeypatch.setitem(attention_module._SPECS, key, dataclasses.replace(
                spec, configs=[tile], hopper_config=None, hopper_only=()))
    monkeypatch.setattr(launch_module, "_autotuned", {})  # no autotuner cached over the full lists


def _force_tma(monkeypatch):
    monkeypatch.setattr(attention_module, "_use_tma", lambda *tensors_and_problem: True)


def _padding_mask(batch, seqlen, seed):
    keep = torch.rand(batch, seqlen, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[-1] = False  # a sequence that is all padding: its rows see no key
    return keep


def _outputs_and_grads(fn, q, k, v, dout, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def _check(fn, ref_fn, tensors, dtype, device, assert_within_tolerance):
    """fn's output and gradients (the backward on fn's own output) against ref_fn's in float64."""
    actual = _outputs_and_grads(fn, *(t.to(device) for t in tensors))
    reference = _outputs_and_grads(ref_fn, *tensors, dtype=torch.float64)
    stock = _outputs_and_grads(ref_fn, *tensors)
    scale = max(r.abs().max().item() for r in reference)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), actual, reference, stock):
        assert_within_tolerance(name, a, r, s, dtype, scale=scale)


def _inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seqlen_q), (batch, kv_heads, seqlen_k), (batch, kv_heads, seqlen_k),
              (batch, heads, seqlen_q)]
    return [torch.randn(*shape, head_dim, generator=generator).to(dtype) for shape in shapes]  # q, k, v, dout


# (B, Hq, Hkv, Sq, Sk, D, dtype, options)
CASES = {
    "gqa2-causal-45x70-d80": (1, 4, 2, 45, 70, 80, torch.float16, dict(causal=True)),
    "window-softcap-50x40-d96": (1, 2, 1, 50, 40, 96, torch.float16, dict(window=(10, 5), softcap=4.0)),
    "padding-gqa2-33x50-d96": (2, 2, 1, 33, 50, 96, torch.float16, dict(padding=True)),
    "causal-padding-40-d48-fp32": (2, 2, 1, 40, 40, 48, torch.float32, dict(causal=True, padding=True)),
    # padded, one piece: the rule's other side
    "window-20x30-d160": (1, 2, 1, 20, 30, 160, torch.float16, dict(window=(8, 8))),
    "causal-30-d72": (1, 2, 1, 30, 30, 72, torch.float16, dict(causal=True)),
    "gqa2-25x35-d112": (1, 2, 1, 25, 35, 112, torch.float16, {}),
}
TMA_CASES = [name for name in CASES if CASES[name][6] != torch.float32]  # TMA reads 16-bit inputs only


def _run_case(case, device, assert_within_tolerance):
    *shape, dtype, options = CASES[case]
    tensors = _inputs(*shape, dtype, seed=41)
    options = dict(options)
    if options.pop("padding", False):
        options["key_padding_mask"] = _padding_mask(shape[0], shape[4], seed=42)
    on_device = {name: value.to(device) if name == "key_padding_mask" else value for name, value in options.items()}
    _check(lambda *t: flash_attention(*t, **on_device), lambda *t: attention_ref(*t, **options), tensors, dtype,
           device, assert_within_tolerance)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(case, small_tile, device, assert_within_tolerance):
    _run_case(case, device, assert_within_tolerance)


@pytest.mark.parametrize("case", TMA_CASES)
def test_tma_loads_match_reference(case, small_tile, device, monkeypatch, assert_within_tolerance):
    # Two descriptors per tensor: blocks of BLOCK_D columns at column 0, of BLOCK_D_TAIL at column BLOCK_D.
    _force_tma(monkeypatch)
    _run_case(case, device, assert_within_tolerance)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_varlen_matches_reference_per_sequence(tma, small_tile, device, monkeypatch, assert_within_tolerance):
    # Packed sequences, GQA and a window at d80: each sequence's rows, both pieces, against its own reference.
    if tma:
        _force_tma(monkeypatch)
    lengths_q, lengths_k = [37, 5, 0, 20], [30, 9, 4, 41]
    heads, kv_heads, head_dim, dtype, options = 4, 2, 80, torch.float16, dict(window=(12, 3))
    generator = torch.Generator().manual_seed(43)
    q, dout = (torch.randn(sum(lengths_q), heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    k, v = (torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = flash_attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k),
                                 **options)
    grads = torch.autograd.grad(out, leaves, dout.to(device))
    for i in range(len(lengths_q)):
        if lengths_q[i] == 0:
            continue
        rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        pieces = [as_batch(t) for t in (q[rows_q], k[rows_k], v[rows_k], dout[rows_q])]
        reference = _outputs_and_grads(lambda *t: attention_ref(*t, **options), *pieces, dtype=torch.float64)
        stock = _outputs_and_grads(lambda *t: attention_ref(*t, **options), *pieces)
        actual = [as_batch(out[rows_q]), as_batch(grads[0][rows_q]), as_batch(grads[1][rows_k]),
                  as_batch(grads[2][rows_k])]
        scale = max(r.abs().max().item() for r in reference)
        for name, a, r, s in zip(("out", "dq", "dk", "dv"), actual, reference, stock):
            assert_within_tolerance(f"{name} of sequence {i}", a.detach(), r, s, dtype, scale=scale)


@pytest.mark.parametrize("head_dim", [96, 80])
def test_dropout_matches_reference_with_the_same_mask(head_dim, small_tile, device, assert_within_tolerance):
    # With v the identity, out's first Sk columns are the kept probabilities: Sk = head_dim - 6 keys
    # put them in both pieces' columns (0..63 and 64..).
    batch, heads, seqlen, dropout_p, dtype = 1, 2, head_dim - 6, 0.3, torch.float16
    generator = torch.Generator().manual_seed(44)
    q_mask = torch.randn(batch, heads, seqlen, head_dim, generator=generator).to(dtype)
    identity = torch.eye(seqlen, head_dim, dtype=dtype).expand(batch, heads, seqlen, head_dim)
    torch.manual_seed(45)
    # A small scale keeps every probability above fp16's underflow, so every zero is a drop.
    keep = flash_attention(q_mask.to(device), q_mask.to(device), identity.to(device), dropout_p=dropout_p,
                           softmax_scale=0.05, causal=True)[..., :seqlen].cpu() != 0
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    assert not (keep & ~causal).any(), "a probability above the diagonal survived"
    assert abs(keep[causal.expand_as(keep)].double().mean().item() - (1 - dropout_p)) < 0.05
    torch.manual_seed(45)  # the same seed draws the same mask for any inputs: forward and backward see it
    tensors = _inputs(batch, heads, heads, seqlen, seqlen, head_dim, dtype, seed=46)
    _check(lambda *t: flash_attention(*t, dropout_p=dropout_p, causal=True),
           lambda *t: attention_ref(*t, dropout_p=dropout_p, dropout_mask=keep, causal=True), tensors, dtype,
           device, assert_within_tolerance)
