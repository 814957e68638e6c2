"""A property-based fuzz of every public kernel, on both paths, in every memory layout a caller can hand over.

Each test draws small shapes, a dtype, the kernel's options, and a layout for
every tensor argument: contiguous, strided at an offset inside a buffer poisoned
with NaN (a kernel that ignores a stride reads the poison), dims reversed in
memory, or broadcast with a stride of 0 along the first or the last dim. The
result and the gradients are held to the float64 reference (``*_ref``) by the
tolerance rule; an input the kernel refuses must be refused with an error that
names it. The `device` fixture runs each test on the Triton kernels (through the
interpreter, or on CUDA in the GPU tier) and on the PyTorch path.

The examples are derandomized (the same ones on every run) and few: the
interpreter is slow, and the whole file stays within a few minutes on two cores.
``pytest --hypothesis-show-statistics`` shows how many each test tried.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ember.kernels import (
    LinearCrossEntropyLoss,
    NF4Weight,
    adamw8bit_init_state,
    adamw8bit_step,
    apply_rotary,
    cross_entropy,
    dequantize_nf4,
    flash_attention,
    flash_attention_varlen,
    geglu,
    layer_norm,
    linear_cross_entropy,
    lora_linear,
    quantize_nf4,
    rms_norm,
    swiglu,
)
from ember.kernels.adamw8bit import adamw8bit_step_ref
from ember.kernels.attention import attention_ref
from ember.kernels.cross_entropy import cross_entropy_ref
from ember.kernels.dynamic_map import dynamic_map
from ember.kernels.gated import geglu_ref, swiglu_ref
from ember.kernels.lora import lora_linear_ref
from ember.kernels.nf4 import NF4_CODE
from ember.kernels.norms import layer_norm_ref, rms_norm_ref
from ember.kernels.rotary import apply_rotary_ref


def fuzz(examples: int):
    """Settings for one fuzz test: ``examples`` derandomized examples, no deadline (the interpreter is slow).

    The `device` fixture pins a backend for the whole test, which is what every example should run on.
    """
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LAYOUTS = st.sampled_from(["contiguous", "strided", "reversed", "broadcast_first", "broadcast_last"])
# Only the layouts a 1-D tensor of offsets can take and still hold offsets.
OFFSET_LAYOUTS = st.sampled_from(["contiguous", "strided"])

_POISON = {torch.bool: True, torch.uint8: 255, torch.int32: 1 << 30, torch.int64: 1 << 40}


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor of ``values``' shape, on its device, in ``layout``.

    "strided": every other element of a wider buffer, at an offset, the rest
    poisoned (NaN, or an out-of-range integer); "reversed": the dims in reverse
    order in memory; "broadcast_first" / "broadcast_last": the first slice along
    the first dim of size > 1 (or the last dim) expanded with stride 0, so the
    values change to that slice's, and the caller references what it gets back.
    """
    event(f"an input {layout}")  # --hypothesis-show-statistics: the share of examples with one
    if layout == "contiguous" or values.numel() == 0:
        return values.clone()
    if layout == "strided":
        poison = _POISON.get(values.dtype, float("nan"))
        buffer = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 1), poison, dtype=values.dtype,
                            device=values.device)
        buffer[..., 1::2] = values
        return buffer[..., 1::2]
    if layout == "reversed":
        order = list(reversed(range(values.dim())))
        return values.permute(order).contiguous().permute(order)
    if layout == "broadcast_first":
        dim = next((d for d, size in enumerate(values.shape) if size > 1), 0)
    else:
        dim = values.dim() - 1
    return values.narrow(dim, 0, 1).clone().expand(values.shape)


def grads_of(output, inputs, cotangent):
    """The gradients of ``output`` for ``inputs`` (zeros for one it does not depend on)."""
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(output, present, cotangent, allow_unused=True, materialize_grads=True)


def reference_and_stock(fn, inputs, cotangent):
    """[(output, gradients) of ``fn`` in float64, and the same computed by stock PyTorch in the inputs' dtype].

    On detached CPU copies: the references never see the layouts under test.
    """
    results = []
    for dtype in (torch.float64, None):
        leaves = [None if t is None else t.detach().cpu().to(dtype or t.dtype).requires_grad_() for t in inputs]
        output = fn(*leaves)
        results.append((output, grads_of(output, leaves, cotangent.cpu().to(dtype or cotangent.dtype))))
    return results


