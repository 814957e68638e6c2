"""Packaging: import names, the console script, and no top-level `kernels` module."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_names_map_to_the_top_level_folders():
    import ember.bench
    import ember.engine
    import ember.kernels

    assert Path(ember.kernels.__file__).parent == REPO / "kernels"
    assert Path(ember.engine.__file__).parent == REPO / "engine"
    assert Path(ember.bench.__file__).parent == REPO / "bench"


def test_no_top_level_kernels_module_outside_the_repository(tmp_path):
    # transformers and bitsandbytes import the Hugging Face package `kernels`:
    # installing ember must never make a module of that name importable.
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "None" or str(REPO) not in origin, f"`kernels` resolves to ember's folder: {origin}"


def test_kernels_in_this_process_is_not_ours():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or str(REPO / "kernels") not in str(spec.origin)


def test_console_script_is_installed():
    assert shutil.which("ember"), "the `ember` console script is not on PATH (pip install -e .)"
    out = subprocess.run(["ember", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out
