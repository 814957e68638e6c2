"""Fused attention: all tiers.

Every case runs on each backend of the `device` fixture (interpreter, PyTorch
path, CUDA) against a float64 reference, with the tolerance rule measured
against stock PyTorch (the same reference computed in the inputs' dtype).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ember.bench.memory import TensorSizeTracker
from ember.kernels import attention as attention_module
from ember.kernels import launch as launch_module
from ember.kernels import flash_attention, flash_attention_varlen
from ember.kernels.attention import attention_ref
from ember.kernels.backend import backend_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The two backwards of the Triton kernels: one pass with atomic dq (the default),
# and the two-pass one, bitwise repeatable. The PyTorch path has one backward.
BACKWARDS = {"one-pass": False, "two-pass": True}


def _skip_if_one_backward(device, backward):
    if backward == "two-pass" and device == "cpu" and backend_for(torch.empty(0)) == "torch":
        pytest.skip("the PyTorch path has one backward: deterministic changes nothing there")


# The two-pass backward was the only one before the one-pass one came: it runs
# on a subset that still has causal, window, softcap, padding, GQA and awkward
# lengths, in one dtype each (the interpreter's time is CI's budget).
TWO_PASS_CASES = {"len1-d32", "gqa4-causal-17x300-d80", "window-causal-softcap-77x128-d32",
                  "padding-causal-gqa4-17x77-d128"}


def _skip_two_pass_outside(backward, dtype, run_dtype, case=None):
    if backward == "two-pass" and (dtype != run_dtype or (case is not None and case not in TWO_PASS_CASES)):
        pytest.skip("the two-pass backward runs on a subset of cases and dtypes")


def _padding_mask(batch, seqlen, generator):
    """Random holes, right padding, and one fully padded row (last)."""
    keep = torch.rand(batch, seqlen, generator=generator) > 0.25
    keep[0, seqlen * 2 // 3:] = False
    keep[0, 0] = True
    keep[-1] = False
    return keep


# (B, Hq, Hkv, Sq, Sk, D, options). GQA ratios 1, 3, 4 and 8; every head dim;
# lengths 1, 17, 77, 128, 300 and Sq != Sk both ways; padding with a fully
# padded row; window and softcap, alone and with the rest.
CASES = {
    "len1-d32": (2, 2, 2, 1, 1, 32, {}),
    "gqa3-causal-77-d64": (2, 6, 2, 77, 77, 64, dict(causal=True)),
    "gqa4-causal-17x300-d80": (1, 4, 1, 17, 300, 80, dict(causal=True)),
    "causal-300x17-d96": (1, 2, 2, 300, 17, 96, dict(causal=True)),
    "gqa8-128-d128": (1, 8, 1, 128, 128, 128, {}),
    "softcap-17x77-d256": (1, 2, 1, 17, 77, 256, dict(softcap=5.0)),
    "window-300-d64": (1, 4, 2, 300, 300, 64, dict(window=(40, 7))),
    "window-causal-softcap-77x128-d32": (2, 3, 1, 77, 128, 32, dict(window=(20, -1), causal=True, softcap=3.0)),
    "padding-77-d64": (3, 2, 2, 77, 77, 64, dict(padding=True)),
    "padding-causal-gqa4-17x77-d128": (3, 4, 1, 17, 77, 128, dict(padding=True, causal=True)),
    "scale-300x128-d32": (1, 2, 1, 300, 128, 32, dict(softmax_scale=0.3)),
}


def _make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(q), cast(k), cast(v), dout.to(device=device, dtype=dtype)


def _outputs_and_grads(fn, q, k, v, dout, dtype=None):
    """fn's output and (dq, dk, dv) on fresh leaves, in ``dtype`` (default: the inputs')."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out, *grads]