def random(shape, dtype, device, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------
# Cross-entropy over existing logits, and fused with the LM head
# ----------------------------------------------------------------------------


@st.composite
def ce_options(draw):
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    normalizer = draw(st.sampled_from([None, 7.0, "tensor"])) if reduction == "mean" else None
    return dict(
        ignore_index=draw(st.sampled_from([-100, 0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 3.0, 30.0])),
        reduction=reduction,
        normalizer=torch.tensor(5.0) if normalizer == "tensor" else normalizer,
    )


def ce_target(row_shape, vocab, ignore_index, generator, device, layout):
    target = torch.randint(0, vocab, row_shape, generator=generator)
    target[torch.rand(row_shape, generator=generator) < 0.25] = ignore_index
    return laid_out(target.to(device), layout)


def loss_cotangent(loss, generator, layout):
    # A random weight per row for reduction="none", so each row's gradient counts differently.
    cotangent = torch.rand(loss.shape, generator=generator).to(device=loss.device) + 0.5
    return laid_out(cotangent, layout) if loss.dim() else cotangent


def assert_loss_and_grads(loss, grads, results, names, term_scales, dtype, assert_within_tolerance):
    """``term_scales``: per gradient, the magnitude of its terms. A gradient can cancel to exactly 0 (one
    class, or a softmax that is exactly 1) where the kernel's recomputed logits leave a rounding's worth."""
    (loss64, grads64), (stock, stock_grads) = results
    assert loss.dtype == torch.float32
    assert_within_tolerance("loss", loss, loss64, stock, dtype)
    for name, grad, grad64, stock_grad, terms in zip(names, grads, grads64, stock_grads, term_scales):
        scale = max(grad64.abs().max().item() if grad64.numel() else 0.0, terms)
        assert_within_tolerance(name, grad, grad64, stock_grad, dtype, scale=scale)


def magnitude(*tensors) -> float:
    """The product of the tensors' largest magnitudes: the size of one term of their product."""
    result = 1.0
    for t in tensors:
        result *= t.detach().abs().max().item() if t.numel() else 0.0
    return result


@fuzz(100)
@given(data=st.data())
def test_cross_entropy(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    row_shape = draw(st.sampled_from([(0,), (1,), (9,), (2, 7)]))
    vocab = draw(st.integers(1, 300))
    options = draw(ce_options())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    logits = laid_out(random((*row_shape, vocab), dtype, device, generator, scale=3.0), draw(LAYOUTS))
    logits.requires_grad_()
    target = ce_target(row_shape, vocab, options["ignore_index"], generator, device, draw(LAYOUTS))

    loss = cross_entropy(logits, target, **options)
    cotangent = loss_cotangent(loss, generator, draw(LAYOUTS))
    grads = grads_of(loss, [logits], cotangent)

    def reference(x):
        losses = cross_entropy_ref(x.reshape(-1, vocab), target.cpu().reshape(-1), **options)
        return losses.reshape(row_shape) if options["reduction"] == "none" else losses

    results = reference_and_stock(reference, [logits], cotangent)
    assert_loss_and_grads(loss, grads, results, ["d_logits"], [magnitude(cotangent)], dtype, assert_within_tolerance)


@fuzz(80)
@given(data=st.data())
def test_linear_cross_entropy(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    row_shape = draw(st.sampled_from([(0,), (1,), (9,), (2, 7)]))
    hidden_size = draw(st.sampled_from([8, 16, 24]))
    vocab = draw(st.integers(1, 300))
    options = draw(ce_options())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    hidden = laid_out(random((*row_shape, hidden_size), dtype, device, generator), draw(LAYOUTS))
    weight = laid_out(random((vocab, hidden_size), dtype, device, generator, scale=2 / hidden_size**0.5),
                      draw(LAYOUTS))
    bias = laid_out(random((vocab,), dtype, device, generator), draw(LAYOUTS)) if draw(st.booleans()) else None
    inputs = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    target = ce_target(row_shape, vocab, options["ignore_index"], generator, device, draw(LAYOUTS))
    # Both strategies by name, and the automatic choice; the chunked one takes only a scalar loss.
    strategy = draw(st.sampled_from(["auto", "atomic"] + ([] if options["reduction"] == "none" else ["chunked"])))
    event(f"strategy: {strategy}")

    if draw(st.booleans()):  # the module, holding its options
        normalizer = options.pop("normalizer")
        loss = LinearCrossEntropyLoss(**options, strategy=strategy)(hidden, weight, target, bias=bias,
                                                                    normalizer=normalizer)
        options["normalizer"] = normalizer
    else:
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, strategy=strategy, **options)
    cotangent = loss_cotangent(loss, generator, draw(LAYOUTS))
    grads = grads_of(loss, inputs, cotangent)

    def reference(h, w, b=None):
        logits = h.reshape(-1, hidden_size) @ w.T + (0 if b is None else b)
        losses = cross_entropy_ref(logits, target.cpu().reshape(-1), **options)
        return losses.reshape(row_shape) if options["reduction"] == "none" else losses

    results = reference_and_stock(reference, inputs, cotangent)
    term_scales = [magnitude(cotangent, weight), magnitude(cotangent, hidden), magnitude(cotangent)]
    assert_loss_and_grads(loss, grads, results, ["d_hidden", "d_weight", "d_bias"], term_scales, dtype,
                          assert_within_tolerance)


# ----------------------------------------------------------------------------
# Attention, padded and packed
# ----------------------------------------------------------------------------


@st.composite
def attention_options(draw):
    window = draw(st.sampled_from([None, "drawn"]))
    if window == "drawn":
        window = (draw(st.integers(-1, 9)), draw(st.integers(-1, 9)))
    return dict(
        causal=draw(st.booleans()),
        softmax_scale=draw(st.sampled_from([None, 0.2, 1.0])),
        window=window,
        softcap=draw(st.sampled_from([None, 5.0])),
        # The backward: one pass with atomic dq, the two-pass one, or PyTorch's flag's choice.
        deterministic=draw(st.sampled_from([None, False, True])),
    )


def assert_attention(actual, results, dtype, assert_within_tolerance):
    (out64, grads64), (stock, stock_grads) = results
    reference, stock_all = [out64, *grads64], [stock, *stock_grads]
    # One scale for all four: with one visible key dq is exactly 0, though its terms are not.
    scale = max((r.abs().max().item() for r in reference if r.numel()), default=0.0)
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), actual, reference, stock_all):
        assert_within_tolerance(name, a, r, s, dtype, scale=scale)


