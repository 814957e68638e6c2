"""Fused linear cross-entropy and cross-entropy over logits: all tiers.

Every case runs on each backend of the `device` fixture (interpreter, PyTorch
path, CUDA) against a float64 reference, with the tolerance rule measured
against stock PyTorch in the same dtype.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.bench.memory import TensorSizeTracker
from ember.kernels import cross_entropy, linear_cross_entropy
from ember.kernels import launch as launch_module
from ember.kernels.backend import backend_for, forced_backend, interpreting
from ember.kernels.cross_entropy import cross_entropy_ref, linear_cross_entropy_ref

# The module, not the function of the same name that ember.kernels exports.
module = importlib.import_module("ember.kernels.cross_entropy")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

OPTION_SETS = {
    "plain": dict(),
    "ignore+smoothing": dict(label_smoothing=0.1, ignore_rows=True),
    "zloss+softcap+bias": dict(z_loss=1e-3, softcap=7.0, bias=True),
    "sum+everything": dict(reduction="sum", label_smoothing=0.05, z_loss=1e-4, softcap=20.0, bias=True,
                           ignore_rows=True),
    "none": dict(reduction="none", ignore_rows=True),
    "normalizer": dict(normalizer=1000.0, ignore_rows=True),
}

# (N rows, H, V): a single row, odd row counts, vocabularies that are not
# multiples of any block (and, with 300, split across programs).
LINEAR_SHAPES = [(1, 16, 17), (37, 48, 300), (77, 40, 1000)]


STRATEGIES = ["atomic", "chunked"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so the chunked strategy's tests cross chunk edges and sum d(weight) over chunks:
    at V 1000, 10 rows in fp32 and 20 in 16-bit, and d(weight)'s fp32 accumulation runs in vocabulary slices.
    (A batch of one row is one chunk: d(weight) is then a single matmul.)"""
    monkeypatch.setattr(module, "CHUNK_BYTES", 40_000)


def _make_case(n_rows, hidden_size, vocab, dtype, device, options, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5 * 2
    bias = torch.randn(vocab, generator=generator) if options.get("bias") else None
    target = torch.randint(0, vocab, (n_rows,), generator=generator)
    if options.get("ignore_rows") and n_rows > 1:
        target[torch.rand(n_rows, generator=generator) < 0.3] = -100
        target[0] = -100
    kwargs = {k: v for k, v in options.items() if k not in ("bias", "ignore_rows")}
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), target.to(device), kwargs


def _grads(loss, tensors):
    # Backprop a random cotangent for "none", so each row's gradient is weighted differently.
    if loss.dim() > 0:
        cotangent = torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        loss = (loss * cotangent.to(device=loss.device, dtype=loss.dtype)).sum()
    present = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, present)


def _reference_pair(fn, inputs, kwargs):
    """(float64 result and grads, stock PyTorch in the inputs' dtype)."""
    results = []
    for dtype in (torch.float64, None):
        leaves = [None if t is None else t.detach().cpu().to(dtype or t.dtype).requires_grad_() for t in inputs]
        with forced_backend("torch"):
            loss = fn(*leaves)
        results.append((loss, _grads(loss, leaves)))
    return results


@pytest.mark.parametrize("options_name", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "N{}xH{}xV{}".format(*s))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_cross_entropy_matches_reference(device, strategy, shape, dtype, options_name,
                                                 assert_within_tolerance, small_chunks):
    options = OPTION_SETS[options_name]
    if strategy == "chunked" and options.get("reduction") == "none":
        pytest.skip("the chunked strategy takes a scalar loss; its refusal of 'none' is tested below")
    hidden, weight, bias, target, kwargs = _make_case(*shape, dtype, device, options, seed=hash(options_name) % 1000)

    loss = linear_cross_entropy(hidden, weight, target, bias=bias, strategy=strategy, **kwargs)
    grads = _grads(loss, [hidden, weight, bias])

    def reference(h, w, b):
        return linear_cross_entropy_ref(h, w, target.cpu(), bias=b, **kwargs)

    (loss64, grads64), (stock, stock_grads) = _reference_pair(reference, [hidden, weight, bias], kwargs)
    assert loss.dtype == torch.float32
    assert_within_tolerance("loss", loss, loss64, stock, dtype)
    for name, grad, grad64, stock_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, stock_grads):
        assert grad.dtype == dtype
        assert_within_tolerance(name, grad, grad64, stock_grad, dtype)