def _check_against_reference(fn, ref_fn, q, k, v, dout, dtype, assert_within_tolerance):
    actual = _outputs_and_grads(fn, q, k, v, dout)
    cpu = [t.detach().cpu() for t in (q, k, v, dout)]
    reference = _outputs_and_grads(ref_fn, *cpu, dtype=torch.float64)
    stock = _outputs_and_grads(ref_fn, *cpu)
    # One scale for all four: with one visible key dq is exactly 0, though its terms are not.
    scale = max(r.abs().max().item() if r.numel() else 0.0 for r in reference)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), actual, reference, stock):
        assert_within_tolerance(name, a, r, s, dtype, scale=scale)
    return actual


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, backward, device, assert_within_tolerance):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, options = CASES[case]
    if dtype == torch.float32 and head_dim > 64:
        pytest.skip("float32 supports head dims up to 64 (test_bad_input covers the error)")
    _skip_if_one_backward(device, backward)
    _skip_two_pass_outside(backward, dtype, torch.float16, case)
    q, k, v, dout = _make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, device, seed=1)
    options = dict(options, deterministic=BACKWARDS[backward])
    if options.pop("padding", False):
        options["key_padding_mask"] = _padding_mask(batch, seqlen_k, torch.Generator().manual_seed(2))
    mask = options.get("key_padding_mask")
    on_device = dict(options, key_padding_mask=mask.to(device)) if mask is not None else options
    out, dq, dk, dv = _check_against_reference(
        lambda *t: flash_attention(*t, **on_device),
        lambda *t: attention_ref(*t, **{k: v for k, v in options.items() if k != "deterministic"}),
        q, k, v, dout, dtype, assert_within_tolerance,
    )
    if mask is not None:  # the fully padded row sees nothing: output 0, no gradient through it
        assert out[-1].abs().max() == 0 and dq[-1].abs().max() == 0
        assert dk[-1].abs().max() == 0 and dv[-1].abs().max() == 0


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_reference_per_sequence(causal, dtype, backward, device, assert_within_tolerance):
    _skip_if_one_backward(device, backward)
    _skip_two_pass_outside(backward, dtype, torch.bfloat16)
    # Packed sequences, lengths 1 included; keys longer than queries in some.
    lengths_q = [1, 17, 77, 1, 40]
    lengths_k = [1, 30, 77, 5, 40]
    heads, kv_heads, head_dim = 4, 2, 64
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=generator)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    dout = torch.randn_like(q)
    cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)

    def per_sequence_reference(q, k, v):
        outs = []
        for i in range(len(lengths_q)):
            rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
            outs.append(attention_ref(as_batch(q[rows_q]), as_batch(k[rows_k]), as_batch(v[rows_k]),
                                      causal=causal)[0].transpose(0, 1))
        return torch.cat(outs)

    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    _check_against_reference(
        lambda *t: flash_attention_varlen(*t, cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k),
                                          causal=causal, deterministic=BACKWARDS[backward]),
        per_sequence_reference,
        cast(q), cast(k), cast(v), cast(dout), dtype, assert_within_tolerance,
    )


def test_varlen_never_attends_across_sequences(device):
    # Two packed sequences against one batch of two: identical outputs and lse.
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 33, 32, generator=generator).to(device) for _ in range(3))
    padded, padded_lse = flash_attention(q, k, v, causal=True, return_lse=True)
    pack = lambda t: t.transpose(1, 2).reshape(66, 2, 32)  # noqa: E731
    cu = torch.tensor([0, 33, 66], dtype=torch.int32, device=device)
    packed, packed_lse = flash_attention_varlen(pack(q), pack(k), pack(v), cu, cu, 33, 33, causal=True,
                                                return_lse=True)
    torch.testing.assert_close(packed, pack(padded), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_lse, padded_lse.transpose(0, 1).reshape(2, 66), rtol=1e-5, atol=1e-5)


def test_lse_is_the_log_sum_exp_of_the_scores(device):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 17, 32, generator=generator) for _ in range(3))
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1] = False
    _, lse = flash_attention(q.to(device), k.to(device), v.to(device), key_padding_mask=mask.to(device),
                             return_lse=True)
    expected = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) / 32**0.5, dim=-1)
    torch.testing.assert_close(lse[0].cpu().double(), expected[0], rtol=1e-5, atol=1e-5)
    assert (lse[1] == float("-inf")).all()


def test_layout_of_q_is_kept_and_read_in_place(device, assert_within_tolerance):
    # Hugging Face hands over (B, S, H, D) tensors transposed to (B, H, S, D).
    generator = torch.Generator().manual_seed(6)
    q, k, v, dout = (torch.randn(2, 40, 4, 32, generator=generator).to(device).transpose(1, 2) for _ in range(4))
    out = flash_attention(q, k, v, causal=True)
    assert out.stride() == q.stride()
    reference = attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    stock = attention_ref(q.cpu(), k.cpu(), v.cpu(), causal=True)
    assert_within_tolerance("out", out, reference, stock, torch.float32)


def test_deterministic_backward_is_bitwise_repeatable(device):
    # Asked for by the argument, and by PyTorch's flag. (The interpreter runs
    # atomics in order, so there the one-pass backward repeats too: the GPU
    # tier is where this test can tell the two apart.)
    q, k, v, dout = _make_case(1, 4, 2, 70, 70, 32, torch.float16, device, seed=7)  # GQA, two blocks each way
    runs = [_outputs_and_grads(lambda *t: flash_attention(*t, causal=True, deterministic=True), q, k, v, dout)]
    with _deterministic_algorithms():
        runs.append(_outputs_and_grads(lambda *t: flash_attention(*t, causal=True), q, k, v, dout))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


class _deterministic_algorithms:
    """torch.use_deterministic_algorithms(True) inside the block, then as it was."""

    def __enter__(self):
        self.was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.was)


