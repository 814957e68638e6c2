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
  spills, shared memory and tensor-core use (HGMMA on sm_90 from some config,
  ``KernelSpec.hopper_config`` naming it for CI's subset). It compiles from
  representative launch arguments (``launch_arguments``: a case's ``values``,
  else ``representative_value``), through Triton's own launch-time binder.

A config may be for sm_90 and newer only (``KernelSpec.hopper_only``): a wgmma
tile that spills as sm_80's mma. The autotuner and the gate leave it out on
older architectures (``KernelSpec.configs_for``).
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
    must use tensor-core instructions: HMMA on sm_80, HGMMA (wgmma) from some
    config on sm_90; true for the 16-bit and tf32 matmul paths, false for the
    exact fp32 path and for elementwise kernels.

    ``values`` gives representative launch values of scalar arguments; the gate
    passes every argument through Triton's own launch-time specialization (see
    ``launch_arguments``), so it compiles the binary a launch compiles.
    """

    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    tensor_cores: bool
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    # Index in ``configs`` of the config meant for Hopper's wgmma (64-row
    # warpgroup tiles). The gate's CI subset compiles configs[0] and this one;
    # None when configs[0] is that config (or the spec has no matmul).
    hopper_config: int | None = None
    # Indices in ``configs`` of tiles for sm_90 and newer only: wgmma tiles (64 rows
    # per warpgroup) that spill registers as sm_80's mma, or repeat its work. The
    # autotuner of an older GPU never sees them and the gate compiles them for
    # sm_90 only. configs[0], which the interpreter runs, is for every architecture.
    hopper_only: Sequence[int] = ()

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError(f"kernel {self.name}: configs must not be empty")
        if self.hopper_config is not None and not 0 <= self.hopper_config < len(self.configs):
            raise ValueError(f"kernel {self.name}: hopper_config {self.hopper_config} is not an index "
                             f"of its {len(self.configs)} configs")
        if any(not 0 < i < len(self.configs) for i in self.hopper_only):
            raise ValueError(f"kernel {self.name}: hopper_only {tuple(self.hopper_only)} must be indices of its "
                             f"{len(self.configs)} configs other than 0 (configs[0] runs on every architecture)")

    def runs_on(self, config_index: int, arch: int) -> bool:
        """Whether configs[config_index] is compiled and autotuned for sm_<arch> (e.g. 80, 90)."""
        return arch >= 90 or config_index not in self.hopper_only

    def configs_for(self, arch: int) -> list[triton.Config]:
        return [config for i, config in enumerate(self.configs) if self.runs_on(i, arch)]


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
    values: dict[str, Any] | None = None,
) -> CompileCase:
    """A ``CompileCase`` of ``kernel`` whose signature is read off the kernel's own arguments.

    Every argument that is not a constexpr gets its Triton type from, in order:
    ``types``, the exceptions a family states once for all its kernels (names a
    kernel does not take are skipped): "*fp32" for an fp32 buffer, "*i32" for
    offsets, "fp32" or "i64" for a scalar; then a name ending in ``_ptr`` points
    to ``dtype`` elements; any other argument (a shape, a stride) is i32. An
    argument given a value in ``constexprs`` (a stride the JIT specializes as
    the constant 1) leaves the signature, as it does at a launch.

    ``values`` gives scalar arguments their representative launch value (an
    integer's divisibility by 16, or its being 1, changes the binary); the
    others follow ``representative_value``. A value of 1 makes the argument the
    constant 1, as the JIT does: ``values={"stride_xn": 1}`` and
    ``constexprs={"stride_xn": 1}`` compile the same binary.
    """
    types = types or {}
    values = dict(values or {})
    arguments = _arguments(kernel)
    unknown = sorted((set(constexprs) | set(values)) - set(arguments))
    if unknown:
        raise ValueError(f"compile case {name!r}: {kernel.__name__} has no argument(s) {unknown}")
    fixed = sorted(set(values) & ({a for a, c in arguments.items() if c} | set(constexprs)))
    if fixed:
        raise ValueError(f"compile case {name!r}: {fixed} are constexprs: give them in constexprs, not values")
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
    pointers = sorted(a for a in values if signature.get(a, "").startswith("*"))
    if pointers:
        raise ValueError(f"compile case {name!r}: {pointers} are pointers: the gate passes 16-byte aligned "
                         f"ones, as PyTorch's allocator gives; values are for scalars")
    return CompileCase(name=name, signature=signature, constexprs=constexprs, tensor_cores=tensor_cores,
                       values=values)


# The one default rule for a scalar argument a case gives no value: an aligned
# launch, the shape the benchmarks and most training runs have. Every i32 (a
# shape, a stride, an offset) is divisible by 16 and not 1, so the JIT marks it
# tt.divisibility=16 and the compiler may vectorize loads along it; every i64
# (in ember, a Philox seed drawn at random) is not divisible; floats are never
# specialized. A case states any other value in ``values``.
_REPRESENTATIVE = {"i32": 4096, "i64": 2**33 + 1, "fp32": 0.5, "fp64": 0.5}


def representative_value(triton_type: str) -> Any:
    """The launch value the compile gate gives a scalar argument of ``triton_type`` no case names."""
    try:
        return _REPRESENTATIVE[triton_type]
    except KeyError:
        message = f"no representative value for a {triton_type!r} argument: give the case one in values"
        raise ValueError(message) from None


# Triton's element type names, back to the torch dtypes a pointer's tensor has.
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
                "i8": torch.int8, "u8": torch.uint8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64,
                "i1": torch.bool}


class AlignedPointer:
    """A stand-in for a tensor at a launch: what Triton's specialization reads (dtype, data_ptr).

    Its address is 16-byte aligned, as every tensor PyTorch's caching
    allocator hands out (it aligns to 512 bytes); a view at an odd offset
    would launch a different, unaligned binary.
    """

    def __init__(self, dtype: torch.dtype, address: int = 1 << 20) -> None:
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def launch_arguments(case: CompileCase) -> dict[str, Any]:
    """Representative launch arguments of ``case``'s kernel: every non-constexpr argument, by name.

    Pointers are aligned stand-ins of the signature's element type; scalars
    take the case's ``values``, a value the case fixed in ``constexprs`` (a
    unit stride), or ``representative_value`` of their type. Triton's binder
    turns these into the signature, constants and attributes a launch compiles.
    """
    arguments = {}
    for argument, triton_type in case.signature.items():
        if triton_type.startswith("*"):
            element = triton_type[1:]
            if element not in _TORCH_DTYPE:
                raise ValueError(f"compile case {case.name!r}: no tensor dtype for {argument}'s {triton_type!r}")
            arguments[argument] = AlignedPointer(_TORCH_DTYPE[element])
        elif argument in case.values:  # a scalar, or an object such as a TMA TensorDescriptor
            arguments[argument] = case.values[argument]
        else:
            arguments[argument] = representative_value(triton_type)
    return arguments


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
_autotuned: dict[tuple[str, int], Callable] = {}  # per (kernel, architecture): configs_for differs


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"kernel {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def candidate_configs(spec: KernelSpec) -> list[triton.Config]:
    """The configs ``launch`` may run ``spec`` at here: the interpreter's one, or the autotuner's for this GPU."""
    if interpreting():
        return spec.configs[:1]
    major, minor = torch.cuda.get_device_capability()
    return spec.configs_for(10 * major + minor)


def launch(spec: KernelSpec, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """Launch ``spec.kernel`` over ``grid(meta)``, choosing its block sizes.

    ``grid`` receives the chosen config's parameters, as with ``triton.autotune``.
    """
    if interpreting():
        config = spec.configs[0]
        if config.pre_hook is not None:  # as the autotuner calls it, with every argument by name
            named = inspect.signature(spec.kernel.fn).bind_partial(*args, **kwargs).arguments
            config.pre_hook({**named, **config.all_kwargs()})
        spec.kernel[lambda meta: grid({**meta, **config.kwargs})](*args, **kwargs, **config.kwargs)
        return
    major, minor = torch.cuda.get_device_capability()  # the device Triton launches on; cached by torch, no sync
    arch = 10 * major + minor
    tuned = _autotuned.get((spec.name, arch))
    if tuned is None:
        tuned = triton.autotune(
            configs=spec.configs_for(arch), key=list(spec.key), reset_to_zero=list(spec.reset_to_zero) or None
        )(spec.kernel)
        _autotuned[spec.name, arch] = tuned
    tuned[grid](*args, **kwargs)
