"""The attention forward's key loop, split into unmasked key blocks and masked ones.

The forward skips the position mask (band, sequence end) on key blocks that
every query of its block sees whole, and masks only the blocks that cross the
band's edges or the last key. These tests put those edges everywhere a tile
boundary can be: the forward runs small tiles (16x32 and 32x16, as its specs'
only config) over lengths of a few tiles, with the band's edges inside key
blocks, exactly on their boundaries, windows narrower than a block, Sq != Sk
both ways, sequences shorter than a block, and rows that see no key at all;
out and the log-sum-exp against float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

from ember.kernels import attention as attention_module
from ember.kernels import launch as launch_module
from ember.kernels import flash_attention, flash_attention_varlen
from ember.kernels.attention import _allowed_ref, _band, _tma_aligned, attention_ref
from ember.kernels.backend import backend_for

DTYPES = [torch.float32, torch.float16]
TILES = {"16x32": (16, 32), "32x16": (32, 16)}  # (BLOCK_M, BLOCK_N)

# (B, Hq, Hkv, Sq, Sk, D, options). With either tile:
CASES = {
    # the diagonal inside key blocks, and the last key block partial
    "causal-100": (1, 2, 1, 100, 100, 32, dict(causal=True)),
    # Sq < Sk: the diagonal offset by 63; Sq > Sk: the first 63 rows see no key
    "causal-37x100": (1, 2, 1, 37, 100, 40, dict(causal=True)),
    "causal-100x37": (1, 2, 1, 100, 37, 32, dict(causal=True)),
    # a window narrower than any block: no key block is whole for any query block
    "window-5-3-100": (1, 2, 2, 100, 100, 40, dict(window=(5, 3))),
    # both edges of the band exactly on block boundaries of the whole key blocks (left 79, right 31 for
    # 16- and 32-key blocks), then one key short of them: a block one key from whole must stay masked
    "window-79-31-160": (1, 2, 1, 160, 160, 32, dict(window=(79, 31))),
    "window-78-30-128x160": (1, 2, 1, 128, 160, 32, dict(window=(78, 30))),
    # a one-sided window with Sq > Sk, and softcap
    "window-40-left-softcap-90x50": (1, 2, 1, 90, 50, 40, dict(window=(40, -1), softcap=3.0)),
    "window-20-causal-softcap-50x90": (2, 2, 1, 50, 90, 32, dict(window=(20, -1), causal=True, softcap=3.0)),
    # no band: every block whole, then one key past a whole block
    "full-64": (1, 2, 1, 64, 64, 32, {}),
    "full-65x70": (1, 2, 1, 65, 70, 40, {}),
    # shorter than one block
    "causal-3x5": (1, 2, 1, 3, 5, 32, dict(causal=True)),
    # the key padding mask on whole blocks too; the last sequence is all padding
    "padding-causal-70": (3, 2, 1, 70, 70, 32, dict(causal=True, padding=True)),
    "padding-80": (2, 2, 2, 50, 80, 40, dict(padding=True)),
}


@pytest.fixture(params=list(TILES))
def small_tiles(request, monkeypatch, device):
    """The forward specs run one small tile as their only config; yields (BLOCK_M, BLOCK_N)."""
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no key blocks")
    block_m, block_n = TILES[request.param]
    for key, spec in attention_module._SPECS.items():
        if key[0] == "fwd":
            tile = triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n), num_warps=4, num_stages=1)
            monkeypatch.setitem(attention_module._SPECS, key, dataclasses.replace(
                spec, configs=[tile], hopper_config=None, hopper_only=()))
    monkeypatch.setattr(launch_module, "_autotuned", {})  # no autotuner cached over the full lists
    return block_m, block_n


def _inputs(shape, dtype, device, seed):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _lse_ref(q, k, causal=False, window=None, softcap=None, key_padding_mask=None):
    """(B, Hq, Sq) float64 log-sum-exp of the allowed scores; -inf where a query sees no key."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _allowed_ref(q.shape[2], k.shape[2], _band(causal, window), key_padding_mask, q.device)
    return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def _check_lse(lse, expected, dtype):
    seen = expected > float("-inf")
    assert torch.equal(lse.cpu() == float("-inf"), ~seen), "rows that see no key must have lse -inf, only they"
    scale = max(1.0, expected[seen].abs().max().item() if seen.any() else 0.0)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype] * scale
    torch.testing.assert_close(lse.cpu().double()[seen], expected[seen], rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference_at_every_block_edge(case, dtype, small_tiles, device, assert_within_tolerance):
    *shape, options = CASES[case]
    q, k, v = _inputs(shape, dtype, device, seed=31)
    if options.pop("padding", False):
        mask = torch.rand(shape[0], shape[4], generator=torch.Generator().manual_seed(32)) > 0.3
        mask[-1] = False
        options["key_padding_mask"] = mask
    on_device = {name: value.to(device) if name == "key_padding_mask" else value for name, value in options.items()}
    out, lse = flash_attention(q, k, v, return_lse=True, **on_device)
    cpu = [t.cpu() for t in (q, k, v)]
    reference = attention_ref(*(t.double() for t in cpu), **options)
    assert_within_tolerance("out", out, reference, attention_ref(*cpu, **options), dtype)
    _check_lse(lse, _lse_ref(*cpu[:2], **options), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(9, 20))], ids=["causal", "window-9-20"])
