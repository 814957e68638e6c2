"""Kernel registry and launcher: each kernel's tuning configs declared once, as data.

A kernel family registers each ``@triton.jit`` kernel with a ``KernelSpec``:
its configs, the autotune key, and a few representative compilations whose
argument types ``compile_case`` reads off the kernel's own signature. Three
consumers read that one declaration:

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
import inspect
from typing import Any, Callable, Sequence

import torch
import triton
from triton.runtime.jit import KernelParam

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


def compile_case(
    kernel: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    types: dict[str, str] | None = None,
    constexprs: dict[str, Any],
    tensor_cores: bool,
) -> CompileCase:
    """A ``CompileCase`` of ``kernel`` whose signature is read off the kernel's own arguments.

    Every argument that is not a constexpr gets its Triton type from, in order:
    ``types``, the exceptions a family states once for all its kernels (names a
    kernel does not take are skipped): "*fp32" for an fp32 buffer, "*i32" for
    offsets, "fp32" or "i64" for a scalar; then a name ending in ``_ptr`` points
    to ``dtype`` elements; any other argument (a shape, a stride) is i32. An
    argument given a value in ``constexprs`` (a stride the JIT specializes as
    the constant 1) leaves the signature, as it does at a launch.
    """
    types = types or {}
    arguments = _arguments(kernel)
    unknown = sorted(set(constexprs) - set(arguments))
    if unknown:
        raise ValueError(f"compile case {name!r}: {kernel.__name__} has no argument(s) {unknown}")
    signature = {}
    for argument, is_constexpr in arguments.items():
        if is_constexpr or argument in constexprs:
            continue
        is_pointer = argument.endswith("_ptr")
        if argument in types:
            triton_type = types[argument]
            if triton_type.startswith("*") != is_pointer:
                raise ValueError(f"compile case {name!r}: {kernel.__name__}'s {argument} is typed "
                                 f"{triton_type!r}, but only the arguments named *_ptr are pointers")
        elif is_pointer:
            if dtype is None:
                raise ValueError(f"compile case {name!r}: no element type for {kernel.__name__}'s {argument}: "
                                 f"give the case a dtype, or the pointer a type")
            triton_type = "*" + TRITON_DTYPE[dtype]
        else:
            triton_type = "i32"
        signature[argument] = triton_type
    return CompileCase(name=name, signature=signature, constexprs=constexprs, tensor_cores=tensor_cores)


def _arguments(kernel: Any) -> dict[str, bool]:
    """{name: is constexpr} of a ``@triton.jit`` kernel's arguments, in order.

    Read off the Python function through Triton's own rule (``KernelParam``):
    under ``TRITON_INTERPRET=1`` the kernel is an InterpretedFunction, which
    has no ``params``, only the function.
    """
    parameters = inspect.signature(kernel.fn).parameters.values()
    params = [KernelParam(i, parameter, False, False) for i, parameter in enumerate(parameters)]
    return {param.name: param.is_constexpr for param in params}


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