@pytest.mark.parametrize("deterministic, flag, expected", [
    (None, False, "one-pass"), (None, True, "two-pass"), (True, False, "two-pass"), (False, True, "one-pass"),
], ids=["default", "torch-flag", "asked", "asked-over-the-flag"])
def test_the_backward_follows_deterministic_then_torch_flag(deterministic, flag, expected, device, monkeypatch):
    if device == "cpu" and backend_for(torch.empty(0)) == "torch":
        pytest.skip("the PyTorch path has one backward")
    launched = []
    real_launch = attention_module.launch
    monkeypatch.setattr(attention_module, "launch",
                        lambda spec, *args, **kwargs: (launched.append(spec.name), real_launch(spec, *args, **kwargs)))
    q, k, v, dout = _make_case(1, 2, 1, 5, 5, 16, torch.float32, device, seed=8)
    out = flash_attention(q, k, v, deterministic=deterministic)
    # PyTorch's flag is read when the backward runs, as its own kernels read it.
    if flag:
        with _deterministic_algorithms():
            out.backward(dout)
    else:
        out.backward(dout)
    kernels = {"one-pass": ["attention_delta", "attention_bwd_fp32"],
               "two-pass": ["attention_dq_fp32", "attention_dkdv_fp32"]}[expected]
    assert launched == ["attention_fwd_fp32", *kernels]


def test_empty_batch(device):
    q = torch.randn(0, 2, 5, 32, device=device, requires_grad=True)
    out = flash_attention(q, q, q)
    assert out.shape == q.shape
    out.sum().backward()


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------


def _dropout_mask(device, dtype, shape, dropout_p, seed, **options):
    """The keep mask a call draws, read off its output: with v = identity, out = dropped probabilities * (1 - p)^-1."""
    batch, heads, seqlen, head_dim = shape
    q = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(device=device, dtype=dtype)
    identity = torch.eye(seqlen, head_dim, dtype=dtype, device=device).expand(batch, heads, seqlen, head_dim)
    torch.manual_seed(seed)
    out = flash_attention(q, q, identity, dropout_p=dropout_p, **options)
    return out[..., :seqlen] != 0  # (B, H, Sq, Sk); every probability is > 0 here


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_matches_reference_with_the_same_mask(dtype, backward, device, assert_within_tolerance):
    _skip_if_one_backward(device, backward)
    _skip_two_pass_outside(backward, dtype, torch.bfloat16)
    shape, dropout_p = (2, 2, 64, 64), 0.3
    keep = _dropout_mask(device, dtype, shape, dropout_p, seed=12, causal=False).cpu()
    q, k, v, dout = _make_case(*shape[:2], 2, 64, 64, 64, dtype, device, seed=13)
    torch.manual_seed(12)  # the same seed draws the same mask for any inputs: forward and backward see it
    _check_against_reference(
        lambda *t: flash_attention(*t, dropout_p=dropout_p, deterministic=BACKWARDS[backward]),
        lambda *t: attention_ref(*t, dropout_p=dropout_p, dropout_mask=keep),
        q, k, v, dout, dtype, assert_within_tolerance,
    )


def test_dropout_keep_rate_and_seeding(device):
    shape, dropout_p = (2, 2, 64, 64), 0.25
    first = _dropout_mask(device, torch.float32, shape, dropout_p, seed=14)
    again = _dropout_mask(device, torch.float32, shape, dropout_p, seed=14)
    other = _dropout_mask(device, torch.float32, shape, dropout_p, seed=15)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # 16384 draws: the keep rate's standard deviation is 0.0034.
    assert abs(first.float().mean().item() - (1 - dropout_p)) < 0.02
    # Heads and query rows draw different bits.
    assert not torch.equal(first[0, 0], first[0, 1]) and not torch.equal(first[0, 0, 0], first[0, 0, 1])


def test_dropout_zero_output_mean_is_unbiased(device):
    # E[dropout(P) V] = P V: averaging many seeds approaches the undropped output.
    q, k, v, _ = _make_case(1, 1, 1, 16, 16, 32, torch.float32, device, seed=16)
    expected = flash_attention(q, k, v)
    mean = sum(flash_attention(q, k, v, dropout_p=0.5) for _ in range(200)) / 200
    assert (mean - expected).abs().max() < 0.25 * expected.abs().max()


# ----------------------------------------------------------------------------
# Memory: no (S, S) buffer
# ----------------------------------------------------------------------------


def test_no_seqlen_squared_buffer(device):
    # The interpreter is slow at S=4096, and its tiles live in numpy, out of the tracker's sight anyway.
    seqlen = 512 if device == "cpu" and backend_for(torch.empty(0)) == "triton" else 4096
    q, k, v, dout = _make_case(1, 2, 2, seqlen, seqlen, 32, torch.float32, device, seed=17)
    square_bytes = 2 * seqlen * seqlen * 4
    with TensorSizeTracker() as tracker:
        out = flash_attention(q, k, v, causal=True)
        out.backward(dout)
    assert tracker.largest_bytes < square_bytes / 4, (
        f"largest tensor {tracker.largest_shape} ({tracker.largest_op}) is a sizable fraction of (B, H, S, S)"
    )
    with TensorSizeTracker() as stock:
        attention_ref(q.detach(), k.detach(), v.detach(), causal=True)
    assert stock.largest_bytes >= square_bytes  # the tracker does see a materialized score matrix


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

