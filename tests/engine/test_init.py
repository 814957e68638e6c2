"""The package ember.engine: its API, and no export that hides a module of the same name."""

from __future__ import annotations

import importlib
import pkgutil
import types

import ember.engine


def test_exports_exist_and_hide_no_module():
    modules = {module.name for module in pkgutil.iter_modules(ember.engine.__path__)}
    assert all(hasattr(ember.engine, name) for name in ember.engine.__all__)
    assert not set(ember.engine.__all__) & modules
    for name in modules:  # `import ember.engine.train as train_module` gives the module, not a function
        importlib.import_module(f"ember.engine.{name}")
        assert isinstance(getattr(ember.engine, name), types.ModuleType), name
