"""bitsandbytes' dynamic 8-bit maps, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.dynamic_map import dynamic_map


def test_maps_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(signed=True), F.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), F.create_dynamic_map(signed=False))
