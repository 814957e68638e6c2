"""The argument checks every kernel family shares: errors that name the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.checks import FLOAT_DTYPES, check_int, check_number, check_tensor, check_values, dtype_names


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


def test_a_contiguous_tensor_is_demanded_only_when_asked():
    expanded = torch.zeros(1, 3).expand(4, 3)
    check_tensor("x", expanded)
    with pytest.raises(ValueError, match=r"^x must be contiguous \(it is updated in place\), got strides \(0, 1\)"):
        check_tensor("x", expanded, contiguous=True)


@pytest.mark.parametrize(
    "value, bounds, error, message",
    [
        (float("inf"), dict(above=0.0), ValueError, "softcap must be a finite number > 0, got inf"),
        (float("nan"), dict(at_least=0.0), ValueError, "softcap must be a finite number >= 0, got nan"),
        (0.0, dict(above=0.0), ValueError, "softcap must be a finite number > 0, got 0.0"),
        (1.0, dict(at_least=0.0, below=1.0), ValueError, r"softcap must be a finite number in \[0, 1\), got 1.0"),
        (1.5, dict(at_least=0.0, at_most=1.0), ValueError, r"softcap must be a finite number in \[0, 1\], got 1.5"),
        (-1, dict(at_most=-2), ValueError, "softcap must be a finite number <= -2, got -1"),
        (float("-inf"), {}, ValueError, "softcap must be a finite number, got -inf"),
        ("3", dict(above=0.0), TypeError, "softcap must be a finite number > 0, got str '3'"),
        (True, {}, TypeError, "softcap must be a finite number, got bool True"),
        (torch.tensor(1.0), {}, TypeError, r"softcap must be a finite number, got Tensor tensor\(1.\)"),
    ],
)
def test_a_number_out_of_range_names_the_argument_and_the_range(value, bounds, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_number("softcap", value, **bounds)


def test_a_good_number_comes_back_as_a_float():
    assert check_number("x", 3, above=0.0) == 3.0 and isinstance(check_number("x", 3), float)
    assert check_number("x", 0.0, at_least=0.0, below=1.0) == 0.0


@pytest.mark.parametrize(
    "value, error, message",
    [
        (-100.0, TypeError, "n must be an int >= -1, got float -100.0"),
        (True, TypeError, "n must be an int >= -1, got bool True"),
        (None, TypeError, "n must be an int >= -1, got NoneType None"),
        (-2, ValueError, "n must be an int >= -1, got -2"),
    ],
)
def test_an_int_is_an_int(value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check_int("n", value, at_least=-1)
    assert check_int("n", 5, at_least=-1) == 5


def test_values_are_checked_at_once_on_a_cpu_with_what_was_found():
    check_values(torch.tensor(True), "never raised")
    with pytest.raises(ValueError, match="^offsets must increase; found 3 after 5$"):
        check_values(torch.tensor(False), "offsets must increase", found=lambda: "found 3 after 5")
    with pytest.raises(ValueError, match="^offsets must increase$"):
        check_values(torch.tensor(False), "offsets must increase")
