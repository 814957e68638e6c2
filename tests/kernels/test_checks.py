"""The argument checks every kernel family shares: errors that name the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.checks import FLOAT_DTYPES, check_tensor, dtype_names


def test_dtype_names_read_as_a_sentence():
    assert dtype_names(FLOAT_DTYPES) == "float16, bfloat16 or float32"
    assert dtype_names((torch.uint8,)) == "uint8"


def test_a_good_tensor_passes():
    check_tensor("x", torch.zeros(2, 3, dtype=torch.bfloat16), shape=(2, 3), device=torch.device("cpu"))


@pytest.mark.parametrize(
    "value, options, error, message",
    [
        ([1.0], {}, TypeError, "x must be a torch.Tensor, got list"),
        (torch.zeros(2, dtype=torch.float64), {}, TypeError,
         "x must be float16, bfloat16 or float32, got torch.float64"),
        (torch.zeros(2), dict(dtypes=(torch.uint8,)), TypeError, "x must be uint8, got torch.float32"),
        (torch.zeros(2), dict(shape=(3,)), ValueError, r"x must have shape \(3,\), got \(2,\)"),
        (torch.zeros(2, device="meta"), dict(device=torch.device("cpu")), ValueError,
         "x is on meta but the other inputs are on cpu"),
    ],
)
def test_an_error_names_the_argument_and_what_was_expected(value, options, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_tensor("x", value, **options)
