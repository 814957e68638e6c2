"""The package ember.kernels: the production API. (That it loads no layer above it: tests/test_layering.py.)"""

from __future__ import annotations

import ember.kernels
from ember.kernels.adamw8bit import init_state


def test_all_is_the_production_api():
    assert not [name for name in ember.kernels.__all__ if name.endswith("_ref")]  # references stay in their modules
    assert all(hasattr(ember.kernels, name) for name in ember.kernels.__all__)
    # adamw8bit_step needs its state: the initializer is exported beside it.
    assert ember.kernels.adamw8bit_init_state is init_state
