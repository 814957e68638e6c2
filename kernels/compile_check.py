"""The compile gate: every registered kernel, at every config, compiled for sm_80 and sm_90.

    python -m ember.kernels.compile_check [--arch 80 90] [--kernel NAME ...]

Needs no GPU: Triton compiles ahead of time for a named target, and the
cuobjdump bundled with Triton reads registers, shared and local memory and the
instruction mix off the cubin. One row per kernel x case x config x arch; the
exit status is non-zero when any row fails:

- LOCAL or STACK > 0: registers spilled to local memory;
- shared memory over the architecture's per-block limit;
- a case that must use tensor cores has no HMMA (sm_80) or HMMA/HGMMA (sm_90).

The interpreter cannot show any of this (no registers, no shared memory), which
is why this gate exists beside the interpreter tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}


@dataclasses.dataclass
class Row:
    kernel: str
    case: str
    config: str
    arch: int
    registers: int = 0
    shared_bytes: int = 0
    local_bytes: int = 0
    hmma: int = 0
    hgmma: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}: the Triton wheel should bundle it")
    return str(path)


def _inspect_cubin(cubin: bytes) -> tuple[int, int, int, int, int]:
    """(registers, static shared bytes, local/stack bytes, HMMA count, HGMMA count) of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", usage)
        return int(match.group(1)) if match else 0

    hgmma = len(re.findall(r"\bHGMMA\.", sass))
    hmma = len(re.findall(r"\bHMMA\.", sass))
    # ptxas puts spilled registers in the stack frame (STACK), also local memory.
    return field("REG"), field("SHARED"), field("LOCAL") + field("STACK"), hmma, hgmma


def _config_label(config) -> str:
    params = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{params},w={config.num_warps},s={config.num_stages}"


def check_kernel(spec, case, config, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec.name, case.name, _config_label(config), arch)
    fn = spec.kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        row.problems.append("kernel was decorated under TRITON_INTERPRET=1: run the gate without it")
        return row
    # Pointers are 16-byte aligned (PyTorch's allocator guarantees more), as the
    # JIT would specialize them at a real launch.
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in case.signature.items() if ty.startswith("*")}
    signature = {name: case.signature.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, ty in signature.items() if ty == "constexpr" and n not in case.constexprs
               and n not in config.kwargs]
    if missing:
        row.problems.append(f"compile case gives no value for {missing}")
        return row
    source = ASTSource(fn=fn, signature=signature, constexprs={**case.constexprs, **config.kwargs}, attrs=attrs)
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # a compile failure is a gate failure, reported per row
        row.problems.append(f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    registers, static_shared, local, hmma, hgmma = _inspect_cubin(compiled.asm["cubin"])
    row.registers, row.local_bytes, row.hmma, row.hgmma = registers, local, hmma, hgmma
    row.shared_bytes = max(compiled.metadata.shared, static_shared)
    if local > 0:
        row.problems.append(f"spills {local} bytes to local memory")
    if row.shared_bytes > SHARED_LIMIT_BYTES[arch]:
        row.problems.append(f"shared memory {row.shared_bytes} > {SHARED_LIMIT_BYTES[arch]}")
    if case.tensor_cores and hmma + hgmma == 0:
        row.problems.append("no tensor-core instructions (HMMA/HGMMA)")
    return row


def _check_job(job: tuple[str, int, int, int]) -> Row:
    from .launch import REGISTRY

    name, case_index, config_index, arch = job
    spec = REGISTRY[name]
    return check_kernel(spec, spec.compile_cases[case_index], spec.configs[config_index], arch)


def _import_kernel_families() -> None:
    """Import every module of ember.kernels, so each family registers its kernels.

    Discovered rather than listed: a new kernel family joins the gate by existing.
    """
    import importlib
    import pkgutil

    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(sys.modules[package].__path__):
        if module.name != "compile_check":
            importlib.import_module(f"{package}.{module.name}")


def run(archs=(80, 90), kernels=None, workers: int | None = None) -> list[Row]:
    """Compile and inspect every (kernel, case, config, arch); rows in registry order."""
    from .launch import REGISTRY

    _import_kernel_families()

    unknown = set(kernels or ()) - set(REGISTRY)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; registered: {sorted(REGISTRY)}")
    jobs = [
        (spec.name, case_index, config_index, arch)
        for spec in REGISTRY.values() if not kernels or spec.name in kernels
        for case_index in range(len(spec.compile_cases))
        for config_index in range(len(spec.configs))
        for arch in archs
    ]
    # Each compile is single-threaded Python + ptxas: one process per core.
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_check_job(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_check_job, jobs, chunksize=1)


def format_table(rows: list[Row]) -> str:
    header = ("kernel", "case", "config", "arch", "regs", "shared", "local", "HMMA", "HGMMA", "status")
    lines = [header] + [
        (r.kernel, r.case, r.config, f"sm_{r.arch}", str(r.registers), str(r.shared_bytes), str(r.local_bytes),
         str(r.hmma), str(r.hgmma), "ok" if r.ok else "FAIL: " + "; ".join(r.problems))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT_BYTES))
    parser.add_argument("--kernel", nargs="+", help="only these registered kernels")
    args = parser.parse_args(argv)

    rows = run(tuple(args.arch), args.kernel)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _reexec_without_interpreter() -> None:
    # Kernels decorated under TRITON_INTERPRET=1 are interpreter objects that
    # cannot be compiled; Triton reads the variable at decoration time, so the
    # gate runs in a process of its own without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "ember.kernels.compile_check", *sys.argv[1:]], env)


if __name__ == "__main__":
    from .backend import interpreting

    if interpreting():
        _reexec_without_interpreter()
    sys.exit(main())