@pytest.mark.parametrize("vocab", [50257, 151936])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_cross_entropy_real_vocabularies(device, strategy, vocab, assert_within_tolerance, monkeypatch):
    if device == "cpu" and interpreting() and vocab > 60000:
        pytest.skip("the interpreter covers one real vocabulary; the largest runs on the PyTorch path and GPU")
    monkeypatch.setattr(module, "CHUNK_BYTES", 2 * vocab * 2)  # 2 fp16 rows a chunk: 3 chunks, the last of 1 row
    hidden, weight, bias, target, kwargs = _make_case(5, 16, vocab, torch.float16, device,
                                                      dict(bias=True, label_smoothing=0.1), seed=vocab)
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, strategy=strategy, **kwargs)
    grads = _grads(loss, [hidden, weight, bias])
    (loss64, grads64), (stock, stock_grads) = _reference_pair(
        lambda h, w, b: linear_cross_entropy_ref(h, w, target.cpu(), bias=b, **kwargs), [hidden, weight, bias], kwargs
    )
    assert_within_tolerance("loss", loss, loss64, stock, torch.float16)
    for name, grad, grad64, stock_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, stock_grads):
        assert_within_tolerance(name, grad, grad64, stock_grad, torch.float16)


# The 16-bit forward's Hopper tiles (hopper_only: sm_90 only; the interpreter runs configs[0]) run
# here as the spec's only config, in the interpreter and on any GPU: rows, hidden size and
# vocabulary each past one tile with a partial last one, vocabulary splits, bias, softcap and
# ignored rows.
FWD_16BIT = module._LINEAR_CE_FWD[False]


@pytest.mark.parametrize("index", FWD_16BIT.hopper_only,
                         ids=lambda i: "{BLOCK_N}x{BLOCK_V}x{BLOCK_H}".format(**FWD_16BIT.configs[i].kwargs))
def test_linear_cross_entropy_hopper_tiles_match_reference(device, index, assert_within_tolerance, monkeypatch):
    if backend_for(torch.empty(0, device=device)) != "triton":
        pytest.skip("the PyTorch path has no tiles")
    tile = dataclasses.replace(FWD_16BIT, configs=[FWD_16BIT.configs[index]], hopper_config=None, hopper_only=())
    monkeypatch.setitem(module._LINEAR_CE_FWD, False, tile)
    monkeypatch.setattr(launch_module, "_autotuned", {})  # no autotuner cached over the spec's full list
    options = dict(label_smoothing=0.1, z_loss=1e-4, softcap=20.0, bias=True, ignore_rows=True)
    hidden, weight, bias, target, kwargs = _make_case(150, 100, 600, torch.float16, device, options, seed=16)
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, strategy="atomic", **kwargs)
    grads = _grads(loss, [hidden, weight, bias])
    (loss64, grads64), (stock, stock_grads) = _reference_pair(
        lambda h, w, b: linear_cross_entropy_ref(h, w, target.cpu(), bias=b, **kwargs), [hidden, weight, bias], kwargs
    )
    assert_within_tolerance("loss", loss, loss64, stock, torch.float16)
    for name, grad, grad64, stock_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, grads64, stock_grads):
        assert_within_tolerance(name, grad, grad64, stock_grad, torch.float16)