_q = torch.randn(2, 4, 8, 32)
_kv = torch.randn(2, 2, 8, 32)

BAD_INPUTS = {
    "k-v-shapes": (lambda: flash_attention(_q, _kv, _kv[:, :, :4]), ValueError, "k and v must have the same shape"),
    "head-dim-mismatch": (lambda: flash_attention(_q, _kv[..., :16], _kv[..., :16]), ValueError, "same head dim"),
    "heads-do-not-divide": (lambda: flash_attention(_q, *(torch.randn(2, 3, 8, 32),) * 2), ValueError,
                            "multiple of the key/value heads"),
    "head-dim-300": (lambda: flash_attention(*(torch.randn(1, 1, 4, 300),) * 3), ValueError, "head dim must be"),
    "head-dim-20": (lambda: flash_attention(*(torch.randn(1, 1, 4, 20),) * 3), ValueError, "head dim must be"),
    "int-dtype": (lambda: flash_attention(*(torch.ones(1, 1, 4, 32, dtype=torch.int32),) * 3), TypeError,
                  "must be float16, bfloat16 or float32"),
    "fp32-head-dim-80": (lambda: flash_attention(*(torch.randn(1, 1, 4, 80),) * 3), ValueError,
                         "float32 attention supports head dims up to 64"),
    "float64": (lambda: flash_attention(*(torch.ones(1, 1, 4, 32, dtype=torch.float64),) * 3), TypeError,
                "must be float16, bfloat16 or float32"),
    "mixed-dtypes": (lambda: flash_attention(_q.half(), _kv, _kv), TypeError, "one dtype"),
    "rank-3": (lambda: flash_attention(_q[0], _kv[0], _kv[0]), ValueError, r"q must be \(B, H, S, D\)"),
    "batch-mismatch": (lambda: flash_attention(_q, _kv[:1], _kv[:1]), ValueError, "same batch size"),
    "mask-dtype": (lambda: flash_attention(_q, _kv, _kv, key_padding_mask=torch.ones(2, 8)), TypeError, "bool"),
    "mask-shape": (lambda: flash_attention(_q, _kv, _kv, key_padding_mask=torch.ones(2, 7, dtype=torch.bool)),
                   ValueError, r"key_padding_mask must be \(B, Sk\)"),
    "dropout-1": (lambda: flash_attention(_q, _kv, _kv, dropout_p=1.0), ValueError, "dropout_p"),
    "window": (lambda: flash_attention(_q, _kv, _kv, window=(4,)), ValueError, "window must be"),
    "softcap": (lambda: flash_attention(_q, _kv, _kv, softcap=0.0), ValueError, "softcap"),
    "deterministic-int": (lambda: flash_attention(_q, _kv, _kv, deterministic=1), TypeError,
                          "deterministic must be a bool or None, got 1"),
    "varlen-deterministic-str": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0, 4]),
                                                                torch.tensor([0, 2]), 4, 2, deterministic="yes"),
                                 TypeError, "deterministic"),
    # Issue 15, finding 10: options that were accepted and gave NaN or nonsense.
    "scale-inf": (lambda: flash_attention(_q, _kv, _kv, softmax_scale=float("inf")), ValueError,
                  "softmax_scale must be a finite number > 0, got inf"),
    "scale-nan": (lambda: flash_attention(_q, _kv, _kv, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    "scale-0": (lambda: flash_attention(_q, _kv, _kv, softmax_scale=0.0), ValueError, "softmax_scale"),
    "scale-negative": (lambda: flash_attention(_q, _kv, _kv, softmax_scale=-0.5), ValueError, "softmax_scale"),
    "scale-str": (lambda: flash_attention(_q, _kv, _kv, softmax_scale="0.1"), TypeError, "softmax_scale"),
    "softcap-inf": (lambda: flash_attention(_q, _kv, _kv, softcap=float("inf")), ValueError,
                    "softcap must be a finite number > 0, got inf"),
    "softcap-nan": (lambda: flash_attention(_q, _kv, _kv, softcap=float("nan")), ValueError, "softcap"),
    "dropout-nan": (lambda: flash_attention(_q, _kv, _kv, dropout_p=float("nan")), ValueError,
                    r"dropout_p must be a finite number in \[0, 1\)"),
    "dropout-negative": (lambda: flash_attention(_q, _kv, _kv, dropout_p=-0.1), ValueError, "dropout_p"),
    "window-float": (lambda: flash_attention(_q, _kv, _kv, window=(2.5, 0)), TypeError, r"window\[0\] must be an int"),
    "window-below-minus-1": (lambda: flash_attention(_q, _kv, _kv, window=(2, -3)), ValueError, r"window\[1\]"),
    "varlen-softcap-inf": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0, 4]),
                                                          torch.tensor([0, 2]), 4, 2, softcap=float("inf")),
                           ValueError, "softcap"),
    "varlen-max-seqlen-float": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0, 4]),
                                                               torch.tensor([0, 2]), 4.0, 2), TypeError,
                                "max_seqlen_q must be an int"),
    "varlen-max-seqlen-negative": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0, 4]),
                                                                  torch.tensor([0, 2]), 4, -1), ValueError,
                                   "max_seqlen_k must be an int >= 0"),
    "varlen-cu-2d": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([[0, 4]]),
                                                    torch.tensor([0, 2]), 4, 2), ValueError,
                     "cu_seqlens_q must be 1-D"),
    "varlen-cu-dtype": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0.0, 4.0]),
                                                       torch.tensor([0, 8]), 4, 8), TypeError, "cu_seqlens_q"),
    "varlen-cu-lengths": (lambda: flash_attention_varlen(_q[0], _kv[0], _kv[0], torch.tensor([0, 2, 4]),
                                                         torch.tensor([0, 8]), 4, 8), ValueError, "same length"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()


def test_devices_that_differ():
    with pytest.raises(ValueError, match="one device"):
        flash_attention(_q, _kv.to("meta"), _kv)


# Issue 15, finding 3: with 7 packed tokens, offsets [0, 3, 8] aborted the interpreter
# with heap corruption, [0, 3, 20] segfaulted, [-2, 3, 7] aborted, and on the PyTorch
# path [0, 3, 5] and [0, 5, 3] returned values up to 1e35 read from uninitialised memory.
BAD_OFFSETS = {
    "past-the-end": ([0, 3, 8], 7, "it ends at 8"),
    "far-past-the-end": ([0, 3, 20], 7, "it ends at 20"),
    "negative-start": ([-2, 3, 7], 7, "it starts at -2"),
    "short-of-the-end": ([0, 3, 5], 7, "it ends at 5"),
    "decreasing": ([0, 5, 3], 7, r"it decreases from 5 to 3 \(sequence 1\)"),
    "longer-than-max-seqlen": ([0, 3, 7], 3, "sequence 1 has 4 tokens"),
    # Checked before the cast to int32, which would wrap 2**32 + 3 to 3.
    "int64-that-wraps": ([0, 2**32 + 3, 7], 7, "it decreases from 4294967299 to 7"),
}


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_varlen_refuses_offsets_that_do_not_delimit_the_packed_tokens(case, which, device):
    if device == "cuda":
        pytest.skip("on CUDA the check is a device-side assertion, which ends the process's CUDA context")
    offsets, max_seqlen, fault = BAD_OFFSETS[case]
    packed = torch.randn(7, 2, 16, device=device)
    good = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    bad = torch.tensor(offsets, dtype=torch.int64 if max(offsets) >= 2**31 else torch.int32, device=device)
    cu_q, cu_k = (bad, good) if which == "q" else (good, bad)
    max_q, max_k = (max_seqlen, 7) if which == "q" else (7, max_seqlen)
    message = (rf"cu_seqlens_{which} must start at 0, never decrease, and end at {which}.shape\[0\] = 7, "
               rf"with no sequence longer than max_seqlen_{which} = {max_seqlen}; {fault}")
    with pytest.raises(ValueError, match=message):
        flash_attention_varlen(packed, packed, packed, cu_q, cu_k, max_q, max_k)


def test_varlen_offsets_may_be_strided_int64_with_empty_sequences(device, assert_within_tolerance):
    # The offsets are read as given: a strided int64 view is converted, not misread.
    generator = torch.Generator().manual_seed(18)
    packed = [torch.randn(7, 2, 16, generator=generator) for _ in range(3)]
    wide = torch.tensor([[0, 9], [0, 9], [3, 9], [7, 9]])
    cu = wide[:, 0]  # [0, 0, 3, 7]: an empty sequence first, stride 2
    dout = torch.randn(7, 2, 16, generator=generator)

    def per_sequence_reference(q, k, v):
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        return torch.cat([attention_ref(as_batch(q[rows]), as_batch(k[rows]), as_batch(v[rows]), causal=True)[0]
                          .transpose(0, 1) for rows in (slice(0, 0), slice(0, 3), slice(3, 7))])

    _check_against_reference(
        lambda *t: flash_attention_varlen(*t, cu.to(device), cu.to(device), 4, 4, causal=True),
        per_sequence_reference, *(t.to(device) for t in packed), dout.to(device), torch.float32,
        assert_within_tolerance,
    )


# ----------------------------------------------------------------------------
# Block masks in the backward: the dq pass tests positions only on the key
# blocks that straddle the band's edge or k_len, the dk/dv pass only on the
# query blocks that straddle the band's edge or q_len (and on all of them when
# its key block crosses k_len); the others take the key padding mask alone.
# ----------------------------------------------------------------------------

# (B, Hq, Hkv, Sq, Sk, D, options). The interpreter's tiles are 16 to 128 rows a side (multiples
# of 16): these put the band's edges inside tiles, on their edges, and whole tiles away;
# windows narrower than a tile; sequences shorter than one; rows that see no key.
BOUNDARY_CASES = {
    "causal-128-diagonal-on-tile-edges": (1, 2, 1, 128, 128, 32, dict(causal=True)),
    "causal-40x100": (1, 2, 2, 40, 100, 32, dict(causal=True)),
    "causal-130x64-rows-see-nothing": (1, 2, 1, 130, 64, 16, dict(causal=True)),
    "window-3-5-70": (2, 2, 1, 70, 70, 32, dict(window=(3, 5))),
    "window-16-0-softcap-96x160": (1, 4, 2, 96, 160, 32, dict(window=(16, 0), softcap=4.0)),
    "window-causal-33-150x97-rows-see-nothing": (1, 2, 1, 150, 97, 16, dict(window=(33, 8), causal=True)),
    "causal-5x9-shorter-than-a-tile": (2, 2, 1, 5, 9, 16, dict(causal=True)),
    "padding-window-45": (3, 2, 1, 45, 45, 32, dict(window=(20, 20), padding=True)),
    "full-45x130": (1, 2, 1, 45, 130, 32, {}),
    # Windows wide enough for whole tiles inside the band, with Sk - Sq putting both of its edges
    # exactly on tiles' edges (Sk - Sq - left = 1 and Sk - Sq + right = -1 modulo 32), or one key
    # past them (2 and -2): a tile taken as unmasked one key too early fails here.
    "window-130-28-128x259-edges-on-tiles": (1, 2, 1, 128, 259, 16, dict(window=(130, 28))),
    "window-130-26-128x260-edges-one-past": (1, 2, 1, 128, 260, 16, dict(window=(130, 26))),
}


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(BOUNDARY_CASES))
def test_backward_masks_only_the_boundary_tiles(case, dtype, backward, device, assert_within_tolerance):
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, options = BOUNDARY_CASES[case]
    q, k, v, dout = _make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype, device, seed=31)
    if options.pop("padding", False):
        options["key_padding_mask"] = _padding_mask(batch, seqlen_k, torch.Generator().manual_seed(32))
    mask = options.get("key_padding_mask")
    on_device = dict(options, key_padding_mask=mask.to(device)) if mask is not None else options
    out, dq, dk, dv = _check_against_reference(
        lambda *t: flash_attention(*t, **on_device, deterministic=BACKWARDS[backward]),
        lambda *t: attention_ref(*t, **options),
        q, k, v, dout, dtype, assert_within_tolerance,
    )
    band = attention_module._band(options.get("causal", False), options.get("window"))
    sees = attention_module._allowed_ref(seqlen_q, seqlen_k, band, mask, "cpu").any(-1, keepdim=True)
    blind = ~sees.expand(out.shape)  # rows that see no key: exactly 0, no gradient
    assert not out.detach().cpu()[blind].any() and not dq.cpu()[blind].any()


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_keeps_keys_past_the_end_out_when_every_score_is_far_below_zero(dtype, backward, device,
                                                                                 assert_within_tolerance):
    # Scores near -150 give a log-sum-exp below -88: a key past k_len (zeros, score 0) let into a
    # tile would weigh exp(150) = inf in fp32 and make dq NaN. So every tile of a key block that
    # crosses k_len tests the key boundary, even where the band covers all of its queries.
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    generator = torch.Generator().manual_seed(34)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    q = -12 * direction + 0.1 * torch.randn(1, 2, 64, 16, generator=generator)
    k = 12 * direction + 0.1 * torch.randn(1, 1, 40, 16, generator=generator)
    v, dout = torch.randn(1, 1, 40, 16, generator=generator), torch.randn(1, 2, 64, 16, generator=generator)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    _check_against_reference(
        lambda *t: flash_attention(*t, softmax_scale=1.0, deterministic=BACKWARDS[backward]),
        lambda *t: attention_ref(*t, softmax_scale=1.0),
        cast(q), cast(k), cast(v), cast(dout), dtype, assert_within_tolerance,
    )


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_masks_only_the_boundary_tiles_varlen(dtype, backward, device, assert_within_tolerance):
    # Each sequence has its own edges: lengths around the tiles' sizes, queries longer and shorter than keys.
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    lengths_q, lengths_k = [5, 64, 100, 33], [9, 64, 47, 130]
    window = (12, 3)
    heads, kv_heads, head_dim = 2, 1, 16
    generator = torch.Generator().manual_seed(33)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=generator)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, generator=generator)
    dout = torch.randn_like(q)
    cu = lambda lengths: torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)

    def per_sequence_reference(q, k, v):
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        return torch.cat([
            attention_ref(as_batch(q[cu_q[i]:cu_q[i + 1]]), as_batch(k[cu_k[i]:cu_k[i + 1]]),
                          as_batch(v[cu_k[i]:cu_k[i + 1]]), causal=True, window=window)[0].transpose(0, 1)
            for i in range(len(lengths_q))])

    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    _check_against_reference(
        lambda *t: flash_attention_varlen(*t, cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k),
                                          causal=True, window=window, deterministic=BACKWARDS[backward]),
        per_sequence_reference,
        cast(q), cast(k), cast(v), cast(dout), dtype, assert_within_tolerance,
    )


