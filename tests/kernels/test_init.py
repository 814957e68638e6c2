"""The package ember.kernels: the production API, and nothing of the layers above it."""

from __future__ import annotations

import subprocess
import sys

import ember.kernels
from ember.kernels.adamw8bit import init_state


def test_all_is_the_production_api():
    assert not [name for name in ember.kernels.__all__ if name.endswith("_ref")]  # references stay in their modules
    assert all(hasattr(ember.kernels, name) for name in ember.kernels.__all__)
    # adamw8bit_step needs its state: the initializer is exported beside it.
    assert ember.kernels.adamw8bit_init_state is init_state


def test_kernels_import_nothing_of_the_engine():
    code = "import sys, ember.kernels; print(sorted(m for m in sys.modules if m.startswith(('ember.engine', 'ember.bench', 'transformers'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