def test_varlen_forward_matches_reference_at_every_block_edge(options, dtype, small_tiles, device,
                                                              assert_within_tolerance):
    # Packed sequences whose starts fall inside blocks: a whole block is whole within its own sequence.
    lengths_q, lengths_k = [70, 5, 1, 33, 0], [45, 5, 17, 64, 3]
    heads, kv_heads, head_dim = 2, 1, 40
    generator = torch.Generator().manual_seed(33)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=generator)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    out, lse = flash_attention_varlen(cast(q), cast(k), cast(v), cu_q.to(device), cu_k.to(device), max(lengths_q),
                                      max(lengths_k), return_lse=True, **options)  # lse (Hq, T)
    for i in range(len(lengths_q)):
        rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        q_i, k_i, v_i = (as_batch(cast(t).cpu()) for t in (q[rows_q], k[rows_k], v[rows_k]))
        reference = attention_ref(q_i.double(), k_i.double(), v_i.double(), **options)
        assert_within_tolerance(f"out of sequence {i}", as_batch(out[rows_q]), reference,
                                attention_ref(q_i, k_i, v_i, **options), dtype)
        _check_lse(lse[:, rows_q][None], _lse_ref(q_i, k_i, **options), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_on_whole_and_masked_blocks(dtype, small_tiles, device):
    # With v the identity, out's first Sk columns are the dropped probabilities / (1 - p): every kept
    # one must be the reference probability / (1 - p) and every one outside the band 0, on whole and
    # masked blocks alike. A small scale keeps every probability above fp16's underflow.
    batch, heads, seqlen, head_dim, dropout_p = 1, 2, 60, 64, 0.3
    options = dict(window=(20, 5), softmax_scale=0.05)
    generator = torch.Generator().manual_seed(34)
    q, k = (torch.randn(batch, heads, seqlen, head_dim, generator=generator).to(dtype) for _ in range(2))
    identity = torch.eye(seqlen, head_dim, dtype=dtype).expand(batch, heads, seqlen, head_dim)
    torch.manual_seed(35)
    out = flash_attention(q.to(device), k.to(device), identity.to(device), dropout_p=dropout_p, **options)
    dropped = out[..., :seqlen].cpu().double()
    probs = attention_ref(q.double(), k.double(), torch.eye(seqlen, dtype=torch.float64).expand(
        batch, heads, seqlen, seqlen), **options)
    kept = dropped != 0
    allowed = _allowed_ref(seqlen, seqlen, _band(False, options["window"]), None, "cpu")[0, 0]
    assert not (kept & ~allowed).any(), "a probability outside the band survived"
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(dropped, torch.where(kept, probs / (1 - dropout_p), 0.0), rtol=rtol, atol=1e-6)
    keep_rate = kept[allowed.expand_as(kept)].double().mean().item()
    assert abs(keep_rate - (1 - dropout_p)) < 0.05  # ~3000 draws: 6 standard deviations


# ----------------------------------------------------------------------------
# TMA: on sm_90 the launcher loads q, k, v of aligned 16-bit inputs through tensor descriptors, one per
# (sequence, head) bounded by the sequence's length. The interpreter runs descriptors (as masked loads,
# asserting TMA's alignment rules), so the same edge cases prove that path here with it forced on.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_tma_loads_match_reference_at_every_block_edge(case, small_tiles, device, monkeypatch,
                                                        assert_within_tolerance):
    monkeypatch.setattr(attention_module, "_use_tma", lambda *tensors_and_problem: True)
    test_forward_matches_reference_at_every_block_edge(case, torch.float16, small_tiles, device,
                                                       assert_within_tolerance)


