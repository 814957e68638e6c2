"""The compile gate: every registered kernel, at every config, compiled for sm_80 and sm_90 as a launch compiles it.

    python -m ember.kernels.compile_check [--arch 80 90] [--kernel NAME ...] [--subset] [--json PATH]

Needs no GPU: Triton compiles ahead of time for a named target, and the
cuobjdump bundled with Triton reads registers, shared and local memory and the
instruction mix off the cubin. Each case is compiled from representative
launch arguments (``launch.launch_arguments``: aligned pointers, and integers
by the cases' ``values`` or one default rule) passed through Triton's own
launch-time binder, so integer divisibility by 16 and the value-1 constants
are those of a launch: the gate inspects the binary that runs.

One row per kernel x case x config x arch; the exit status is non-zero when
any row or any case fails:

- LOCAL or STACK > 0: registers spilled to local memory;
- shared memory over the architecture's per-block limit;
- a case that must use tensor cores: on sm_80 every config issues HMMA; on
  sm_90 every config issues HMMA or HGMMA, and at least one config of the case
  issues HGMMA (wgmma) with no spill and within shared memory. A config that
  issues only HMMA on sm_90 is reported ("sm_80-style HMMA"), not failed: on a
  GPU the autotuner picks per shape among the configs.

Each row also reports the MMA instruction kind and shape read off the SASS
(HGMMA.64x128x16; HMMA.16816 as 16x8x16), cp.async (LDGSTS) and TMA
(UTMALDG/UTMASTG/UTMAREDG) counts, the atomics, and the matmul work issued
per tile against the work the tile needs (see ``_dot_work``).

Atomics are classified from the PTX, whose memory-order qualifier is the
contract the compiler honours: ``red`` (no value returned) or ``atom``, and
``relaxed``, ``acquire``, ``release``, ``acq_rel`` or ``sc`` (no qualifier
means relaxed), with the scope; e.g. "red.relaxed.gpu(7)" (7 in the PTX). An acquire-release
atomic costs a fence (MEMBAR.*.GPU in the SASS) around each one; an
accumulation needs only relaxed ones.

``--subset`` compiles what CI compiles (``subset_jobs``): for every spec its
first case, at its first config on sm_80 and at its ``hopper_config`` on
sm_90. The full gate compiles every case at every config on both archs, in
parallel (one process per core), except a spec's ``hopper_only`` configs,
which it compiles for sm_90 only, as the autotuner runs them there only.

The interpreter cannot show any of this (no registers, no shared memory), which
is why this gate exists beside the interpreter tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Shared memory per block, opt-in maximum (CUDA programming guide, compute capabilities table).
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
HMMA_ONLY = "sm_80-style HMMA"


@dataclasses.dataclass
class Row:
    kernel: str
    case: str
    config: str
    arch: int
    tensor_cores: bool = False
    hopper_config: bool = False  # the spec's declared Hopper config
    registers: int = 0
    shared_bytes: int = 0
    local_bytes: int = 0
    hmma: int = 0
    hgmma: int = 0
    mma: str = "-"  # kind and shapes: "HGMMA 64x128x16", "HMMA 16x8x16"
    cp_async: int = 0
    tma: int = 0
    atomics: str = "-"
    work: float | None = None  # max over the kernel's dots of issued / needed MMA work per tile
    work_total: float | None = None  # the same, summed over the dots
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class CaseVerdict:
    """A case's requirement over all its configs: on sm_90, some config issues HGMMA within limits."""

    kernel: str
    case: str
    arch: int
    ok: bool
    message: str


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}: the Triton wheel should bundle it")
    return str(path)


def _inspect_cubin(cubin: bytes) -> tuple[int, int, int, int, int]:
    """(registers, static shared bytes, local/stack bytes, HMMA count, HGMMA count) of a one-kernel cubin."""
    usage, sass = _cubin_text(cubin)
    counts = _sass_counts(sass)
    return (_usage_field(usage, "REG"), _usage_field(usage, "SHARED"),
            _usage_field(usage, "LOCAL") + _usage_field(usage, "STACK"), counts["hmma"], counts["hgmma"])


def _cubin_text(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump -res-usage, cuobjdump -sass) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    return usage, sass


def _usage_field(usage: str, name: str) -> int:
    match = re.search(rf"\b{name}:(\d+)", usage)
    return int(match.group(1)) if match else 0


# HMMA names its shape by digits: 16816 is m16n8k16.
_HMMA_SHAPES = {"16816": "16x8x16", "1688": "16x8x8", "16832": "16x8x32", "884": "8x8x4", "1684": "16x8x4"}


