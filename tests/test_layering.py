"""The layers import one way: kernels <- engine <- bench <- the command line, which nothing imports.

Read from the source (every import statement, those inside functions
included), so a lazy import cannot hide a cycle; and checked in a fresh
process, so what importing ``ember.kernels`` pulls in is seen as a user sees it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "engine", "bench", "cli"]  # each may import only the ones before it
KERNEL_DEPENDENCIES = {"torch", "triton"}
# Imported inside the one function that hands a tensor to it (NF4Weight.to_bnb_quant_state), never on import.
KERNEL_INTEROP = {"bitsandbytes"}


def _imports(path: Path, package: str, root: Path = REPO) -> set[str]:
    """Absolute names of the modules ``path`` imports; ``root / package`` is the folder of ``ember.<package>``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = ["ember", package, *path.relative_to(root / package).parent.parts]
                base = parts[: len(parts) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def _layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(path.relative_to(REPO)): _imports(path, layer) for path in sorted((REPO / layer).rglob("*.py"))}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "ember" and len(parts) > 1 else None


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    wrong = {file: sorted(name for name in names if _layer_of(name) in above)
             for file, names in _layer_imports(layer).items()}
    assert not {file: names for file, names in wrong.items() if names}, f"{layer} imports a layer above it"


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = KERNEL_DEPENDENCIES | KERNEL_INTEROP | set(sys.stdlib_module_names) | {"ember", "__future__"}
    outside = {file: sorted(name for name in names if name.split(".")[0] not in allowed)
               for file, names in _layer_imports("kernels").items()}
    assert not {file: names for file, names in outside.items() if names}


def test_the_rule_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: imports inside functions, and relative ones at any depth, are found."""
    probe = tmp_path / "bench" / "inner" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import torch\n\n\ndef f():\n    from ...cli import main\n    from . import sibling\n"
                     "    from ..suites import SUITES\n    import ember.engine.train\n")
    assert _imports(probe, "bench", tmp_path) == {"torch", "ember.cli", "ember.bench.inner", "ember.bench.suites",
                                                  "ember.engine.train"}
    assert [_layer_of(name) for name in ("ember.cli", "ember.engine.train", "torch")] == ["cli", "engine", None]


def test_importing_the_kernels_pulls_in_no_other_layer():
    code = ("import sys, ember.kernels; print(sorted(m for m in sys.modules if m.startswith("
            "('ember.engine', 'ember.bench', 'ember.cli', 'transformers', 'peft', 'bitsandbytes'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO.parent)
    assert out.stdout.strip() == "[]"


def test_importing_the_engine_pulls_in_neither_the_bench_nor_the_command_line():
    code = "import sys, ember.engine; print(sorted(m for m in sys.modules if m.startswith(('ember.bench', 'ember.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO.parent)
    assert out.stdout.strip() == "[]"
