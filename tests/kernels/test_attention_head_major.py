"""Head dim 256's backward on Hopper: the head-major dk/dv tiles (``_attn_bwd_dkdv_head_major``).

They are the sm_90-only configs (``KernelSpec.hopper_only``) of the four head-dim-256
backward specs, and the interpreter runs each spec's configs[0], so here they run as their
specs' only config: forward and both backwards against float64, with GQA, packed
sequences, padding, causal and window bands, softcap and dropout, at head dim 256 and at
head dims padded to 256 (160, 192). Lengths span more than one tile of queries (128) and
of keys (16), with partial last tiles. On a GPU they run instead of the autotuner's pick.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember.kernels import attention as attention_module
from ember.kernels import flash_attention, flash_attention_varlen
from ember.kernels import launch as launch_module
from ember.kernels.attention import attention_ref
from ember.kernels.backend import backend_for

HEAD_MAJOR_SPECS = sorted(key for key, spec in attention_module._SPECS.items()
                          if any(config.kwargs.get("HEAD_MAJOR") for config in spec.configs))
BACKWARDS = {"one-pass": False, "two-pass": True}


@pytest.fixture
def head_major_tiles(device, monkeypatch):
    """Each spec's declared head-major tile as its only config (skips where there are no tiles);
    test_hopper_tiles_match_reference runs the others."""
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    for key in HEAD_MAJOR_SPECS:
        spec = attention_module._SPECS[key]
        tile = spec.configs[spec.hopper_config]
        monkeypatch.setitem(attention_module._SPECS, key,
                            dataclasses.replace(spec, configs=[tile], hopper_config=None, hopper_only=()))
    monkeypatch.setattr(launch_module, "_autotuned", {})  # no autotuner cached over a spec's full list


def test_every_head_dim_256_backward_has_a_head_major_hopper_tile():
    assert HEAD_MAJOR_SPECS == [("bwd", "d256"), ("bwd", "d256_dropout"), ("dkdv", "d256"),
                                ("dkdv", "d256_dropout")]
    for key in HEAD_MAJOR_SPECS:
        spec = attention_module._SPECS[key]
        assert spec.configs[spec.hopper_config].kwargs["HEAD_MAJOR"] and spec.hopper_config in spec.hopper_only
        assert not spec.configs[0].kwargs["HEAD_MAJOR"]  # sm_80 and the interpreter keep the keys-major tile


def _grads_against_reference(fn, ref_fn, inputs, dout, assert_within_tolerance):
    """fn's output and gradients against ref_fn's in float64, under the tolerance rule."""
    def run(f, tensors, dtype=None):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
        out = f(*leaves)
        return [out, *torch.autograd.grad(out, leaves, dout.to(device=out.device, dtype=out.dtype))]

    actual = run(fn, inputs)
    cpu = [t.detach().cpu() for t in inputs]
    reference, stock = run(ref_fn, cpu, torch.float64), run(ref_fn, cpu)
    scale = max(r.abs().max().item() for r in reference)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), actual, reference, stock):
        assert_within_tolerance(name, a, r, s, inputs[0].dtype, scale=scale)


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


# (B, Hq, Hkv, Sq, Sk, D, options): padded batches, fp16 unless a dtype is given.
CASES = {
    "gqa2-padding-softcap-130x40-d256": (2, 4, 2, 130, 40, 256, dict(padding=True, softcap=4.0)),
    "gqa3-causal-window-135x150-d160": (1, 3, 1, 135, 150, 160, dict(causal=True, window=(60, -1))),
    # Sq > Sk: causal leaves the first queries no key at all.
    "bf16-gqa2-causal-140x33-d256": (1, 2, 1, 140, 33, 256, dict(causal=True, dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("case", list(CASES))
def test_head_major_tiles_match_reference(case, backward, device, head_major_tiles, assert_within_tolerance):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, options = CASES[case]
    generator = torch.Generator().manual_seed(31)
    q, dout = _randn(generator, batch, heads, seqlen_q, head_dim), _randn(generator, batch, heads, seqlen_q, head_dim)
    k, v = _randn(generator, batch, kv_heads, seqlen_k, head_dim), _randn(generator, batch, kv_heads, seqlen_k, head_dim)
    options = dict(options)
    dtype = options.pop("dtype", torch.float16)
    if options.pop("padding", False):  # holes, right padding, and a fully padded sequence
        keep = torch.rand(batch, seqlen_k, generator=generator) > 0.25
        keep[0, seqlen_k * 2 // 3:] = False
        keep[-1] = False
        options["key_padding_mask"] = keep
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    mask = options.pop("key_padding_mask", None)
    _grads_against_reference(
        lambda *t: flash_attention(*t, key_padding_mask=None if mask is None else mask.to(device),
                                   deterministic=BACKWARDS[backward], **options),
        lambda *t: attention_ref(*t, key_padding_mask=mask, **options),
        [cast(q), cast(k), cast(v)], cast(dout), assert_within_tolerance,
    )


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_head_major_tiles_match_reference_on_packed_sequences(backward, device, head_major_tiles,
                                                               assert_within_tolerance):
    # Lengths 0, 1 and past one query tile; GQA; causal per sequence; head dim 192, padded to 256.
    lengths_q, lengths_k = [1, 131, 0, 20], [6, 140, 3, 20]
    heads, kv_heads, head_dim = 4, 2, 192
    generator = torch.Generator().manual_seed(32)
    q, dout = _randn(generator, sum(lengths_q), heads, head_dim), _randn(generator, sum(lengths_q), heads, head_dim)
    k, v = _randn(generator, sum(lengths_k), kv_heads, head_dim), _randn(generator, sum(lengths_k), kv_heads, head_dim)
    cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)

    def per_sequence_reference(q, k, v):
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        return torch.cat([attention_ref(as_batch(q[cu_q[i]:cu_q[i + 1]]), as_batch(k[cu_k[i]:cu_k[i + 1]]),
                                        as_batch(v[cu_k[i]:cu_k[i + 1]]), causal=True)[0].transpose(0, 1)
                          for i in range(len(lengths_q))])

    cast = lambda t: t.to(device=device, dtype=torch.float16)  # noqa: E731
    _grads_against_reference(
        lambda *t: flash_attention_varlen(*t, cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k),
                                          causal=True, deterministic=BACKWARDS[backward]),
        per_sequence_reference, [cast(q), cast(k), cast(v)], cast(dout), assert_within_tolerance,
    )


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_head_major_tiles_match_reference_with_dropout(backward, device, head_major_tiles, assert_within_tolerance):
    # The keep mask is read off a forward (v = identity: out = dropped probabilities / (1 - p));
    # the same seed draws the same bits for any inputs, in the forward and in both backwards.
    batch, heads, seqlen, head_dim, dropout_p = 1, 2, 136, 256, 0.3
    options = dict(causal=True, softcap=5.0, dropout_p=dropout_p)
    identity = torch.eye(seqlen, head_dim, dtype=torch.float16, device=device).expand(batch, heads, seqlen, head_dim)
    probe = torch.randn(batch, heads, seqlen, head_dim, generator=torch.Generator().manual_seed(33))
    probe = probe.to(device=device, dtype=torch.float16)
    torch.manual_seed(34)  # a small scale keeps every visible probability above fp16's underflow
    keep = (flash_attention(probe, probe, identity, softmax_scale=1e-3, **options)[..., :seqlen] != 0).cpu()
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    assert not keep[..., ~visible].any() and abs(keep[..., visible].float().mean().item() - (1 - dropout_p)) < 0.03

    generator = torch.Generator().manual_seed(35)
    q, dout = _randn(generator, batch, heads, seqlen, head_dim), _randn(generator, batch, heads, seqlen, head_dim)
    k, v = _randn(generator, batch, 1, seqlen, head_dim), _randn(generator, batch, 1, seqlen, head_dim)  # GQA 2
    cast = lambda t: t.to(device=device, dtype=torch.float16)  # noqa: E731
    torch.manual_seed(34)
    _grads_against_reference(
        lambda *t: flash_attention(*t, deterministic=BACKWARDS[backward], **options),
        lambda *t: attention_ref(*t, dropout_mask=keep, **options),
        [cast(q), cast(k), cast(v)], cast(dout), assert_within_tolerance,
    )


def test_tma_ready_copies_only_what_a_tensor_descriptor_cannot_read():
    problem = attention_module._Problem(batch=2, num_heads=3, num_kv_heads=3, head_dim=256, seqlen_q=5, seqlen_k=5)
    aligned = torch.randn(2, 3, 5, 256, dtype=torch.float16)
    hf_layout = torch.randn(2, 5, 3, 256, dtype=torch.float16).transpose(1, 2)  # (B, S, H, D) storage
    for t in (aligned, hf_layout):
        assert attention_module._tma_ready(t, problem) is t
    odd_start = torch.randn(2 * 3 * 5 * 256 + 1, dtype=torch.float16)[1:].view(2, 3, 5, 256)  # 2 bytes in
    odd_rows = torch.randn(2, 3, 5, 260, dtype=torch.float16)[..., :256]  # rows 520 bytes apart
    for t in (odd_start, odd_rows):
        copy = attention_module._tma_ready(t, problem)
        assert copy.is_contiguous() and copy.data_ptr() % 16 == 0 and torch.equal(copy, t)


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_head_major_tiles_take_views_tma_cannot_read(backward, device, head_major_tiles, assert_within_tolerance):
    # q and dO whose rows are 520 bytes apart: the launcher hands the kernel aligned copies.
    generator = torch.Generator().manual_seed(36)
    cast = lambda t: t.to(device=device, dtype=torch.float16)  # noqa: E731
    q, dout = (cast(_randn(generator, 1, 2, 20, 260))[..., :256] for _ in range(2))
    k, v = cast(_randn(generator, 1, 1, 24, 256)), cast(_randn(generator, 1, 1, 24, 256))
    assert q.stride(2) == dout.stride(2) == 260
    _grads_against_reference(
        lambda *t: flash_attention(*t, causal=True, deterministic=BACKWARDS[backward]),
        lambda *t: attention_ref(*t, causal=True),
        [q, k, v], dout, assert_within_tolerance,
    )


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_head_major_tiles_read_expanded_inputs(backward, device, head_major_tiles, assert_within_tolerance):
    # Stride 0 where broadcasting leaves it: q and dO shared by the batch (TMA reads the same rows for
    # each sequence), k and v shared by the batch and by the kv heads, and dO the same at every position.
    # Rows 0 bytes apart are what TMA cannot read and the launcher copies (_tma_aligned refuses them, see
    # test_attention_key_blocks.py); the interpreter reads any stride, so here only the results show.
    generator = torch.Generator().manual_seed(37)
    cast = lambda t: t.to(device=device, dtype=torch.float16)  # noqa: E731
    q = cast(_randn(generator, 1, 4, 20, 256)).expand(2, 4, 20, 256)
    k, v = (cast(_randn(generator, 1, 1, 24, 256)).expand(2, 2, 24, 256) for _ in range(2))  # GQA 2
    douts = {"batch": cast(_randn(generator, 1, 4, 20, 256)).expand(2, 4, 20, 256),
             "positions": cast(_randn(generator, 2, 4, 1, 256)).expand(2, 4, 20, 256)}
    assert q.stride(0) == k.stride(0) == k.stride(1) == douts["positions"].stride(2) == 0
    for dout in douts.values():
        _grads_against_reference(
            lambda *t: flash_attention(*t, causal=True, deterministic=BACKWARDS[backward]),
            lambda *t: attention_ref(*t, causal=True),
            [q, k, v], dout, assert_within_tolerance,
        )