def test_reference_agrees_with_torch_cross_entropy():
    # Anchors the reference's semantics to PyTorch's: smoothing, ignore_index, reductions.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 33, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 33, (50,), generator=generator)
    target[::4] = -100
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.2):
            ours = cross_entropy_ref(logits, target, label_smoothing=smoothing, reduction=reduction)
            theirs = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction=reduction)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_targets_ignored_gives_zero_loss_and_gradients(device, dtype, small_chunks):
    hidden, weight, bias, _, _ = _make_case(9, 16, 70, dtype, device, dict(bias=True), seed=1)
    target = torch.full((9,), -100, device=device)
    for strategy, reduction in [("atomic", "mean"), ("atomic", "sum"), ("atomic", "none"), ("chunked", "mean"),
                                ("chunked", "sum")]:
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction, z_loss=1e-3,
                                    strategy=strategy)
        grads = _grads(loss, [hidden, weight, bias])
        assert torch.all(loss == 0), strategy
        assert all(torch.all(g == 0) for g in grads), strategy


def test_empty_batch(device):
    hidden, weight, _, _, _ = _make_case(1, 16, 70, torch.float32, device, {}, seed=2)
    empty = hidden[:0]
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = linear_cross_entropy(empty, weight, target)
    assert loss.item() == 0.0
    (d_weight,) = torch.autograd.grad(loss, [weight])
    assert torch.all(d_weight == 0)
    assert linear_cross_entropy(empty, weight, target, reduction="none").shape == (0,)


def test_batched_hidden_and_strided_views(device):
    # (B, S, H) hidden sliced out of a wider buffer: row stride != H, no copy needed.
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 9, 40, generator=generator).to(device)
    hidden = wide[..., :24].requires_grad_()
    weight = torch.randn(130, 24, generator=generator).to(device).requires_grad_()
    target = torch.randint(0, 130, (2, 9), generator=generator).to(device)
    loss = linear_cross_entropy(hidden, weight, target, reduction="none")
    assert loss.shape == (2, 9)
    reference = linear_cross_entropy_ref(hidden.double(), weight.double(), target, reduction="none")
    torch.testing.assert_close(loss.double(), reference.reshape(2, 9), rtol=1e-5, atol=1e-5)
    d_hidden, d_weight = torch.autograd.grad(loss.sum(), [hidden, weight])
    ref_hidden, ref_weight = torch.autograd.grad(reference.sum(), [hidden, weight])
    torch.testing.assert_close(d_hidden, ref_hidden.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_weight, ref_weight.float(), rtol=1e-4, atol=1e-5)