# The Hopper tiles: a spec's hopper_only configs run on sm_90 only, and the
# interpreter runs configs[0], so without this these tiles (and the transposed
# dq product of the one-pass backward) would be proven only to compile. Each
# runs here as its spec's only config: in the interpreter, and on any GPU (on
# sm_80 it spills, slowly but correctly) instead of whatever the autotuner picks.
HOPPER_TILES = [(kernel, variant, index) for (kernel, variant), spec in attention_module._SPECS.items()
                for index in spec.hopper_only]


def _tile_id(key):
    kernel, variant, index = key
    config = attention_module._SPECS[kernel, variant].configs[index]
    tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
    return f"{kernel}_{variant}_{tile}_w{config.num_warps}_s{config.num_stages}"


def _only_config(monkeypatch, kernel, variant, index):
    """Make configs[index] its spec's only config for this test; returns that config."""
    spec = attention_module._SPECS[kernel, variant]
    config = spec.configs[index]
    monkeypatch.setitem(attention_module._SPECS, (kernel, variant),
                        dataclasses.replace(spec, configs=[config], hopper_config=None, hopper_only=()))
    monkeypatch.setattr(launch_module, "_autotuned", {})  # no autotuner cached over the spec's full list
    return config


def _skip_a_tile_the_interpreter_already_ran(device, kernel, variant, index):
    # The interpreter ignores num_warps and num_stages: a variant of an earlier tile that differs only
    # there (a num_stages 2 copy of it, for cp.async) would repeat the same run. A GPU runs each.
    spec = attention_module._SPECS[kernel, variant]
    earlier = [i for i in spec.hopper_only if i < index and spec.configs[i].kwargs == spec.configs[index].kwargs]
    if earlier and device == "cpu":
        pytest.skip(f"the interpreter ran this tile as configs[{earlier[0]}]: it ignores num_warps and num_stages")


