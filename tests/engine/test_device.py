"""The one device rule: auto, cpu, cuda, and a named error for anything else."""

from __future__ import annotations

import pytest
import torch

from ember.engine.device import resolve_device
from ember.engine.errors import ConfigError


def test_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))


@pytest.mark.parametrize("requested", ["mps", "meta", "gpu", "tpu:0"])
def test_other_devices_are_named_errors(requested):
    with pytest.raises(ConfigError, match=f"device: expected one of auto, cpu, cuda, got '{requested}'"):
        resolve_device(requested)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_cuda_device():
    with pytest.raises(ConfigError, match="device: cuda was asked for but no CUDA device is available"):
        resolve_device("cuda")