@fuzz(40)
@given(data=st.data())
def test_flash_attention(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    batch, kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    seqlen_q, seqlen_k = draw(st.integers(1, 80)), draw(st.integers(1, 80))  # past one 64-query block
    head_dim = draw(st.sampled_from([16, 32]))
    options = draw(attention_options())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    q = laid_out(random((batch, kv_heads * group, seqlen_q, head_dim), dtype, device, generator), draw(LAYOUTS))
    k, v = (laid_out(random((batch, kv_heads, seqlen_k, head_dim), dtype, device, generator), draw(LAYOUTS))
            for _ in range(2))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    if draw(st.booleans()):
        keep = torch.rand(batch, seqlen_k, generator=generator) > 0.3
        options["key_padding_mask"] = laid_out(keep.to(device), draw(LAYOUTS))
    dout = laid_out(random(q.shape, dtype, device, generator), draw(LAYOUTS))

    out = flash_attention(q, k, v, **options)
    actual = [out, *grads_of(out, inputs, dout)]
    mask = options.pop("key_padding_mask", None)
    options.pop("deterministic")
    results = reference_and_stock(
        lambda *t: attention_ref(*t, key_padding_mask=None if mask is None else mask.cpu(), **options), inputs, dout)
    assert_attention(actual, results, dtype, assert_within_tolerance)


@fuzz(40)
@given(data=st.data())
def test_flash_attention_varlen(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    sequences = draw(st.integers(1, 3))
    lengths_q = draw(st.lists(st.integers(0, 40), min_size=sequences, max_size=sequences))
    lengths_k = draw(st.lists(st.integers(0, 40), min_size=sequences, max_size=sequences))
    kv_heads, group, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([16, 32]))
    options = draw(attention_options())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    q = laid_out(random((sum(lengths_q), kv_heads * group, head_dim), dtype, device, generator), draw(LAYOUTS))
    k, v = (laid_out(random((sum(lengths_k), kv_heads, head_dim), dtype, device, generator), draw(LAYOUTS))
            for _ in range(2))
    inputs = [t.requires_grad_() for t in (q, k, v)]
    offsets_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    cu_seqlens = [laid_out(torch.tensor([0, *lengths], dtype=offsets_dtype).cumsum(0).to(offsets_dtype).to(device),
                           draw(OFFSET_LAYOUTS)) for lengths in (lengths_q, lengths_k)]
    slack = draw(st.sampled_from([0, 5]))  # max_seqlen may be an upper bound
    dout = laid_out(random(q.shape, dtype, device, generator), draw(LAYOUTS))

    out = flash_attention_varlen(q, k, v, *cu_seqlens, max(lengths_q) + slack, max(lengths_k) + slack, **options)
    actual = [out, *grads_of(out, inputs, dout)]
    options.pop("deterministic")

    def per_sequence_reference(q, k, v):
        ends_q, ends_k = torch.tensor(lengths_q).cumsum(0).tolist(), torch.tensor(lengths_k).cumsum(0).tolist()
        outputs = []
        for end_q, length_q, end_k, length_k in zip(ends_q, lengths_q, ends_k, lengths_k):
            as_batch = lambda t, end, length: t[end - length:end].transpose(0, 1)[None]  # noqa: E731
            out = attention_ref(as_batch(q, end_q, length_q), as_batch(k, end_k, length_k),
                                as_batch(v, end_k, length_k), **options)
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs)

    results = reference_and_stock(per_sequence_reference, inputs, dout)
    assert_attention(actual, results, dtype, assert_within_tolerance)


# ----------------------------------------------------------------------------
# LoRA over a dense or NF4 base, and NF4 itself
# ----------------------------------------------------------------------------