def test_tma_varlen_loads_match_reference(small_tiles, device, monkeypatch, assert_within_tolerance):
    # Each sequence's descriptor ends at its last token: the next sequence's rows must read as zeros.
    monkeypatch.setattr(attention_module, "_use_tma", lambda *tensors_and_problem: True)
    test_varlen_forward_matches_reference_at_every_block_edge(dict(window=(9, 20)), torch.float16, small_tiles,
                                                              device, assert_within_tolerance)


def test_tma_only_where_every_row_is_16_byte_aligned():
    def problem(head_dim):
        return attention_module._Problem(batch=2, num_heads=2, num_kv_heads=2, head_dim=head_dim, seqlen_q=8,
                                          seqlen_k=8)

    q = torch.randn(2, 2, 8, 40, dtype=torch.float16)  # rows of 80 bytes
    assert _tma_aligned([q], problem(40))
    assert _tma_aligned([q.transpose(1, 2).contiguous().transpose(1, 2)], problem(40))  # (B, S, H, D) as HF has it
    assert not _tma_aligned([torch.randn(2, 2, 8, 36, dtype=torch.float16)], problem(36))  # rows of 72 bytes
    shifted = torch.randn(q.numel() + 1, dtype=torch.float16)[1:].view(q.shape)  # base 2 bytes off
    assert not _tma_aligned([shifted], problem(40))
    assert not _tma_aligned([q[:, :, :1].expand(2, 2, 8, 40)], problem(40))  # every position the same row
    assert not _tma_aligned([q, torch.randn(2, 2, 40, 8, dtype=torch.float16).transpose(-1, -2)], problem(40))
    assert not attention_module._use_tma(q, q, q, problem(40))  # CPU tensors (the interpreter): pointer loads


def test_tma_case_compiles_to_tma_loads_and_wgmma_on_sm_90():
    # CI's gate subset compiles each spec's first case only: this compiles the forward's TMA case as
    # launched (the gate's own compile, outside the interpreter) for sm_90, and for sm_80, where Triton
    # turns descriptors back into pointer loads.
    script = textwrap.dedent("""
        import json
        from ember.kernels import compile_check
        from ember.kernels.launch import REGISTRY
        compile_check._import_kernel_families()
        spec = REGISTRY["attention_fwd_d128"]
        case, = [c for c in spec.compile_cases if c.name == "bf16,d128,band,tma"]
        rows = [compile_check.check_kernel(spec, case, spec.configs[0], arch) for arch in (80, 90)]
        print(json.dumps([dict(arch=r.arch, tma=r.tma, hgmma=r.hgmma, hmma=r.hmma, local=r.local_bytes,
                               problems=r.problems) for r in rows]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    sm80, sm90 = json.loads(result.stdout.splitlines()[-1])
    assert sm90["tma"] > 0 and sm90["hgmma"] > 0 and sm90["local"] == 0 and not sm90["problems"], sm90
    assert sm80["tma"] == 0 and sm80["hmma"] > 0 and sm80["local"] == 0 and not sm80["problems"], sm80


def test_tma_scratch_lends_torch_allocator_only_when_none_is_set():
    from triton.runtime import _allocation

    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    for callers in (_allocation.NullAllocator(), own):  # none set, then the caller's own
        token = _allocation._allocator.set(callers)
        try:
            with attention_module._tma_scratch(torch.device("cpu")):
                lent = _allocation._allocator.get()
                assert lent is own if callers is own else not isinstance(lent, _allocation.NullAllocator)
                scratch = lent(256, 128, None)
                assert isinstance(scratch, torch.Tensor) and scratch.numel() == 256
            assert _allocation._allocator.get() is callers  # nothing leaks to the caller
        finally:
            _allocation._allocator.reset(token)