def test_strided_and_expanded_targets_and_bias(device):
    # Issue 15, finding 2: the Triton path read the target as contiguous. A target
    # of stride 2 gave 7.3416 against PyTorch's 7.6429, and an expanded one (stride
    # 0) read past its memory. The bias is read through its stride as well.
    generator = torch.Generator().manual_seed(15)
    logits = torch.randn(6, 11, generator=generator, dtype=torch.float64)
    hidden = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(11, 16, generator=generator, dtype=torch.float64)
    wide_bias = torch.randn(11, 2, generator=generator, dtype=torch.float64)
    targets = {
        "stride 2": torch.randint(0, 11, (6, 2), generator=generator)[:, 0],
        "expanded": torch.tensor([3]).expand(6),
        "transposed (2, 3)": torch.randint(0, 11, (3, 2), generator=generator).t(),
    }
    for bias in (None, wide_bias[:, 1], wide_bias[:1, 0].expand(11)):
        for name, target in targets.items():
            expected_logits = hidden @ weight.T + (0 if bias is None else bias)
            expected = F.cross_entropy(expected_logits, target.reshape(-1))
            leaves = [t.float().to(device).requires_grad_() for t in (hidden, weight)]
            on_device = dict(target=target.to(device), bias=None if bias is None else bias.float().to(device))
            loss = linear_cross_entropy(*leaves, **on_device)
            torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-5, msg=name)
            grads = torch.autograd.grad(loss, leaves)
            reference = [t.clone().requires_grad_() for t in (hidden, weight)]
            reference_logits = reference[0] @ reference[1].T + (0 if bias is None else bias)
            expected_grads = torch.autograd.grad(F.cross_entropy(reference_logits, target.reshape(-1)), reference)
            for grad, expected_grad in zip(grads, expected_grads):
                torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=1e-4, atol=1e-5, msg=name)

            logits_leaf = logits.float().to(device).requires_grad_()
            loss = cross_entropy(logits_leaf, target.to(device))
            torch.testing.assert_close(loss.double().cpu(), F.cross_entropy(logits, target.reshape(-1)), rtol=1e-5,
                                       atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_weight_gets_no_gradient(device, strategy, small_chunks, monkeypatch):
    # A frozen LM head (LoRA fine-tuning): the kernels skip d(weight) entirely, and the chunked
    # strategy allocates no (V, H) buffer for it.
    hidden, weight, _, target, _ = _make_case(11, 16, 90, torch.float32, device, {}, seed=4)
    weight.requires_grad_(False)
    with TensorSizeTracker(ignore_shapes=[weight.shape[::-1]]) as tracker:  # weight.T, a view
        loss = linear_cross_entropy(hidden, weight, target, strategy=strategy)
        loss.backward()
    assert weight.grad is None
    if strategy == "chunked":  # (the interpreter copies each kernel argument, the weight included)
        assert tracker.largest_bytes < weight.numel() * 4, tracker.largest_shape
    hidden64 = hidden.detach().double().requires_grad_()
    linear_cross_entropy_ref(hidden64, weight.double(), target).backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_reads_inputs_through_their_layout(device, dtype, small_chunks, assert_within_tolerance):
    # Every tensor argument of the chunked strategy laid out otherwise: hidden (B, S, H) sliced out of a
    # wider buffer, the weight transposed in memory, the bias expanded (stride 0), the target strided.
    generator = torch.Generator().manual_seed(16)
    vocab, hidden_size = 203, 24
    wide = torch.randn(2, 9, 40, generator=generator)
    weight_t = torch.randn(hidden_size, vocab, generator=generator) / hidden_size**0.5 * 2
    target = torch.randint(0, vocab, (2, 9, 2), generator=generator)[..., 0]
    target[0, :3] = -100
    leaves = [wide.to(device, dtype), weight_t.to(device, dtype), torch.randn(1, generator=generator).to(device, dtype)]
    inputs = lambda w, t, b: (w[..., :hidden_size], t.T, b.expand(vocab))  # noqa: E731

    def loss_fn(wide_, weight_t_, bias_, **kwargs):
        hidden, weight, bias = inputs(wide_, weight_t_, bias_)
        return linear_cross_entropy(hidden, weight, target.to(wide_.device), bias=bias, label_smoothing=0.1,
                                    **kwargs)

    leaves = [t.requires_grad_() for t in leaves]
    loss = loss_fn(*leaves, strategy="chunked")
    grads = torch.autograd.grad(loss, leaves)

    def reference(wide_, weight_t_, bias_):
        hidden, weight, bias = inputs(wide_, weight_t_, bias_)
        return linear_cross_entropy_ref(hidden, weight, target, bias=bias, label_smoothing=0.1)

    (loss64, grads64), (stock, stock_grads) = _reference_pair(reference, leaves, {})
    assert_within_tolerance("loss", loss, loss64, stock, dtype)
    # d_bias: the bias is one value broadcast over the vocabulary, so its gradient sums each row's
    # d(logits), which is 0: the atol is relative to the terms' magnitude (each row's sum of |d(logits)|
    # is at most 2, over the counted rows), not to the exact 0.
    scales = (None, None, 1.0)
    for name, grad, grad64, stock_grad, scale in zip(("d_wide", "d_weight_t", "d_bias"), grads, grads64, stock_grads,
                                                     scales):
        assert grad.dtype == dtype
        assert_within_tolerance(name, grad, grad64, stock_grad, dtype, scale=scale)


def test_strategy_choice(monkeypatch):
    # The documented rule of _choose_strategy, one line each.
    hidden, weight = torch.randn(300, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    choose = module._choose_strategy
    assert choose("auto", "mean", hidden, weight, None) == "chunked"
    assert choose("auto", "sum", hidden, weight, None) == "chunked"
    assert choose("auto", "none", hidden, weight, None) == "atomic"
    assert choose("atomic", "mean", hidden, weight, None) == "atomic"
    assert choose("chunked", "sum", hidden, weight, None) == "chunked"
    # No gradient wanted: the forward kernel alone, whatever the strategy.
    frozen = hidden.detach(), weight.detach()
    assert choose("chunked", "mean", *frozen, None) == "forward-only"
    with torch.no_grad():
        assert choose("auto", "mean", hidden, weight, None) == "forward-only"
    # The budget: fewer than 128 rows of logits fit in it -> atomic.
    monkeypatch.setattr(module, "CHUNK_BYTES", 128 * 50 * 4)
    assert choose("auto", "mean", hidden, weight, None) == "chunked"
    monkeypatch.setattr(module, "CHUNK_BYTES", 127 * 50 * 4)
    assert choose("auto", "mean", hidden, weight, None) == "atomic"


def test_in_place_d_logits_is_never_autotuned():
    # The chunked strategy writes d(logits) over its logits. Triton's autotuner benchmarks a kernel of several
    # configs by running it repeatedly on the call's own arguments: in place, each run would read the
    # previous run's d(logits) as logits. A kernel of one config is launched once.
    assert len(module._CE_BWD_IN_PLACE.configs) == 1
    assert module._CE_BWD_IN_PLACE.kernel is module._CE_BWD.kernel


def test_chunk_rows():
    # Within the budget, at most a quarter of the rows (never the whole (N, V)), multiples of 128 from 128 up.
    rows = module._chunk_rows
    assert module.CHUNK_BYTES == 256 * 2**20
    assert rows(8192, 128256, 2) == 1024  # the budget: 256 MiB / 250.5 KiB a row = 1046 rows
    assert rows(8192, 128256, 4) == 512
    assert rows(3072, 300, 4) == 768  # a quarter of the rows
    assert rows(1000, 300, 4) == 128  # 250, down to a multiple of 128
    assert rows(300, 300, 2) == 75
    assert rows(3, 300, 2) == rows(1, 300, 2) == 1
    assert rows(8192, 2**27, 2) == 1  # one row's logits over the budget still make a chunk


@pytest.fixture
def deterministic_algorithms():
    """A function (warn_only) -> None that sets torch.use_deterministic_algorithms(True); restored afterwards."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(was, warn_only=was_warn_only)


def test_deterministic_algorithms_take_the_chunked_strategy(monkeypatch, deterministic_algorithms):
    # PyTorch's convention: under use_deterministic_algorithms(True) a nondeterministic op (fp32 atomics)
    # raises, or warns with warn_only; "auto" takes the chunked strategy wherever the reduction allows.
    hidden, weight = torch.randn(300, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    choose = module._choose_strategy
    monkeypatch.setattr(module, "CHUNK_BYTES", 127 * 50 * 4)  # a budget that would otherwise take "atomic"
    deterministic_algorithms()
    assert choose("auto", "mean", hidden, weight, None) == "chunked"
    assert choose("auto", "mean", hidden.detach(), weight.detach(), None) == "forward-only"
    for strategy, reduction in (("atomic", "mean"), ("auto", "none")):
        with pytest.raises(RuntimeError, match="not bitwise repeatable"):
            choose(strategy, reduction, hidden, weight, None)
    deterministic_algorithms(warn_only=True)
    with pytest.warns(UserWarning, match="not bitwise repeatable"):
        assert choose("auto", "none", hidden, weight, None) == "atomic"


def test_forward_only_runs_no_gradient_work(device, monkeypatch):
    # Under no_grad neither strategy's gradient work runs: only the forward kernel.
    hidden, weight, bias, target, _ = _make_case(13, 16, 70, torch.float32, device, dict(bias=True), seed=9)
    expected = linear_cross_entropy_ref(hidden.detach().double(), weight.detach().double(), target.cpu(),
                                        bias=bias.detach().double())

    def refuse(*args, **kwargs):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(module, "_linear_ce_chunked", refuse)
    monkeypatch.setattr(module, "_linear_ce_bwd", refuse)
    monkeypatch.setattr(module, "_torch_linear_ce_bwd", refuse)
    with torch.no_grad():
        for strategy in ("auto", *STRATEGIES):
            loss = linear_cross_entropy(hidden, weight, target, bias=bias, strategy=strategy)
            torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-6)


def test_chunked_gradients_are_handed_over_once(device):
    hidden, weight, _, target, _ = _make_case(6, 16, 30, torch.float32, device, {}, seed=10)
    loss = linear_cross_entropy(hidden, weight, target, strategy="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="strategy='atomic' to backpropagate through it twice"):
        loss.backward()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_normalizer_makes_accumulated_micro_batches_equal_one_batch(device, strategy):
    # Two micro-batches normalized by the token count of both equal one big batch.
    hidden, weight, _, target, _ = _make_case(20, 16, 50, torch.float32, device, dict(ignore_rows=True), seed=5)
    count = (target != -100).sum()
    accumulated = sum(
        linear_cross_entropy(hidden[rows], weight, target[rows], normalizer=count, strategy=strategy)
        for rows in (slice(0, 7), slice(7, 20))
    )
    whole = linear_cross_entropy(hidden, weight, target, strategy=strategy)
    torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-6)
    g_accumulated = torch.autograd.grad(accumulated, [hidden, weight])
    g_whole = torch.autograd.grad(whole, [hidden, weight])
    for a, b in zip(g_accumulated, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_never_materializes_the_logits(device, strategy, monkeypatch):
    # The largest tensor created in forward + backward must be far below (N, V).
    # The PyTorch path's tiles are shrunk so that one tile is well below the logits here,
    # and the chunked strategy's budget to 16 rows of logits.
    monkeypatch.setattr(module, "_TORCH_TILE_ROWS", 32)
    monkeypatch.setattr(module, "_TORCH_TILE_COLS", 1024)
    n_rows, hidden_size, vocab = 96, 16, 8192
    monkeypatch.setattr(module, "CHUNK_BYTES", 16 * vocab * 4)
    hidden, weight, bias, target, _ = _make_case(n_rows, hidden_size, vocab, torch.float32, device,
                                                 dict(bias=True), seed=6)
    with TensorSizeTracker() as tracker:
        loss = linear_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=0.1, strategy=strategy)
        loss.backward()
    logits_bytes = n_rows * vocab * 4
    assert tracker.largest_bytes < logits_bytes / 4, (
        f"largest tensor {tracker.largest_shape} ({tracker.largest_op}) is a sizable fraction of the logits"
    )
    # Sanity: the same tracker does see the logits of the unfused reference.
    with TensorSizeTracker() as stock:
        linear_cross_entropy_ref(hidden, weight, target, bias=bias).backward()
    assert stock.largest_bytes >= logits_bytes


@pytest.mark.skipif(not interpreting(), reason="the shim exists only for the interpreter")
def test_bf16_dot_shim_is_what_makes_bf16_right(bf16_dot_shim_disabled):
    hidden, weight, _, target, _ = _make_case(37, 48, 300, torch.bfloat16, "cpu", {}, seed=8)
    reference = linear_cross_entropy_ref(hidden.detach().double(), weight.detach().double(), target)
    # The atomic strategy's kernels take tl.dot; the chunked one's matmuls are PyTorch's.
    with_shim = linear_cross_entropy(hidden, weight, target, strategy="atomic")
    with bf16_dot_shim_disabled():
        without_shim = linear_cross_entropy(hidden, weight, target, strategy="atomic")
    assert abs(with_shim.item() - reference.item()) < 0.05
    assert not abs(without_shim.item() - reference.item()) < 1.0, "the interpreter's bf16 dot is no longer broken?"


@settings(max_examples=25, deadline=None)
@given(
    n_rows=st.integers(1, 40),
    hidden_size=st.sampled_from([8, 16, 24, 40]),
    vocab=st.integers(2, 600),
    smoothing=st.sampled_from([0.0, 0.3]),
    softcap=st.sampled_from([None, 3.0]),
)
def test_torch_path_property(n_rows, hidden_size, vocab, smoothing, softcap):
    # Random shapes on the PyTorch path in float64; tiles forced small so every
    # shape crosses tile edges.
    generator = torch.Generator().manual_seed(n_rows * 1000 + vocab)
    hidden = torch.randn(n_rows, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64)
    target = torch.randint(0, vocab, (n_rows,), generator=generator)
    # Both strategies: the chunked one in chunks of 5 rows (float64 logits of V words: 8 V bytes a row).
    old_tiles = module._TORCH_TILE_ROWS, module._TORCH_TILE_COLS, module.CHUNK_BYTES
    module._TORCH_TILE_ROWS, module._TORCH_TILE_COLS, module.CHUNK_BYTES = 7, 33, 5 * vocab * 8
    try:
        opts = module._Options(-100, smoothing, 1e-3, softcap)
        with forced_backend("torch"):
            leaves = hidden.requires_grad_(), weight.requires_grad_()
            loss = module.LinearCrossEntropyFunction.apply(*leaves, None, target, opts)
            grads = torch.autograd.grad(loss.sum(), leaves)
            chunked_loss = module.ChunkedLinearCrossEntropyFunction.apply(*leaves, None, target, opts, "sum", None)
            chunked_grads = torch.autograd.grad(chunked_loss, leaves)
    finally:
        module._TORCH_TILE_ROWS, module._TORCH_TILE_COLS, module.CHUNK_BYTES = old_tiles
    reference = linear_cross_entropy_ref(hidden, weight, target, label_smoothing=smoothing, z_loss=1e-3,
                                         softcap=softcap, reduction="none")
    # The PyTorch path computes in fp32 whatever the input dtype, as the kernels do.
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_loss.double(), reference.sum(), rtol=1e-5, atol=1e-5)
    expected_grads = torch.autograd.grad(reference.sum(), leaves)
    for ours, chunked, theirs in zip(grads, chunked_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(chunked, theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# cross_entropy over existing logits
# ----------------------------------------------------------------------------

LOGIT_SHAPES = [(1, 2), (17, 3), (77, 300), (6, 1500)]


@pytest.mark.parametrize("options_name", ["plain", "ignore+smoothing", "sum+everything", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=lambda s: "N{}xV{}".format(*s))
def test_cross_entropy_matches_reference(device, shape, dtype, options_name, assert_within_tolerance):
    options = {k: v for k, v in OPTION_SETS[options_name].items() if k != "bias"}
    n_rows, vocab = shape
    generator = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(n_rows, vocab, generator=generator)).to(device=device, dtype=dtype).requires_grad_()
    target = torch.randint(0, vocab, (n_rows,), generator=generator)
    if options.pop("ignore_rows", False) and n_rows > 1:
        target[::3] = -100
    target = target.to(device)

    loss = cross_entropy(logits, target, **options)
    (grad,) = _grads(loss, [logits])
    (loss64, (grad64,)), (stock, (stock_grad,)) = _reference_pair(
        lambda x: cross_entropy_ref(x, target.cpu(), **options), [logits], options
    )
    assert_within_tolerance("loss", loss, loss64, stock, dtype)
    assert grad.dtype == dtype
    assert_within_tolerance("d_logits", grad, grad64, stock_grad, dtype)


def test_cross_entropy_token_classification_shape(device):
    logits = torch.randn(3, 5, 9, device=device, requires_grad=True)
    target = torch.randint(0, 9, (3, 5), device=device)
    target[0, :2] = -100
    loss = cross_entropy(logits, target, reduction="none")
    assert loss.shape == (3, 5)
    assert torch.all(loss[0, :2] == 0)
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1)))


# ----------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------


def _good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 3, 9, 1])


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, w, t, kw: (h.long(), w, t, kw), TypeError, "hidden must be float16, bfloat16 or float32"),
        (lambda h, w, t, kw: (h, w.half(), t, kw), TypeError, "same dtype"),
        (lambda h, w, t, kw: (h[:, :6], w, t, kw), ValueError, "hidden must be"),
        (lambda h, w, t, kw: (h, w[0], t, kw), ValueError, "weight must be"),
        (lambda h, w, t, kw: (h, w, t.float(), kw), TypeError, "target must be int64 or int32"),
        (lambda h, w, t, kw: (h, w, t[:3], kw), ValueError, "one entry per row"),
        (lambda h, w, t, kw: (h, w, t + 10, kw), ValueError, r"target values must be in \[0, 10\)"),
        (lambda h, w, t, kw: (h, w, t - 5, kw), ValueError, "target values"),
        (lambda h, w, t, kw: (h, w, t, dict(reduction="avg")), ValueError, "reduction must be"),
        (lambda h, w, t, kw: (h, w, t, dict(label_smoothing=1.5)), ValueError, "label_smoothing"),
        (lambda h, w, t, kw: (h, w, t, dict(z_loss=-1.0)), ValueError, "z_loss"),
        (lambda h, w, t, kw: (h, w, t, dict(softcap=0.0)), ValueError, "softcap"),
        (lambda h, w, t, kw: (h, w, t, dict(reduction="sum", normalizer=3)), ValueError, "normalizer"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=0)), ValueError, "normalizer must be a finite number > 0"),
        # Issue 15, finding 10: options that were accepted and gave NaN, inf or nonsense.
        (lambda h, w, t, kw: (h, w, t, dict(softcap=float("inf"))), ValueError, "softcap must be a finite number > 0"),
        (lambda h, w, t, kw: (h, w, t, dict(softcap=float("nan"))), ValueError, "softcap must be a finite number > 0"),
        (lambda h, w, t, kw: (h, w, t, dict(z_loss=float("nan"))), ValueError, "z_loss must be a finite number >= 0"),
        (lambda h, w, t, kw: (h, w, t, dict(z_loss=float("inf"))), ValueError, "z_loss must be a finite number >= 0"),
        (lambda h, w, t, kw: (h, w, t, dict(label_smoothing=float("nan"))), ValueError,
         r"label_smoothing must be a finite number in \[0, 1\]"),
        (lambda h, w, t, kw: (h, w, t, dict(label_smoothing=-0.1)), ValueError, "label_smoothing"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=-4.0)), ValueError, "normalizer must be a finite number > 0"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=float("nan"))), ValueError, "normalizer must be a finite"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=torch.tensor(0))), ValueError, "normalizer must be a finite"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=torch.tensor(-3.0))), ValueError, "normalizer must be"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=torch.tensor([2.0, 3.0]))), ValueError, "0-dim tensor"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer=torch.tensor(True))), TypeError, "normalizer must be a real"),
        (lambda h, w, t, kw: (h, w, t, dict(normalizer="4")), TypeError, "normalizer must be a finite number"),
        (lambda h, w, t, kw: (h, w, t, dict(ignore_index=-100.0)), TypeError, "ignore_index must be an int"),
        (lambda h, w, t, kw: (h, w, t, dict(ignore_index=None)), TypeError, "ignore_index must be an int"),
        (lambda h, w, t, kw: (h, w[:0], t, kw), ValueError, r"weight must be \(V, H\) with V >= 1"),
        (lambda h, w, t, kw: (h, w, t, dict(bias=torch.randn(9))), ValueError, "bias must be"),
        (lambda h, w, t, kw: (h.to("meta"), w, t, kw), ValueError, "hidden is on meta"),
        (lambda h, w, t, kw: (h, w, t, dict(strategy="fast")), ValueError, "strategy must be one of"),
        (lambda h, w, t, kw: (h, w, t, dict(strategy=None)), ValueError, "strategy must be one of"),
        (lambda h, w, t, kw: (h, w, t, dict(strategy="chunked", reduction="none")), ValueError,
         "strategy='chunked' needs a scalar loss"),
    ],
)
def test_linear_cross_entropy_bad_input(mutate, error, match):
    hidden, weight, target, kwargs = mutate(*_good(), {})
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, target, **kwargs)


def test_cross_entropy_bad_input():
    with pytest.raises(TypeError, match="logits must be"):
        cross_entropy(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target values"):
        cross_entropy(torch.zeros(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="one entry per row"):
        cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1]))
