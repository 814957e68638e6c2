"""swiglu and geglu: all tiers, against float64 under the tolerance rule."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import geglu, swiglu
from ember.kernels.gated import geglu_ref, swiglu_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

FUNCTIONS = {
    "swiglu": (swiglu, swiglu_ref),
    "geglu_tanh": (lambda g, u: geglu(g, u, approximate="tanh"), lambda g, u: geglu_ref(g, u, approximate="tanh")),
    "geglu_erf": (lambda g, u: geglu(g, u, approximate="none"), lambda g, u: geglu_ref(g, u, approximate="none")),
}


# Outputs a kernel leaves unwritten show as NaN (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("poisoned_allocations")


def _laid_out(values, layout):
    """``values`` in a layout: its own copy, every other column of a NaN-poisoned buffer, dims reversed in memory,
    or its first row broadcast with stride 0 (the values change to that row's)."""
    if layout == "contiguous":
        return values.clone()
    if layout == "strided":
        buffer = torch.full((*values.shape[:-1], 2 * values.shape[-1] + 1), float("nan"), dtype=values.dtype,
                            device=values.device)
        buffer[..., 1::2] = values
        return buffer[..., 1::2]
    if layout == "reversed":
        order = list(reversed(range(values.dim())))
        return values.permute(order).contiguous().permute(order)
    return values[:1].clone().expand(values.shape)


def _check(name, shape, dtype, device, layouts, assert_within_tolerance, seed=0):
    fn, ref = FUNCTIONS[name]
    generator = torch.Generator().manual_seed(seed)
    gate, up = (_laid_out((torch.randn(shape, generator=generator) * 2).to(device=device, dtype=dtype), layout)
                .requires_grad_() for layout in layouts)
    out = fn(gate, up)
    cotangent = torch.randn(shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, (gate, up), cotangent.to(device=device, dtype=out.dtype))
    expected = []
    for reference_dtype in (torch.float64, dtype):
        leaves = [t.detach().cpu().to(reference_dtype).requires_grad_() for t in (gate, up)]
        result = ref(*leaves)
        expected.append((result, torch.autograd.grad(result, leaves, cotangent.to(reference_dtype))))
    (out64, grads64), (stock, stock_grads) = expected
    assert out.dtype == dtype and out.is_contiguous()
    assert_within_tolerance("out", out, out64, stock, dtype)
    for label, grad, grad64, stock_grad in zip(("d_gate", "d_up"), grads, grads64, stock_grads):
        assert grad.dtype == dtype
        assert_within_tolerance(label, grad, grad64, stock_grad, dtype)


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 77), (17, 1376), (2, 3, 300)], ids=str)
def test_matches_reference(device, shape, dtype, name, assert_within_tolerance):
    _check(name, shape, dtype, device, ("contiguous", "contiguous"), assert_within_tolerance, seed=shape[-1])


@pytest.mark.parametrize("layouts", [("strided", "reversed"), ("reversed", "expanded"), ("expanded", "strided")],
                         ids="-".join)
def test_every_layout(device, layouts, assert_within_tolerance):
    for name in FUNCTIONS:
        _check(name, (17, 77), torch.bfloat16, device, layouts, assert_within_tolerance, seed=1)


def test_saves_only_gate_and_up(device):
    gate = torch.randn(8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for fn in (swiglu, geglu):
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(gate, up)
        assert sorted(saved) == sorted([gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()])


def test_empty(device):
    gate = torch.randn(0, 8, device=device, requires_grad=True)
    out = swiglu(gate, torch.randn(0, 8, device=device))
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8)


def test_bad_input_is_refused_by_name():
    gate = torch.randn(3, 8)
    with pytest.raises(TypeError, match="gate must be"):
        swiglu(gate.int(), gate)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(gate, gate[:, :4])
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        geglu(gate, gate.half())
    with pytest.raises(ValueError, match="approximate must be"):
        geglu(gate, gate, approximate="erf")
    with pytest.raises(ValueError, match="gate must have at least one dimension"):
        swiglu(torch.tensor(1.0), torch.tensor(1.0))
