"""apply_rotary: all tiers, against float64 under the tolerance rule, in the layouts transformers passes."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import apply_rotary
from ember.kernels.rotary import apply_rotary_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Outputs a kernel leaves unwritten show as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _cos_sin(positions, rotary_dim, dtype=torch.float32):
    """cos, sin (B, S, R) as Llama's rotary embedding makes them: frequencies repeated over both halves."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = positions[..., None].double() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _heads(batch, heads, seq, dim, dtype, device, generator, layout):
    """(B, H, S, D) queries or keys: "hf" is the (B, S, H, D) projection output viewed as (B, H, S, D), as
    transformers' attention passes them; "strided" every other element of a NaN-poisoned buffer."""
    values = torch.randn(batch, seq, heads, dim, generator=generator).to(device=device, dtype=dtype)
    if layout == "hf":
        return values.transpose(1, 2)
    if layout == "strided":
        buffer = torch.full((batch, heads, seq, 2 * dim + 1), float("nan"), dtype=dtype, device=device)
        buffer[..., 1::2] = values.transpose(1, 2)
        return buffer[..., 1::2]
    return values.transpose(1, 2).contiguous()


def _check(q, k, cos, sin, dtype, assert_within_tolerance, unsqueeze_dim=1):
    q, k = q.requires_grad_(), k.requires_grad_()
    q_out, k_out = apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    generator = torch.Generator().manual_seed(5)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (q_out, k_out)]
    grads = torch.autograd.grad((q_out, k_out), (q, k), [c.to(device=q.device, dtype=t.dtype) for c, t in
                                                         zip(cotangents, (q_out, k_out))])
    expected = []
    for reference_dtype in (torch.float64, None):
        leaves = [t.detach().cpu().to(reference_dtype or t.dtype).requires_grad_() for t in (q, k)]
        tables = [t.cpu().to(reference_dtype or t.dtype) for t in (cos, sin)]
        outs = apply_rotary_ref(*leaves, *tables, unsqueeze_dim=unsqueeze_dim)
        expected.append((outs, torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cotangents, outs)])))
    (outs64, grads64), (stock, stock_grads) = expected
    for label, ours, ours64, theirs in zip(("q_out", "k_out"), (q_out, k_out), outs64, stock):
        assert ours.dtype == theirs.dtype, (label, ours.dtype, theirs.dtype)
        assert_within_tolerance(label, ours, ours64, theirs, dtype)
    for label, grad, grad64, theirs in zip(("d_q", "d_k"), grads, grads64, stock_grads):
        assert grad.dtype == dtype
        assert_within_tolerance(label, grad, grad64, theirs, dtype)
    return q_out, k_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    # (B, Hq, Hk, S, D, R): GQA with a full rotary head; one token; a partial rotary dim (Phi-style, R < D)
    # with a head dim that is not a power of 2.
    [(2, 4, 2, 17, 64, 64), (1, 3, 1, 1, 32, 32), (2, 2, 2, 9, 80, 32)],
    ids=lambda s: "B{}xHq{}xHk{}xS{}xD{}xR{}".format(*s),
)
def test_matches_reference(device, shape, dtype, assert_within_tolerance):
    batch, q_heads, k_heads, seq, dim, rotary_dim = shape
    generator = torch.Generator().manual_seed(seq)
    q = _heads(batch, q_heads, seq, dim, dtype, device, generator, "hf")
    k = _heads(batch, k_heads, seq, dim, dtype, device, generator, "contiguous")
    positions = torch.arange(seq).expand(batch, seq)
    cos, sin = (t.to(device=device, dtype=dtype) for t in _cos_sin(positions, rotary_dim))
    _check(q, k, cos, sin, dtype, assert_within_tolerance)


def test_packed_rows_restart_positions_and_layouts(device, assert_within_tolerance):
    # Two sequences packed in one row (positions restart at 0); cos/sin fp32 over bf16 q and k, as an fp32 model
    # under autocast makes them (the output is then fp32, as the unfused products promote); q strided in a
    # poisoned buffer; cos/sin one (S, R) table broadcast over the batch (stride 0).
    generator = torch.Generator().manual_seed(2)
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None].expand(2, 13)
    cos, sin = (t.to(device) for t in _cos_sin(positions[:1], 16))
    cos, sin = cos.expand(2, 13, 16), sin.expand(2, 13, 16)
    q = _heads(2, 4, 13, 16, torch.bfloat16, device, generator, "strided")
    k = _heads(2, 1, 13, 16, torch.bfloat16, device, generator, "hf")
    q_out, _ = _check(q, k, cos, sin, torch.bfloat16, assert_within_tolerance)
    assert q_out.dtype == torch.float32
    # (B, S, H, D) with unsqueeze_dim=2, as some models call it.
    q = _heads(2, 4, 13, 16, torch.float16, device, generator, "contiguous").transpose(1, 2)
    k = _heads(2, 4, 13, 16, torch.float16, device, generator, "hf").transpose(1, 2)
    _check(q, k, cos.half(), sin.half(), torch.float16, assert_within_tolerance, unsqueeze_dim=2)


def test_keeps_nothing_of_q_and_k(device):
    q = torch.randn(1, 4, 8, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t.to(device=device, dtype=torch.bfloat16) for t in _cos_sin(torch.arange(8)[None], 32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        apply_rotary(q, k, cos, sin)
    # Only views of cos and sin, which the model's rotary embedding made once for every layer.
    assert sorted(saved) == sorted([cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()])


def test_reference_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 32, generator=generator), torch.randn(2, 2, 5, 32, generator=generator)
    cos, sin = _cos_sin(torch.arange(5).expand(2, 5), 32)
    for ours, theirs in zip(apply_rotary_ref(q, k, cos, sin), llama_rope(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
    cos, sin = _cos_sin(torch.arange(5).expand(2, 5), 8)
    for ours, theirs in zip(apply_rotary_ref(q, k, cos, sin), phi3_rope(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


def test_bad_input_is_refused_by_name():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = _cos_sin(torch.arange(3)[None], 8)
    with pytest.raises(TypeError, match="k must be"):
        apply_rotary(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="4-D"):
        apply_rotary(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="rotary dim"):
        apply_rotary(q, k, cos[..., :3], sin[..., :3])
    with pytest.raises(ValueError, match="sin must have shape"):
        apply_rotary(q, k, cos, sin[..., :4])
    with pytest.raises(ValueError, match="do not broadcast to q's rows"):
        apply_rotary(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="no gradient"):
        apply_rotary(q, k, cos.requires_grad_(), sin)