def _hopper_tile_alone(device, monkeypatch, kernel, variant, index):
    """Run configs[index] as its spec's only config, where there are tiles and the interpreter has not run it."""
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    _skip_a_tile_the_interpreter_already_ran(device, kernel, variant, index)
    _only_config(monkeypatch, kernel, variant, index)


@pytest.mark.parametrize("kernel,variant,index", HOPPER_TILES, ids=[_tile_id(key) for key in HOPPER_TILES])
def test_hopper_tiles_match_reference(kernel, variant, index, device, monkeypatch, assert_within_tolerance):
    _hopper_tile_alone(device, monkeypatch, kernel, variant, index)
    dtype = torch.float32 if variant == "fp32" else torch.float16
    head_dim = {"fp32": 64, "d128": 128, "d256": 256}[variant.removesuffix("_dropout")]
    # Lengths past one tile of either side, and a partial last tile; "bwd" is the one-pass backward.
    shape, dropout_p = (1, 2, 150, head_dim), (0.3 if variant.endswith("_dropout") else 0.0)
    options = dict(causal=True, dropout_p=dropout_p, deterministic=kernel != "bwd")
    keep = None
    if dropout_p:  # the mask read off the forward: the sequence must fit in the head dim, and a
        # small scale keeps every probability above fp16's underflow (the bits do not depend on it)
        shape = (1, 2, min(150, head_dim), head_dim)
        keep = _dropout_mask(device, dtype, shape, dropout_p, seed=21, causal=True, softmax_scale=1e-3).cpu()
    q, k, v, dout = _make_case(*shape[:2], 1, shape[2], shape[2], head_dim, dtype, device, seed=22)  # GQA
    torch.manual_seed(21)
    _check_against_reference(
        lambda *t: flash_attention(*t, **options),
        lambda *t: attention_ref(*t, causal=True, dropout_p=dropout_p, dropout_mask=keep),
        q, k, v, dout, dtype, assert_within_tolerance,
    )