def nf4_laid_out(weight: NF4Weight, packed_layout: str, absmax_layout: str) -> NF4Weight:
    """``weight`` with its bytes and block scales in other layouts (plain absmax: its scales are one tensor)."""
    return NF4Weight(packed=laid_out(weight.packed, packed_layout), absmax=laid_out(weight.absmax, absmax_layout),
                     shape=weight.shape, dtype=weight.dtype, blocksize=weight.blocksize)


def contiguous_nf4(weight: NF4Weight) -> NF4Weight:
    return NF4Weight(packed=weight.packed.contiguous(), absmax=weight.absmax.contiguous(), shape=weight.shape,
                     dtype=weight.dtype, blocksize=weight.blocksize)


@fuzz(80)
@given(data=st.data())
def test_lora_linear(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    lora_dtype = draw(st.sampled_from([dtype, torch.float32]))
    batch_shape = draw(st.sampled_from([(0,), (1,), (13,), (2, 5)]))
    in_features, out_features = draw(st.sampled_from([16, 24, 40])), draw(st.sampled_from([8, 16, 33]))
    rank, scaling = draw(st.sampled_from([1, 4, 8])), draw(st.sampled_from([0.5, 2.0]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    x = laid_out(random((*batch_shape, in_features), dtype, device, generator), draw(LAYOUTS))
    dense = random((out_features, in_features), dtype, device, generator, scale=in_features**-0.5)
    if draw(st.booleans()):
        quantized = quantize_nf4(dense, blocksize=draw(st.sampled_from([32, 64])), double_quant=False)
        base = nf4_laid_out(quantized, draw(LAYOUTS), draw(LAYOUTS))
        dense = dequantize_nf4(contiguous_nf4(base))  # what the kernel must read, through another path
    else:
        base = dense = laid_out(dense, draw(LAYOUTS))
    lora_a = laid_out(random((rank, in_features), lora_dtype, device, generator, scale=in_features**-0.5),
                      draw(LAYOUTS))
    lora_b = laid_out(random((out_features, rank), lora_dtype, device, generator, scale=rank**-0.5), draw(LAYOUTS))
    bias = laid_out(random((out_features,), dtype, device, generator), draw(LAYOUTS)) if draw(st.booleans()) else None
    inputs = [t.requires_grad_() for t in (x, lora_a, lora_b, bias) if t is not None]
    dy = laid_out(random((*batch_shape, out_features), dtype, device, generator), draw(LAYOUTS))

    y = lora_linear(x, base, lora_a, lora_b, scaling=scaling, bias=bias)
    actual = [y, *grads_of(y, inputs, dy)]

    # The kernels cast the adapters' tiles to x's dtype: the reference starts from the same values.
    def reference(x, a, b, bias=None):
        return lora_linear_ref(x, dense.to(x.dtype).cpu(), a.to(dtype).to(x.dtype), b.to(dtype).to(x.dtype),
                               scaling=scaling, bias=bias)

    (y64, grads64), (stock, stock_grads) = reference_and_stock(reference, inputs, dy)
    for name, a, r, s in zip(("y", "dx", "d_lora_a", "d_lora_b", "d_bias"), actual, [y64, *grads64],
                             [stock, *stock_grads]):
        assert a.dtype == (lora_dtype if name in ("d_lora_a", "d_lora_b") else dtype), name
        assert_within_tolerance(name, a, r, s, dtype)


@fuzz(100)
@given(data=st.data())
def test_nf4_quantize_and_dequantize(data, assert_within_tolerance):
    # NF4 runs in PyTorch on any device (no Triton path): every layout must give the contiguous tensor's codes.
    draw = data.draw
    dtype = draw(DTYPES)
    shape = (draw(st.integers(1, 9)), draw(st.integers(1, 70)))
    blocksize, double_quant = draw(st.sampled_from([32, 64, 128])), draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    weight = laid_out(random(shape, dtype, "cpu", generator), draw(LAYOUTS))

    quantized = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    expected = quantize_nf4(weight.contiguous(), blocksize=blocksize, double_quant=double_quant)
    for name in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
        ours, theirs = getattr(quantized, name), getattr(expected, name)
        assert (ours is None) == (theirs is None) and (ours is None or torch.equal(ours, theirs)), name

    plain = quantize_nf4(weight, blocksize=blocksize, double_quant=False)
    laid = nf4_laid_out(plain, draw(LAYOUTS), draw(LAYOUTS))
    codes = torch.stack([laid.packed >> 4, laid.packed & 0xF], dim=-1).flatten()[:weight.numel()].long()
    scales = laid.absmax.double().repeat_interleave(blocksize)[:weight.numel()]
    reference64 = (NF4_CODE.double()[codes] * scales).view(shape)
    assert_within_tolerance("dequantized", dequantize_nf4(laid), reference64, reference64.to(dtype), dtype)


# ----------------------------------------------------------------------------
# The layer kernels: RMSNorm, LayerNorm, RoPE, SwiGLU/GeGLU
# ----------------------------------------------------------------------------


def assert_outputs_and_grads(names, actual, results, dtype, assert_within_tolerance):
    """``actual``: outputs then gradients, in ``names``' order; ``results`` as reference_and_stock returns them.

    One scale for all: a norm's gradient for x sums to 0 along a row and can cancel to exactly 0
    (one column, or a constant row) where its terms do not."""
    (outputs64, grads64), (stock, stock_grads) = results
    outputs64, stock = (list(o) if isinstance(o, tuple) else [o] for o in (outputs64, stock))
    reference, stock_all = [*outputs64, *grads64], [*stock, *stock_grads]
    scale = max((r.abs().max().item() for r in reference if r.numel()), default=0.0)
    for name, a, r, s in zip(names, actual, reference, stock_all, strict=True):
        assert a.dtype == s.dtype, f"{name}: dtype {a.dtype}, stock PyTorch's {s.dtype}"
        assert_within_tolerance(name, a, r, s, dtype, scale=scale)


def outputs_and_cotangents(result, generator, draw):
    """(outputs, a cotangent for each in a drawn layout): a norm with a residual returns (out, s)."""
    outputs = list(result) if isinstance(result, tuple) else [result]
    return outputs, [laid_out(random(o.shape, o.dtype, o.device, generator), draw(LAYOUTS)) for o in outputs]


@fuzz(60)
@given(data=st.data())
def test_norms(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    kind = draw(st.sampled_from(["rms", "layer"]))
    row_shape = draw(st.sampled_from([(1,), (9,), (2, 7)]))
    hidden = draw(st.sampled_from([1, 5, 77, 130]))
    eps = draw(st.sampled_from([1e-6, 1e-2]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    x = laid_out(random((*row_shape, hidden), dtype, device, generator, scale=2.0), draw(LAYOUTS))
    residual = (laid_out(random(x.shape, dtype, device, generator), draw(LAYOUTS)) if draw(st.booleans())
                else None)
    if kind == "rms":
        # Llama keeps an fp32 weight under a 16-bit activation in some checkpoints: the output promotes.
        weight_dtype = draw(st.sampled_from([dtype, torch.float32]))
        offset = draw(st.sampled_from([0.0, 1.0]))
        cast = draw(st.sampled_from([None, "llama", "gemma"]))
        weight = laid_out(random((hidden,), weight_dtype, device, generator, scale=0.5) + (1 - offset),
                          draw(LAYOUTS))
        bias = None
        options = dict(eps=eps, offset=offset, residual=residual, cast=cast)
        kernel = lambda x, weight, bias, **options: rms_norm(x, weight, **options)  # noqa: E731
        reference_fn = lambda x, weight, bias, **options: rms_norm_ref(x, weight, **options)  # noqa: E731
    else:
        weight = laid_out(random((hidden,), dtype, device, generator, scale=0.5) + 1, draw(LAYOUTS))
        bias = laid_out(random((hidden,), dtype, device, generator), draw(LAYOUTS)) if draw(st.booleans()) else None
        options = dict(eps=eps, residual=residual)
        kernel, reference_fn = layer_norm, layer_norm_ref
    event(f"{kind} norm{' + residual' if residual is not None else ''}")
    inputs = [t.requires_grad_() for t in (x, weight, bias, residual) if t is not None]

    outputs, cotangents = outputs_and_cotangents(kernel(x, weight, bias, **options), generator, draw)
    grads = grads_of(outputs, inputs, cotangents)

    def reference(x, weight, *rest):
        bias_, residual_ = (rest[0], rest[1:]) if bias is not None else (None, rest)
        return reference_fn(x, weight, bias_, **{**options, "residual": residual_[0] if residual_ else None})

    results = []
    for reference_dtype in (torch.float64, None):  # reference_and_stock, with one cotangent per output
        leaves = [t.detach().cpu().to(reference_dtype or t.dtype).requires_grad_() for t in inputs]
        result = reference(*leaves)
        result_list = list(result) if isinstance(result, tuple) else [result]
        cotangents_here = [c.cpu().to(reference_dtype or c.dtype) for c in cotangents]
        results.append((result, grads_of(result_list, leaves, cotangents_here)))
    names = (["out", "s"][:len(outputs)] + ["dx", "dweight"] + (["dbias"] if bias is not None else [])
             + (["dresidual"] if residual is not None else []))
    assert_outputs_and_grads(names, [*outputs, *grads], results, dtype, assert_within_tolerance)


@fuzz(40)
@given(data=st.data())
def test_apply_rotary(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    cos_dtype = draw(st.sampled_from([dtype, torch.float32]))
    batch, seq = draw(st.integers(1, 2)), draw(st.sampled_from([1, 5, 17]))
    kv_heads, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3]))
    head_dim = draw(st.sampled_from([8, 16, 80]))
    rotary_dim = draw(st.sampled_from([d for d in (2, 8, 16, 32, 80) if d <= head_dim]))
    heads_first = draw(st.booleans())  # (B, H, S, D) with unsqueeze_dim=1, or (B, S, H, D) with 2
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))

    def heads(count):
        shape = (batch, count, seq, head_dim) if heads_first else (batch, seq, count, head_dim)
        return laid_out(random(shape, dtype, device, generator), draw(LAYOUTS))

    q, k = heads(kv_heads * group), heads(kv_heads)
    # Angles as a rotary embedding makes them: the two halves repeat (cat(freqs, freqs)); positions may
    # restart inside a row (packed sequences), so any angle per (row, position).
    half = random((batch, seq, rotary_dim // 2), torch.float32, "cpu", generator, scale=3.0)
    angles = torch.cat([half, half], dim=-1)
    cos, sin = (laid_out(f(angles).to(device=device, dtype=cos_dtype), draw(LAYOUTS)) for f in (torch.cos, torch.sin))
    options = dict(unsqueeze_dim=1 if heads_first else 2)
    inputs = [t.requires_grad_() for t in (q, k)]

    outputs, cotangents = outputs_and_cotangents(apply_rotary(q, k, cos, sin, **options), generator, draw)
    grads = grads_of(outputs, inputs, cotangents)

    results = []
    for reference_dtype in (torch.float64, None):
        leaves = [t.detach().cpu().to(reference_dtype or t.dtype).requires_grad_() for t in inputs]
        angles_here = [t.cpu().to(reference_dtype or t.dtype) for t in (cos, sin)]
        result = apply_rotary_ref(*leaves, *angles_here, **options)
        results.append((result, grads_of(list(result), leaves,
                                         [c.cpu().to(reference_dtype or c.dtype) for c in cotangents])))
    assert_outputs_and_grads(["q_out", "k_out", "dq", "dk"], [*outputs, *grads], results, dtype,
                             assert_within_tolerance)


@fuzz(40)
@given(data=st.data())
def test_gated_activations(device, data, assert_within_tolerance):
    draw = data.draw
    dtype = draw(DTYPES)
    activation = draw(st.sampled_from(["swiglu", "geglu-tanh", "geglu-none"]))
    shape = draw(st.sampled_from([(0, 5), (1,), (9, 77), (2, 3, 130)]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    gate, up = (laid_out(random(shape, dtype, device, generator, scale=3.0), draw(LAYOUTS)) for _ in range(2))
    inputs = [t.requires_grad_() for t in (gate, up)]
    if activation == "swiglu":
        kernel, reference_fn = swiglu, swiglu_ref
    else:
        approximate = activation.removeprefix("geglu-")
        kernel = lambda g, u: geglu(g, u, approximate)  # noqa: E731
        reference_fn = lambda g, u: geglu_ref(g, u, approximate)  # noqa: E731
    event(activation)

    out = kernel(gate, up)
    cotangent = laid_out(random(shape, dtype, device, generator), draw(LAYOUTS))
    results = reference_and_stock(reference_fn, inputs, cotangent)
    assert_outputs_and_grads(["out", "dgate", "dup"], [out, *grads_of(out, inputs, cotangent)], results, dtype,
                             assert_within_tolerance)


# ----------------------------------------------------------------------------
# 8-bit AdamW
# ----------------------------------------------------------------------------


@fuzz(60)
@given(data=st.data())
def test_adamw8bit_step(device, data, assert_within_tolerance):
    draw = data.draw
    shapes = draw(st.lists(st.sampled_from([(7,), (3, 5), (300,), (17, 256)]), min_size=1, max_size=3))
    param_dtype = draw(DTYPES)
    grad_dtype = draw(st.sampled_from([param_dtype, torch.float32]))
    state_bits = draw(st.sampled_from([8, 32]))
    hyper = dict(lr=draw(st.sampled_from([1e-3, 3e-2])), betas=draw(st.sampled_from([(0.9, 0.999), (0.0, 0.5)])),
                 eps=draw(st.sampled_from([1e-8, 1e-3])), weight_decay=draw(st.sampled_from([0.0, 0.1])))
    scaler = draw(st.sampled_from([None, "finite", "overflow"]))
    grad_layout = draw(st.one_of(st.just("contiguous"), LAYOUTS))  # mostly a step, sometimes a refusal
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1 << 16)))
    params = [random(shape, param_dtype, device, generator) for shape in shapes]
    grads = [laid_out(random(shape, grad_dtype, device, generator, scale=2.0), grad_layout) for shape in shapes]
    states = [adamw8bit_init_state(p, state_bits=state_bits) for p in params]
    for _ in range(draw(st.integers(0, 1))):  # a first step, so the state is not all zeros
        adamw8bit_step(params, [g.contiguous() for g in grads], states, **hyper)
    scaling = {}
    if scaler is not None:
        scaling = dict(grad_scale=torch.full((1,), 2.0, device=device),
                       found_inf=torch.full((1,), float(scaler == "overflow"), device=device))
    params_before = [p.clone() for p in params]
    states_before = [{key: t.clone() for key, t in s.items()} for s in states]

    if any(not g.is_contiguous() for g in grads):
        # The step reads gradients flat: another layout is refused by name, and nothing changes.
        event("refused: a gradient not contiguous")
        with pytest.raises(ValueError, match=r"grads\[\d\] must be contiguous"):
            adamw8bit_step(params, grads, states, **hyper, **scaling)
        assert all(torch.equal(p, p0) for p, p0 in zip(params, params_before))
        return
    adamw8bit_step(params, grads, states, **hyper, **scaling)

    for i, (p0, g, s0, p, s) in enumerate(zip(params_before, grads, states_before, params, states)):
        if scaler == "overflow":  # an overflowed step changes nothing, its count included
            assert torch.equal(p, p0) and all(torch.equal(s[key], s0[key]) for key in s), i
            continue
        ref_param, ref_m, ref_v, ref_state = adamw8bit_step_ref(p0, g, s0, **hyper,
                                                                grad_scale=scaling.get("grad_scale"))
        assert_within_tolerance(f"param[{i}]", p.reshape(-1), ref_param, ref_param.to(param_dtype), param_dtype)
        assert s["step"].item() == ref_state["step"].item()
        for key, signed, exact in (("1", True, ref_m), ("2", False, ref_v)):
            if state_bits == 32:
                torch.testing.assert_close(s["state" + key].reshape(-1).double().cpu(), exact, rtol=1e-5, atol=1e-7)
                continue
            # Codes nearest the fp32 value; at a midpoint between two codes fp32 and float64 may round apart.
            torch.testing.assert_close(s["absmax" + key].double().cpu(), ref_state["absmax" + key], rtol=1e-5, atol=0)
            assert (s["state" + key].reshape(-1).long().cpu() - ref_state["state" + key].long()).abs().max() <= 1
            code = dynamic_map(signed).double()
            absmax = s["absmax" + key].double().cpu().repeat_interleave(256)[:exact.numel()]
            dequantized = code[s["state" + key].reshape(-1).long().cpu()] * absmax
            step = (code[1:] - code[:-1]).max() * absmax
            assert ((dequantized - exact).abs() <= step + 1e-12).all(), key


# ----------------------------------------------------------------------------
# Options: a bad value is refused by name, never run
# ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
_q, _kv = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 7, 16)
_packed = torch.randn(7, 2, 16)
_cu = torch.tensor([0, 3, 7])
_hidden, _weight, _target = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 3, 9, 1])
_x, _base, _a, _b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
_param = torch.randn(300)
_angles = torch.randn(1, 5, 8)

