"""Kernel registry and launcher: each kernel's tuning configs declared once, as data.

A kernel family registers each ``@triton.jit`` kernel with a ``KernelSpec``:
its configs, the autotune key, and the argument types of a few representative
compilations. Three consumers read that one declaration:

- on a GPU, ``launch`` autotunes over the configs (Triton's autotuner, cached
  per key);
- under the interpreter, ``launch`` runs the first config: Triton's autotuner
  benchmarks through the GPU driver and fails there ("0 active drivers");
- ``python -m ember.kernels.compile_check`` compiles every config of every
  registered kernel for sm_80 and sm_90 without a GPU and checks registers,
  spills, shared memory and tensor-core use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import triton

from .backend import interpreting


@dataclasses.dataclass(frozen=True)
class CompileCase:
    """One representative compilation of a kernel for the compile gate.

    ``signature`` maps every non-constexpr argument to a Triton type string
    ("*bf16", "i32", "fp32"); ``constexprs`` fixes the constexpr arguments
    that are not tuning parameters. ``tensor_cores`` says whether this case
    must use tensor-core instructions (HMMA / HGMMA): true for the 16-bit
    matmul paths, false for the exact fp32 path and for elementwise kernels.
    """

    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    tensor_cores: bool


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    kernel: Any  # triton JITFunction, or InterpretedFunction under the interpreter
    configs: Sequence[triton.Config]
    key: Sequence[str]
    compile_cases: Sequence[CompileCase]
    # Output buffers the kernel accumulates into (atomics): the autotuner must
    # zero them before every trial run, or trials add up.
    reset_to_zero: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError(f"kernel {self.name}: configs must not be empty")


# Triton's type names for the dtypes ember's kernels take, for compile-case signatures.
TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

REGISTRY: dict[str, KernelSpec] = {}
_autotuned: dict[str, Callable] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"kernel {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def launch(spec: KernelSpec, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """Launch ``spec.kernel`` over ``grid(meta)``, choosing its block sizes.

    ``grid`` receives the chosen config's parameters, as with ``triton.autotune``.
    """
    if interpreting():
        config = spec.configs[0]
        spec.kernel[lambda meta: grid({**meta, **config.kwargs})](*args, **kwargs, **config.kwargs)
        return
    tuned = _autotuned.get(spec.name)
    if tuned is None:
        tuned = triton.autotune(
            configs=list(spec.configs), key=list(spec.key), reset_to_zero=list(spec.reset_to_zero) or None
        )(spec.kernel)
        _autotuned[spec.name] = tuned
    tuned[grid](*args, **kwargs)
