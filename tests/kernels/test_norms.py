"""RMSNorm and LayerNorm with the fused residual add: all tiers.

Every case runs on each backend of the `device` fixture (interpreter, PyTorch
path, CUDA) against a float64 reference, with the tolerance rule measured
against stock PyTorch (the same reference, as HF's modules compute it) in the
same dtype.
"""

from __future__ import annotations

import pytest
import torch

from ember.kernels import layer_norm, rms_norm
from ember.kernels.backend import forced_backend
from ember.kernels.norms import layer_norm_ref, rms_norm_ref

# (rows, hidden, dtype): one row, an odd count, hidden sizes that are not powers of 2, one longer than a
# block (4096) so a row takes several chunks; every dtype at more than one size. 300 rows of 77 take 32 rows per
# program (a tile of 32 x 128) in 10 row blocks, the last one partial, more than the interpreter's 4 backward
# programs, so each backward program walks several blocks.
CASES = [(1, 77, torch.float16), (1, 300, torch.bfloat16), (17, 300, torch.float32), (17, 1376, torch.bfloat16),
         (3, 1376, torch.float16), (2, 4500, torch.float32), (2, 4500, torch.bfloat16), (300, 77, torch.float16)]
CASE_IDS = ["N{}xH{}-{}".format(n, h, str(d).removeprefix("torch.")) for n, h, d in CASES]


# Outputs a kernel leaves unwritten show as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _laid_out(values, layout):
    """``values`` in a layout: its own copy, every other element of a NaN-poisoned buffer along the last dim,
    dims reversed in memory, or its first element along dim 0 broadcast with stride 0 (the values change)."""
    if layout == "contiguous":
        return values.clone()
    if layout == "strided":
        buffer = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 1), float("nan"), dtype=values.dtype,
                            device=values.device)
        buffer[..., 1::2] = values
        return buffer[..., 1::2]
    if layout == "transposed":
        return values.t().contiguous().t()
    return values[:1].clone().expand(values.shape)


def _run_and_compare(fn, ref, tensors, dtype, device, assert_within_tolerance, grad_dtypes=None, layouts=None):
    """fn on ``tensors`` (float64 values; None kept) cast to ``dtype`` on ``device`` and laid out, against ref in
    float64 and in ``dtype`` (stock) on the same values, outputs and gradients, the cotangents random.

    ``grad_dtypes``: the dtype each tensor is cast to (default ``dtype``), e.g. an fp32 weight beside bf16 x.
    ``layouts``: each tensor's layout (default contiguous), see ``_laid_out``.
    """
    generator = torch.Generator().manual_seed(11)
    grad_dtypes = grad_dtypes or [dtype] * len(tensors)
    layouts = layouts or ["contiguous"] * len(tensors)
    ours = [None if t is None else _laid_out(t.to(device=device, dtype=d), layout).requires_grad_()
            for t, d, layout in zip(tensors, grad_dtypes, layouts)]
    outputs = fn(*ours)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    # The incoming gradients in the first input's layout too: the backward reads them through their strides.
    cotangents = [_laid_out(torch.randn(o.shape, generator=generator).to(device=device, dtype=o.dtype), layouts[0])
                  for o in outputs]
    present = [t for t in ours if t is not None]
    grads = torch.autograd.grad(outputs, present, cotangents)
    cotangents = [c.cpu().double() for c in cotangents]
    results = []
    for reference_dtype in (torch.float64, None):
        leaves = [None if t is None else t.detach().cpu().to(reference_dtype or t.dtype).requires_grad_()
                  for t in ours]
        with forced_backend("torch"):
            expected = ref(*leaves)
        expected = expected if isinstance(expected, tuple) else (expected,)
        expected_grads = torch.autograd.grad(expected, [t for t in leaves if t is not None],
                                             [c.to(e.dtype) for c, e in zip(cotangents, expected)])
        results.append((expected, expected_grads))
    (out64, grads64), (stock, stock_grads) = results
    for i, (o, o64, s) in enumerate(zip(outputs, out64, stock)):
        assert o.dtype == s.dtype, f"output {i}: dtype {o.dtype}, stock gives {s.dtype}"
        assert_within_tolerance(f"output {i}", o, o64, s, dtype)
    for i, (g, g64, s) in enumerate(zip(grads, grads64, stock_grads)):
        assert g.dtype == s.dtype
        assert_within_tolerance(f"grad {i}", g, g64, s, dtype)
    return outputs, grads


def _inputs(rows, hidden, seed, around=0.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)
    residual = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)
    weight = around + torch.randn(hidden, generator=generator, dtype=torch.float64) * 0.5
    bias = torch.randn(hidden, generator=generator, dtype=torch.float64)
    return x, residual, weight, bias


