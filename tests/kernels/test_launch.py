"""The kernel registry's compile cases: signatures read off a kernel's own arguments."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from ember.kernels.launch import compile_case


@triton.jit
def _scaled_rows_kernel(
    x_ptr, out_ptr, lse_ptr,
    n_rows, stride_xm, stride_xn, scale, seed,
    HAS_LSE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=row < n_rows)
    tl.store(out_ptr + row * BLOCK + cols, x * scale + seed)
    if HAS_LSE:
        tl.store(lse_ptr + row, tl.sum(x, 0))


_TYPES = dict(lse_ptr="*fp32", scale="fp32", seed="i64", softcap="fp32")  # softcap: another kernel's


def test_signature_is_the_hand_written_one():
    case = compile_case(_scaled_rows_kernel, "bf16", dtype=torch.bfloat16, types=_TYPES,
                        constexprs=dict(HAS_LSE=True), tensor_cores=False)
    assert list(case.signature.items()) == [
        ("x_ptr", "*bf16"), ("out_ptr", "*bf16"), ("lse_ptr", "*fp32"),
        ("n_rows", "i32"), ("stride_xm", "i32"), ("stride_xn", "i32"), ("scale", "fp32"), ("seed", "i64"),
    ]
    assert case.constexprs == dict(HAS_LSE=True)
    assert (case.name, case.tensor_cores) == ("bf16", False)


def test_an_argument_fixed_as_a_constant_leaves_the_signature():
    # As at a launch, where the JIT specializes an integer argument equal to 1.
    case = compile_case(_scaled_rows_kernel, "unit stride", dtype=torch.float16, types=_TYPES,
                        constexprs=dict(HAS_LSE=False, stride_xn=1), tensor_cores=False)
    assert "stride_xn" not in case.signature and case.constexprs["stride_xn"] == 1
    assert case.signature["x_ptr"] == "*fp16"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(types=_TYPES), r"no element type for _scaled_rows_kernel's x_ptr"),
        (dict(dtype=torch.float32, types=dict(scale="*fp32")), r"scale is typed '\*fp32'"),
        (dict(dtype=torch.float32, types=dict(lse_ptr="fp32")), r"lse_ptr is typed 'fp32'"),
        (dict(dtype=torch.float32, constexprs=dict(HAS_BIAS=True)), r"has no argument\(s\) \['HAS_BIAS'\]"),
    ],
)
def test_an_argument_it_cannot_type_is_refused(arguments, message):
    arguments = {"constexprs": {}, **arguments}
    with pytest.raises(ValueError, match=message):
        compile_case(_scaled_rows_kernel, "case", tensor_cores=False, **arguments)