# option -> (call with that option set, the values it refuses, the name the error gives)
BAD_OPTIONS = {
    "attention.softmax_scale": (lambda value: flash_attention(_q, _kv, _kv, softmax_scale=value),
                                [INF, -INF, NAN, 0.0, -0.5, "0.1", True], "softmax_scale"),
    "attention.softcap": (lambda value: flash_attention(_q, _kv, _kv, softcap=value), [INF, NAN, 0, -2.0, "5"],
                          "softcap"),
    "attention.dropout_p": (lambda value: flash_attention(_q, _kv, _kv, dropout_p=value),
                            [1.0, 1.5, -0.1, NAN, INF, None], "dropout_p"),
    "attention.window": (lambda value: flash_attention(_q, _kv, _kv, window=(value, 2)), [-2, 1.5, True, None],
                         "window[0]"),
    "attention.deterministic": (lambda value: flash_attention(_q, _kv, _kv, deterministic=value), [0, 1, "yes"],
                                "deterministic"),
    "varlen.max_seqlen_q": (lambda value: flash_attention_varlen(_packed, _packed, _packed, _cu, _cu, value, 7),
                            [-1, 7.0, None, True], "max_seqlen_q"),
    "varlen.cu_seqlens_k": (lambda value: flash_attention_varlen(_packed, _packed, _packed, _cu, value, 7, 7),
                            [torch.tensor([0, 3, 8]), torch.tensor([1, 3, 7]), torch.tensor([0, 5, 3, 7][1:]),
                             torch.tensor([0.0, 3.0, 7.0]), torch.tensor([[0, 3, 7]]), [0, 3, 7]], "cu_seqlens_k"),
    "varlen.softcap": (lambda value: flash_attention_varlen(_packed, _packed, _packed, _cu, _cu, 7, 7, softcap=value),
                       [INF, NAN], "softcap"),
    "cross_entropy.label_smoothing": (lambda value: cross_entropy(_hidden, _target[:4] % 8, label_smoothing=value),
                                      [-0.1, 1.5, NAN, INF, "0.1"], "label_smoothing"),
    "cross_entropy.z_loss": (lambda value: cross_entropy(_hidden, _target % 8, z_loss=value), [NAN, INF, -1e-4],
                             "z_loss"),
    "cross_entropy.softcap": (lambda value: cross_entropy(_hidden, _target % 8, softcap=value), [INF, NAN, 0.0, -1],
                              "softcap"),
    "cross_entropy.ignore_index": (lambda value: cross_entropy(_hidden, _target % 8, ignore_index=value),
                                   [-100.0, 1.5, "x", None, True], "ignore_index"),
    "cross_entropy.target": (lambda value: cross_entropy(_hidden, value),
                             [torch.tensor([0, 8, 1, 2]), torch.tensor([-1, 0, 1, 2]), torch.tensor([0.0, 1, 2, 3]),
                              torch.tensor([0, 1, 2])], "target"),
    "linear_cross_entropy.normalizer": (lambda value: linear_cross_entropy(_hidden, _weight, _target, normalizer=value),
                                        [0, -3.0, NAN, INF, torch.tensor(0.0), torch.tensor(-2), torch.ones(2),
                                         torch.tensor(True), "4"], "normalizer"),
    "linear_cross_entropy.weight": (lambda value: linear_cross_entropy(_hidden, value, _target),
                                    [_weight[:0], _weight[0], _weight.long()], "weight"),
    "linear_cross_entropy.reduction": (lambda value: linear_cross_entropy(_hidden, _weight, _target, reduction=value),
                                       ["avg", None], "reduction"),
    "linear_cross_entropy.strategy": (lambda value: linear_cross_entropy(_hidden, _weight, _target, strategy=value),
                                      ["fast", "Chunked", None, 1], "strategy"),
    "lora_linear.scaling": (lambda value: lora_linear(_x, _base, _a, _b, scaling=value), [NAN, INF, "1", None],
                            "scaling"),
    "lora_linear.dropout_p": (lambda value: lora_linear(_x, _base, _a, _b, scaling=1.0, dropout_p=value),
                              [1.0, -0.5, NAN], "dropout_p"),
    "adamw8bit_step.lr": (lambda value: adamw8bit_step([_param], [_param], [adamw8bit_init_state(_param)], lr=value),
                          [NAN, INF, -1e-3, "1e-3", None], "lr"),
    "adamw8bit_step.betas": (lambda value: adamw8bit_step([_param], [_param], [adamw8bit_init_state(_param)],
                                                          lr=1e-3, betas=(0.9, value)), [1.0, NAN, -0.1], "betas[1]"),
    "adamw8bit_step.eps": (lambda value: adamw8bit_step([_param], [_param], [adamw8bit_init_state(_param)],
                                                        lr=1e-3, eps=value), [-1e-8, NAN], "eps"),
    "adamw8bit_step.weight_decay": (lambda value: adamw8bit_step([_param], [_param], [adamw8bit_init_state(_param)],
                                                                 lr=1e-3, weight_decay=value), [INF, -0.1],
                                    "weight_decay"),
    "quantize_nf4.blocksize": (lambda value: quantize_nf4(_base, blocksize=value), [48, 64.0, 0], "blocksize"),
    "rms_norm.eps": (lambda value: rms_norm(_hidden, _hidden[0], eps=value), [-1e-6, NAN, INF, "1e-6", None], "eps"),
    "rms_norm.offset": (lambda value: rms_norm(_hidden, _hidden[0], offset=value), [NAN, INF, "1"], "offset"),
    "rms_norm.cast": (lambda value: rms_norm(_hidden, _hidden[0], cast=value), ["Llama", "fp32", 1], "cast"),
    "rms_norm.weight": (lambda value: rms_norm(_hidden, value), [_hidden[0, :7], _hidden, _target], "weight"),
    "rms_norm.residual": (lambda value: rms_norm(_hidden, _hidden[0], residual=value),
                          [_hidden[:3], _hidden.half(), _hidden.long()], "residual"),
    "layer_norm.eps": (lambda value: layer_norm(_hidden, _hidden[0], None, eps=value), [-1.0, NAN, INF], "eps"),
    "layer_norm.bias": (lambda value: layer_norm(_hidden, _hidden[0], value), [_hidden[0, :3], _hidden], "bias"),
    "apply_rotary.unsqueeze_dim": (lambda value: apply_rotary(_q, _kv[..., :5, :], _angles, _angles,
                                                              unsqueeze_dim=value), [1.0, "1", 7], "unsqueeze_dim"),
    "geglu.approximate": (lambda value: geglu(_hidden, _hidden, value), ["erf", None, True], "approximate"),
    "swiglu.up": (lambda value: swiglu(_hidden, value), [_hidden[:3], _hidden.half(), _hidden.T], "up"),
}


@fuzz(200)
@given(option=st.sampled_from(sorted(BAD_OPTIONS)), data=st.data())
def test_a_bad_option_is_refused_by_name(option, data):
    call, bad_values, name = BAD_OPTIONS[option]
    value = data.draw(st.sampled_from(bad_values))
    event(f"refused: {option}")
    with pytest.raises((ValueError, TypeError)) as refused:
        call(value)
    assert str(refused.value).startswith(name), (option, value, str(refused.value))