def _sass_counts(sass: str) -> dict:
    hgmma = re.findall(r"\bHGMMA\.(\d+x\d+x\d+)", sass)
    hmma = re.findall(r"\bHMMA\.(\d+)", sass)
    kinds = []
    if hgmma:
        kinds.append("HGMMA " + ",".join(sorted(set(hgmma), key=lambda s: [int(x) for x in s.split("x")])))
    if hmma:
        kinds.append("HMMA " + ",".join(sorted({_HMMA_SHAPES.get(s, s) for s in hmma})))
    return dict(
        hgmma=len(hgmma), hmma=len(hmma), mma="+".join(kinds) or "-",
        cp_async=len(re.findall(r"\bLDGSTS\b", sass)),
        tma=len(re.findall(r"\bUTMA(?:LDG|STG|REDG)\b", sass)),
    )


_PTX_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red)((?:\.[\w:]+)+)", re.MULTILINE)
_ORDERS = ("relaxed", "acquire", "release", "acq_rel", "sc")
_SCOPES = ("cta", "cluster", "gpu", "sys")


def _atomics(ptx: str) -> str:
    """The atomics of a kernel's PTX, by kind, memory order and scope: "red.relaxed.gpu(7)", or "-"."""
    counts: dict[str, int] = {}
    for op, qualifiers in _PTX_ATOMIC.findall(ptx):
        parts = qualifiers.strip(".").split(".")
        order = next((q for q in parts if q in _ORDERS), "relaxed")  # PTX: no qualifier means .relaxed
        scope = next((q for q in parts if q in _SCOPES), "gpu")  # PTX: no scope means .gpu
        kind = f"{op}.{order}.{scope}"
        counts[kind] = counts.get(kind, 0) + 1
    return ",".join(f"{kind}({n})" for kind, n in sorted(counts.items())) or "-"


_LAYOUT_DEF = re.compile(r"^(#[\w.]+) = (#ttg\.\w+<\{.*\}>)\s*$", re.MULTILINE)
# "%d = tt.dot %a, %b, %c {attributes} : <A type> * <B type> -> tensor<MxNxf32, #layout>"
_DOT = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) [^{:\n]*(?:\{[^}\n]*\})? : (.*?) \* (.*?) -> tensor<([^>]*)>")
_SHAPED = re.compile(r"<([\dx]+)x[a-z]\w*\s*,")


def _ints(layout: str, field: str) -> list[int] | None:
    match = re.search(rf"\b{field} = \[([\d, ]+)\]", layout)
    return [int(x) for x in match.group(1).split(",")] if match else None


def _coverage(layout: str) -> list[int] | None:
    """Rows and columns one pass of the layout covers: the unit a dot's M and N are issued in.

    An MMA layout (``#ttg.nvidia_mma``) places warpsPerCTA warps of an
    instrShape instruction each (wgmma: 16 rows per warp, 64 per warpgroup);
    a blocked layout (CUDA-core dots) places sizePerThread x threadsPerWarp x
    warpsPerCTA. A tile smaller than that is broadcast: the extra warps repeat
    work another warp does.
    """
    warps = _ints(layout, "warpsPerCTA")
    if warps is None:
        return None
    if "nvidia_mma" in layout:
        instr = _ints(layout, "instrShape")
        return [w * i for w, i in zip(warps[-2:], instr[:2])] if instr else None
    if "blocked" in layout:
        size, threads = _ints(layout, "sizePerThread"), _ints(layout, "threadsPerWarp")
        if size and threads:
            return [s * t * w for s, t, w in zip(size[-2:], threads[-2:], warps[-2:])]
    return None