@pytest.mark.parametrize("variant", ["llama", "gemma+residual"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rms_norm_matches_reference(device, case, variant, assert_within_tolerance):
    *shape, dtype = case
    gemma = variant.startswith("gemma")
    x, residual, weight, _ = _inputs(*shape, seed=shape[1], around=0.0 if gemma else 1.0)
    options = dict(eps=1e-6, offset=1.0 if gemma else 0.0)
    if gemma:
        _run_and_compare(lambda x, w, r: rms_norm(x, w, residual=r, **options),
                         lambda x, w, r: rms_norm_ref(x, w, residual=r, **options),
                         [x, weight, residual], dtype, device, assert_within_tolerance)
    else:
        _run_and_compare(lambda x, w: rms_norm(x, w, **options), lambda x, w: rms_norm_ref(x, w, **options),
                         [x, weight], dtype, device, assert_within_tolerance)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_layer_norm_matches_reference(device, case, residual, assert_within_tolerance):
    *shape, dtype = case
    x, res, weight, bias = _inputs(*shape, seed=shape[1] + 1, around=1.0)
    x = x + 3.0  # a mean far from 0: the variance must be taken about it
    if residual:
        _run_and_compare(lambda x, w, b, r: layer_norm(x, w, b, residual=r),
                         lambda x, w, b, r: layer_norm_ref(x, w, b, residual=r),
                         [x, weight, bias, res], dtype, device, assert_within_tolerance)
    else:
        _run_and_compare(lambda x, w, b: layer_norm(x, w, b, eps=1e-12), lambda x, w, b: layer_norm_ref(x, w, b, eps=1e-12),
                         [x, weight, bias], dtype, device, assert_within_tolerance)


@pytest.mark.parametrize("cast", ["llama", "gemma"])
def test_rms_norm_fp32_weight_on_bf16_rows(device, cast, assert_within_tolerance):
    # An fp32 weight over bf16 activations (mixed precision): Llama's convention gives fp32 out
    # (the weight multiplies the bf16-rounded normalized value), Gemma's gives bf16.
    x, residual, weight, _ = _inputs(9, 96, seed=5, around=1.0)
    outputs, grads = _run_and_compare(
        lambda x, w, r: rms_norm(x, w, residual=r, cast=cast), lambda x, w, r: rms_norm_ref(x, w, residual=r, cast=cast),
        [x, weight, residual], torch.bfloat16, device, assert_within_tolerance,
        grad_dtypes=[torch.bfloat16, torch.float32, torch.bfloat16])
    assert outputs[0].dtype == (torch.float32 if cast == "llama" else torch.bfloat16)
    assert grads[1].dtype == torch.float32


@pytest.mark.parametrize("layout, dtype", [("strided", torch.float32), ("transposed", torch.bfloat16),
                                           ("expanded", torch.float16)], ids=["strided", "transposed", "expanded"])
def test_every_argument_in_every_layout(device, layout, dtype, assert_within_tolerance):
    x, residual, weight, bias = _inputs(17, 77, seed=3, around=1.0)
    # The weight and bias are 1-D: "transposed" is contiguous for them.
    rms_layouts = [layout, layout, "transposed" if layout == "expanded" else layout]
    ln_layouts = [layout, layout, "strided", rms_layouts[2]]
    _run_and_compare(lambda x, w, r: rms_norm(x, w, residual=r), lambda x, w, r: rms_norm_ref(x, w, residual=r),
                     [x, weight, residual], dtype, device, assert_within_tolerance, layouts=rms_layouts)
    _run_and_compare(lambda x, w, b, r: layer_norm(x, w, b, residual=r),
                     lambda x, w, b, r: layer_norm_ref(x, w, b, residual=r),
                     [x, weight, bias, residual], dtype, device, assert_within_tolerance, layouts=ln_layouts)


def test_higher_rank_input_and_no_bias(device, assert_within_tolerance):
    x, _, weight, _ = _inputs(2 * 5, 48, seed=8, around=1.0)
    x = x.view(2, 5, 48)
    _run_and_compare(lambda x, w: layer_norm(x, w, None), lambda x, w: layer_norm_ref(x, w, None),
                     [x, weight], torch.float16, device, assert_within_tolerance)
    _run_and_compare(lambda x, w: rms_norm(x, w), lambda x, w: rms_norm_ref(x, w),
                     [x, weight], torch.float16, device, assert_within_tolerance)


def _saved(fn, *tensors):
    """[(storage pointer, bytes)] of every tensor fn's graph saves for its backward."""
    saved = []

    def pack(tensor):
        saved.append((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*tensors)
    return saved, result


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_saves_its_input_and_row_statistics_only(device, residual):
    rows, hidden = 16, 64
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True) if residual else None
    weight = torch.ones(hidden, device=device, requires_grad=True)
    bias = torch.zeros(hidden, device=device, requires_grad=True)
    for norm, stats in ((lambda: rms_norm(x, weight, residual=res), 1), (lambda: layer_norm(x, weight, bias,
                                                                                            residual=res), 2)):
        saved, result = _saved(norm)
        kept = result[1] if residual else x  # the input itself, or the returned sum: no copy of either
        new = {ptr: size for ptr, size in saved if ptr not in (kept.untyped_storage().data_ptr(),
                                                               weight.untyped_storage().data_ptr())}
        # Beyond the rows and the weight, one fp32 number per row and statistic (LayerNorm's mean and rstd
        # share one buffer).
        assert sum(new.values()) == stats * rows * 4, saved
        assert any(ptr == kept.untyped_storage().data_ptr() for ptr, _ in saved)


def test_weight_gradient_is_deterministic(device):
    # More rows than backward programs, so each program sums several rows into its partial.
    x = torch.randn(11, 96, device=device, requires_grad=True)
    weight = torch.randn(96, device=device, requires_grad=True)
    cotangent = torch.randn(11, 96, device=device)
    first = torch.autograd.grad(rms_norm(x, weight), weight, cotangent)[0]
    second = torch.autograd.grad(rms_norm(x, weight), weight, cotangent)[0]
    assert torch.equal(first, second)


def test_frozen_weight_gives_the_same_input_gradient(device):
    # A frozen norm weight (LoRA) skips the weight-gradient partials; the input gradient must not change.
    x = torch.randn(9, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(9, 96, device=device, dtype=torch.bfloat16)
    cotangent = torch.randn(9, 96, device=device, dtype=torch.bfloat16)
    for norm in (lambda w: rms_norm(x, w, residual=residual)[0], lambda w: layer_norm(x, w, w, residual=residual)[0]):
        weight = torch.randn(96, device=device)
        frozen = torch.autograd.grad(norm(weight), x, cotangent)[0]
        trained, weight_grad = torch.autograd.grad(norm(weight.requires_grad_()), (x, weight), cotangent)
        assert torch.equal(frozen, trained) and torch.isfinite(weight_grad).all()


def test_no_rows(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    out = rms_norm(x, weight)
    out.sum().backward()
    assert out.shape == (0, 16) and torch.equal(weight.grad, torch.zeros(16, device=device))


def test_under_autocast_as_the_unfused_ops(device):
    # Autocast casts none of the ops RMSNorm modules are made of; it runs layer_norm in fp32 on CUDA and leaves
    # it alone on a CPU. Either way the gradient comes back in the input's dtype.
    x = torch.randn(4, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(32, device=device, requires_grad=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert rms_norm(x.float(), weight).dtype == torch.float32
        assert rms_norm(x, weight, cast="gemma").dtype == torch.bfloat16
        out = layer_norm(x, weight, None)
    assert out.dtype == (torch.float32 if x.is_cuda else torch.bfloat16)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_references_match_transformers_modules():
    # Anchors the references' conventions to the modules they replace.
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    del transformers
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    llama, gemma = LlamaRMSNorm(64, eps=1e-5), GemmaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        llama.weight.copy_(torch.randn(64))
        gemma.weight.copy_(torch.randn(64))
    assert torch.equal(llama(x), rms_norm_ref(x, llama.weight, eps=1e-5))
    assert torch.equal(gemma(x), rms_norm_ref(x, gemma.weight, eps=1e-5, offset=1.0))
    assert llama(x).dtype == torch.float32 and gemma(x).dtype == torch.bfloat16


def test_bad_input_is_refused_by_name():
    x, weight = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(TypeError, match="x must be"):
        rms_norm(x.long(), weight)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        rms_norm(x, torch.randn(7))
    with pytest.raises(TypeError, match="residual must be"):
        rms_norm(x, weight, residual=x.double())
    with pytest.raises(ValueError, match="residual must have shape"):
        layer_norm(x, weight, None, residual=x[:2])
    with pytest.raises(ValueError, match="bias must be"):
        layer_norm(x, weight, torch.randn(3))
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm(x, weight, eps=float("nan"))
    with pytest.raises(ValueError, match="cast must be"):
        rms_norm(x, weight, cast="t5")
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        layer_norm(x, None, None)
    with pytest.raises(ValueError, match="H >= 1"):
        rms_norm(torch.randn(3, 0), torch.randn(0))