# The forward's Hopper tiles (128x128: FA3's at head dim 128) on what the test above leaves out: a
# head dim that is not a power of two (96, padded to 128 in registers), keys longer than queries,
# a window, a softcap and padding with a fully padded row; then packed sequences of lengths 1 to 150.
FORWARD_HOPPER_TILES = [key for key in HOPPER_TILES if key[0] == "fwd"]


@pytest.mark.parametrize("kernel,variant,index", FORWARD_HOPPER_TILES,
                         ids=[_tile_id(key) for key in FORWARD_HOPPER_TILES])
def test_forward_hopper_tiles_on_awkward_shapes(kernel, variant, index, device, monkeypatch,
                                                assert_within_tolerance):
    _hopper_tile_alone(device, monkeypatch, kernel, variant, index)
    dtype = torch.float16
    q, k, v, dout = _make_case(2, 4, 2, 140, 200, 96, dtype, device, seed=23)  # GQA 2
    options = dict(window=(70, 20), softcap=4.0,
                   key_padding_mask=_padding_mask(2, 200, torch.Generator().manual_seed(24)))
    on_device = dict(options, key_padding_mask=options["key_padding_mask"].to(device))
    out, *_ = _check_against_reference(
        lambda *t: flash_attention(*t, **on_device), lambda *t: attention_ref(*t, **options),
        q, k, v, dout, dtype, assert_within_tolerance,
    )
    assert out[-1].abs().max() == 0  # the fully padded row

    lengths = torch.tensor([1, 150, 20])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    generator = torch.Generator().manual_seed(25)
    packed = [torch.randn(int(cu[-1]), heads, 96, generator=generator).to(dtype) for heads in (4, 2, 2, 4)]

    def per_sequence_reference(q, k, v):
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        return torch.cat([attention_ref(as_batch(q[a:b]), as_batch(k[a:b]), as_batch(v[a:b]), causal=True)[0]
                          .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    _check_against_reference(
        lambda *t: flash_attention_varlen(*t, cu.to(device), cu.to(device), 150, 150, causal=True),
        per_sequence_reference, *(t.to(device) for t in packed[:3]), packed[3].to(device), dtype,
        assert_within_tolerance,
    )


# The fp32 one-pass backward's Hopper tiles (8 queries x 64 keys, dq^T = K^T dS^T) on what the test
# above them leaves out: a head dim under 64 and not a power of two (40: dq^T's rows half padding),
# GQA, keys longer than queries, a window, a softcap and padding with a fully padded row; then
# dropout with the mask read off the forward, and packed sequences of lengths 1, 70 and 9.
FP32_BACKWARD_HOPPER_TILES = [key for key in HOPPER_TILES if key[:2] == ("bwd", "fp32")]


@pytest.mark.parametrize("kernel,variant,index", FP32_BACKWARD_HOPPER_TILES,
                         ids=[_tile_id(key) for key in FP32_BACKWARD_HOPPER_TILES])
def test_fp32_one_pass_backward_hopper_tiles_on_awkward_shapes(kernel, variant, index, device, monkeypatch,
                                                               assert_within_tolerance):
    _hopper_tile_alone(device, monkeypatch, kernel, variant, index)
    dtype = torch.float32
    q, k, v, dout = _make_case(2, 4, 2, 70, 90, 40, dtype, device, seed=26)  # GQA 2
    options = dict(window=(30, 10), softcap=4.0,
                   key_padding_mask=_padding_mask(2, 90, torch.Generator().manual_seed(27)))
    on_device = dict(options, key_padding_mask=options["key_padding_mask"].to(device), deterministic=False)
    out, dq, *_ = _check_against_reference(
        lambda *t: flash_attention(*t, **on_device), lambda *t: attention_ref(*t, **options),
        q, k, v, dout, dtype, assert_within_tolerance,
    )
    assert out[-1].abs().max() == 0 and dq[-1].abs().max() == 0  # the fully padded row

    shape, dropout_p = (1, 2, 40, 40), 0.3  # the mask read off the forward: the sequence fits in the head dim
    keep = _dropout_mask(device, dtype, shape, dropout_p, seed=28, causal=True).cpu()
    q, k, v, dout = _make_case(1, 2, 1, 40, 40, 40, dtype, device, seed=29)
    torch.manual_seed(28)
    _check_against_reference(
        lambda *t: flash_attention(*t, causal=True, dropout_p=dropout_p, deterministic=False),
        lambda *t: attention_ref(*t, causal=True, dropout_p=dropout_p, dropout_mask=keep),
        q, k, v, dout, dtype, assert_within_tolerance,
    )

    lengths = torch.tensor([1, 70, 9])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    generator = torch.Generator().manual_seed(30)
    packed = [torch.randn(int(cu[-1]), heads, 40, generator=generator).to(dtype) for heads in (4, 2, 2, 4)]

    def per_sequence_reference(q, k, v):
        as_batch = lambda t: t.transpose(0, 1)[None]  # noqa: E731
        return torch.cat([attention_ref(as_batch(q[a:b]), as_batch(k[a:b]), as_batch(v[a:b]), causal=True)[0]
                          .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    _check_against_reference(
        lambda *t: flash_attention_varlen(*t, cu.to(device), cu.to(device), 70, 70, causal=True,
                                          deterministic=False),
        per_sequence_reference, *(t.to(device) for t in packed[:3]), packed[3].to(device), dtype,
        assert_within_tolerance,
    )