def _dot_work(ttgir: str) -> tuple[float | None, float | None]:
    """(max, total) over the kernel's dots of the MMA work issued per tile against the work it needs.

    needed = M*N*K of the dot's operand shapes (times any batch dims); issued
    rounds M and N up to the coverage of the result's layout (``_coverage``):
    1.0 means no warp repeats another's rows or columns; 2.0, e.g., eight
    warps (two warpgroups) on a 64-row wgmma tile, both computing the same rows.
    """
    layouts = {name: body for name, body in _LAYOUT_DEF.findall(ttgir)}
    needed_total = issued_total = 0
    worst = None
    for a_type, _b_type, result in _DOT.findall(ttgir):
        shape_match = _SHAPED.search(a_type)
        if not shape_match:
            continue
        k = int(shape_match.group(1).split("x")[-1])
        dims_part, _, layout_name = result.rpartition(",")
        dims = [int(x) for x in dims_part.split("x")[:-1]]
        layout = layouts.get(layout_name.strip(), layout_name.strip())
        coverage = _coverage(layout)
        if coverage is None or len(dims) < 2:
            continue
        batch = math.prod(dims[:-2])
        m, n = dims[-2:]
        issued_m, issued_n = (-(-m // coverage[0]) * coverage[0], -(-n // coverage[1]) * coverage[1])
        needed, issued = batch * m * n * k, batch * issued_m * issued_n * k
        needed_total, issued_total = needed_total + needed, issued_total + issued
        worst = max(worst or 0.0, issued / needed)
    return worst, (issued_total / needed_total if needed_total else None)


def _config_label(config) -> str:
    params = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{params},w={config.num_warps},s={config.num_stages}"


def specialize(fn, case, config, arch: int):
    """(signature, constexprs, attrs, options) a launch of ``fn`` with the case's arguments compiles.

    Not a re-implementation: the representative arguments (``launch_arguments``)
    go through the binder Triton's JIT builds for every kernel
    (``create_function_from_signature``, whose ``specialize_impl`` marks
    tt.divisibility and turns integers equal to 1 into constants) and through
    ``JITFunction._pack_args``, with the keyword arguments ``JITFunction.run``
    adds, as the autotuner passes a config (``Config.all_kwargs``, after its
    ``pre_hook``).
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from .launch import launch_arguments

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**case.constexprs, **config.all_kwargs()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    arguments = launch_arguments(case)
    if config.pre_hook is not None:  # e.g. sets a TMA descriptor's block shape, as the autotuner calls it
        config.pre_hook({**arguments, **case.constexprs, **config.all_kwargs()})
    bound_args, specialization, options = binder(**arguments, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def check_kernel(spec, case, config, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    hopper = spec.hopper_config is not None and spec.configs[spec.hopper_config] is config
    row = Row(spec.name, case.name, _config_label(config), arch, tensor_cores=case.tensor_cores, hopper_config=hopper)
    fn = spec.kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        row.problems.append("kernel was decorated under TRITON_INTERPRET=1: run the gate without it")
        return row
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in case.constexprs
               and p.name not in config.kwargs]
    if missing:
        row.problems.append(f"compile case gives no value for {missing}")
        return row
    try:
        signature, constexprs, attrs, options = specialize(fn, case, config, arch)
    except Exception as error:  # a bad representative value is a gate failure, reported per row
        row.problems.append(f"cannot specialize: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    # The case's declared types must be the types its representative values launch with
    # (an i64 seed given a small value would launch as i32); 1 launches as a constant.
    mismatched = [f"{name} launches as {signature[name]}, the case says {declared}"
                  for name, declared in case.signature.items()
                  if signature[name] != declared and signature[name] != "constexpr"]
    if mismatched:
        row.problems.append("representative values do not match the signature: " + "; ".join(mismatched))
        return row
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as error:  # a compile failure is a gate failure, reported per row
        row.problems.append(f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return row
    usage, sass = _cubin_text(compiled.asm["cubin"])
    counts = _sass_counts(sass)
    row.registers = _usage_field(usage, "REG")
    # ptxas puts spilled registers in the stack frame (STACK), also local memory.
    row.local_bytes = _usage_field(usage, "LOCAL") + _usage_field(usage, "STACK")
    row.shared_bytes = max(compiled.metadata.shared, _usage_field(usage, "SHARED"))
    row.hmma, row.hgmma, row.mma = counts["hmma"], counts["hgmma"], counts["mma"]
    row.cp_async, row.tma = counts["cp_async"], counts["tma"]
    row.atomics = _atomics(compiled.asm["ptx"])
    row.work, row.work_total = _dot_work(compiled.asm["ttgir"])
    if row.local_bytes > 0:
        row.problems.append(f"spills {row.local_bytes} bytes to local memory")
    if row.shared_bytes > SHARED_LIMIT_BYTES[arch]:
        row.problems.append(f"shared memory {row.shared_bytes} > {SHARED_LIMIT_BYTES[arch]}")
    if case.tensor_cores:
        if row.hmma + row.hgmma == 0:
            row.problems.append("no tensor-core instructions (HMMA/HGMMA)")
        elif arch == 80 and row.hmma == 0:
            row.problems.append("no tensor-core instructions (HMMA)")
        elif arch >= 90 and row.hgmma == 0:
            row.notes.append(HMMA_ONLY)
    return row


def verdicts(rows: list[Row]) -> list[CaseVerdict]:
    """Per (kernel, case) on sm_90 for a tensor-core case: passes only if some config issues HGMMA within limits."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.tensor_cores and row.arch >= 90:
            groups.setdefault((row.kernel, row.case, row.arch), []).append(row)
    result = []
    for (kernel, case, arch), group in groups.items():
        ready = [r for r in group if r.hgmma > 0 and r.ok]  # ok: compiled, no spill, shared memory within
        message = (f"HGMMA from {ready[0].config}" if ready else
                   f"no config of {len(group)} compiled issues HGMMA (wgmma) without spills and within shared "
                   f"memory: {HMMA_ONLY} only")
        result.append(CaseVerdict(kernel, case, arch, bool(ready), message))
    return result


def hopper_summary(rows: list[Row]) -> tuple[int, int]:
    """(Hopper-ready specs, tensor-core specs) on sm_90: a spec is ready when every tensor-core case is."""
    ready: dict[str, bool] = {}
    for verdict in verdicts(rows):
        ready[verdict.kernel] = ready.get(verdict.kernel, True) and verdict.ok
    return sum(ready.values()), len(ready)


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

    package = __package__  # "ember.kernels", also when run as __main__
    for module in pkgutil.iter_modules(sys.modules[package].__path__):
        if module.name != "compile_check":
            importlib.import_module(f"{package}.{module.name}")


def subset_jobs(spec, archs=(80, 90)) -> list[tuple[int, int, int]]:
    """(case, config, arch) indices CI compiles for a spec: one compile per arch.

    The spec's first case; on sm_80 its first config (the one the interpreter
    runs and the tests prove), on sm_90 its ``hopper_config`` (the first
    config when none is declared), the one sm_90's HGMMA requirement rests on.
    The full gate compiles every case and config on both archs.
    """
    hopper = spec.hopper_config if spec.hopper_config is not None else 0
    return [(0, hopper if arch >= 90 else 0, arch) for arch in archs]


def run(archs=(80, 90), kernels=None, workers: int | None = None, subset: bool = False) -> list[Row]:
    """Compile and inspect every (kernel, case, config, arch), or CI's subset; rows in registry order."""
    from .launch import REGISTRY

    _import_kernel_families()

    unknown = set(kernels or ()) - set(REGISTRY)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; registered: {sorted(REGISTRY)}")
    specs = [spec for spec in REGISTRY.values() if not kernels or spec.name in kernels]
    if subset:
        jobs = [(spec.name, *job) for spec in specs for job in subset_jobs(spec, archs)]
    else:
        jobs = [
            (spec.name, case_index, config_index, arch)
            for spec in specs
            for case_index in range(len(spec.compile_cases))
            for config_index in range(len(spec.configs))
            for arch in archs
            if spec.runs_on(config_index, arch)  # a hopper_only config: sm_90 only
        ]
    # Each compile is single-threaded Python + ptxas: one process per core.
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_check_job(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_check_job, jobs, chunksize=1)


def _status(row: Row) -> str:
    if not row.ok:
        return "FAIL: " + "; ".join(row.problems)
    return "ok" + (f" ({'; '.join(row.notes)})" if row.notes else "")


def format_table(rows: list[Row]) -> str:
    header = ("kernel", "case", "config", "arch", "regs", "shared", "local", "mma", "cp.async", "tma", "atomics",
              "work", "status")
    lines = [header] + [
        (r.kernel, r.case, r.config + (" [hopper]" if r.hopper_config else ""), f"sm_{r.arch}", str(r.registers),
         str(r.shared_bytes), str(r.local_bytes), r.mma.replace(" ", ":"), str(r.cp_async), str(r.tma),
         r.atomics, "-" if r.work is None else f"{r.work:.2f}", _status(r))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def to_json(rows: list[Row]) -> dict:
    """The machine-readable gate: every row, every sm_90 case verdict, the Hopper summary."""
    ready, total = hopper_summary(rows)
    return {
        "rows": [{**dataclasses.asdict(r), "ok": r.ok} for r in rows],
        "cases": [dataclasses.asdict(v) for v in verdicts(rows)],
        "summary": {"rows": len(rows), "rows_failed": sum(not r.ok for r in rows),
                    "hopper_ready_specs": ready, "tensor_core_specs": total},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ember.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT_BYTES))
    parser.add_argument("--kernel", nargs="+", help="only these registered kernels")
    parser.add_argument("--subset", action="store_true",
                        help="CI's subset: per spec its first case, at its first config on sm_80 and its hopper_config on sm_90")
    parser.add_argument("--json", metavar="PATH", help="also write rows, case verdicts and the summary as JSON")
    parser.add_argument("--workers", type=int, help="processes (default: one per core)")
    args = parser.parse_args(argv)

    rows = run(tuple(args.arch), args.kernel, workers=args.workers, subset=args.subset)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    cases = verdicts(rows)
    for verdict in cases:
        if not verdict.ok:
            print(f"FAIL case {verdict.kernel} {verdict.case} sm_{verdict.arch}: {verdict.message}")
    ready, total = hopper_summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(rows), indent=1))
    failed_cases = [v for v in cases if not v.ok]
    print(f"\n{len(rows) - len(failed)} rows passed, {len(failed)} failed; "
          f"{len(cases) - len(failed_cases)} sm_90 tensor-core cases passed, {len(failed_cases)} failed; "
          f"sm_90 Hopper-ready tensor-core specs: {ready} of {total}")
    return 1 if failed or failed_cases else 0


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
