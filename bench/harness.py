"""The benchmark runner: every case measured, every run one JSON file.

    ember bench [SUITE ...] [--quick] [--providers A,B] [--out DIR] [--device cpu|cuda]

On a GPU each case is timed with ``triton.testing.do_bench`` (median and
20th/80th percentiles after warm-up, over at least ``MIN_REPEATS`` calls;
compilation happens in the warm-up, out of the timing), turned into TFLOP/s and GB/s with the suite's analytic model
and set against the card's ceilings measured in the same run (a large bf16
matmul, a large device copy); peak memory comes from the torch allocator and
from NVML (which also sees bitsandbytes' paged memory), with NVML power, SM
clock, memory clock and temperature sampled while the case runs.

On a CPU the harness measures what means something there: each case runs in a
fresh process (forked from a server that imported the libraries once), which
reports the peak resident memory its one call added (the kernel's peak RSS
counter is reset just before the call) and the largest tensor any operator
created. CPU wall times are recorded, labelled as not
performance.

An out-of-memory error is a result ("out of memory at seq=16384"), a missing
peer a skip, and any other failure an error row; none stops the run.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import importlib.metadata
import json
import multiprocessing
import multiprocessing.forkserver
import os
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch

from ember.engine.errors import ConfigError

from .report import describe_size
from .suites import SUITES, ProviderMissing

CPU_TIMING_NOTE = "CPU wall time: not performance"
MIN_REPEATS = 10  # timed calls per GPU case at the least, so that its 20th and 80th percentiles mean something


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    env = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "ember_git_sha": _git_sha(),
        "versions": {name: _version(name) for name in ("torch", "triton", "transformers", "peft", "bitsandbytes",
                                                       "flash-attn", "liger-kernel", "cut-cross-entropy")},
    }
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, driver=_driver_version())
    return env


# ----------------------------------------------------------------------------
# NVML
# ----------------------------------------------------------------------------


def _driver_version() -> str | None:
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        try:
            version = nvml.nvmlSystemGetDriverVersion()
        finally:
            nvml.nvmlShutdown()
    except Exception:  # NVML missing or not permitted: the field is left out, not invented
        return None
    return version.decode() if isinstance(version, bytes) else version  # older nvidia-ml-py returns bytes


class NvmlSampler(threading.Thread):
    """Samples power, clocks, temperature and device memory every 10 ms while a case runs."""

    def __init__(self, index: int):
        super().__init__(daemon=True)
        self.index, self.samples, self.stopping = index, [], threading.Event()

    def run(self) -> None:
        try:
            import pynvml as nvml

            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # NVML missing or not permitted: no samples, nothing invented
            return
        try:
            while True:  # at least one reading, however short the case
                self.samples.append(dict(
                    power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                    sm_clock_mhz=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                    memory_clock_mhz=nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
                    temperature_c=nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                    used_mb=nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20))
                if self.stopping.wait(0.01):
                    break
        except Exception:  # a query this GPU does not support ends the sampling, keeping what was read
            pass
        finally:
            nvml.nvmlShutdown()

    def summary(self) -> dict:
        self.stopping.set()
        self.join()
        if not self.samples:
            return {}
        keys = self.samples[0].keys()
        summary = {f"nvml_{k}_median": sorted(s[k] for s in self.samples)[len(self.samples) // 2] for k in keys}
        summary["nvml_used_mb_peak"] = max(s["used_mb"] for s in self.samples)
        summary["nvml_samples"] = len(self.samples)
        return summary


# ----------------------------------------------------------------------------
# Measuring one case
# ----------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in message \
        or "not enough memory" in message


def measure_cuda(setup_fn, provider: str, params: dict, device: torch.device) -> dict:
    import triton.testing

    torch.cuda.empty_cache()
    setup = setup_fn(provider, params, device)
    setup.fn()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    sampler = NvmlSampler(device.index or 0)
    sampler.start()
    start = time.perf_counter()
    setup.fn()
    torch.cuda.synchronize()
    one_call_ms = (time.perf_counter() - start) * 1e3
    peak_allocated = torch.cuda.max_memory_allocated(device) - baseline
    # do_bench repeats a call for `rep` ms: 100 ms gives a 40 ms case 2 timings, whose percentiles mean nothing.
    # Slow cases get time for at least MIN_REPEATS calls (do_bench's own estimate decides the count).
    rep_ms = max(100.0, 1.25 * MIN_REPEATS * one_call_ms)
    times = triton.testing.do_bench(setup.fn, rep=rep_ms, return_mode="all")
    median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    nvml = sampler.summary()
    result = dict(time_ms=median, time_ms_p20=p20, time_ms_p80=p80, repeats=len(times),
                  peak_allocated_mb=peak_allocated / 2**20,
                  peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20, **nvml, **setup.extra)
    if setup.flops:
        result["tflops"] = setup.flops / (median * 1e-3) / 1e12
    if setup.bytes:
        result["gbps"] = setup.bytes / (median * 1e-3) / 1e9
    return result


def _memory_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS then also counts memory the allocator keeps after a free
        return None


def _allocations_map_and_unmap() -> None:
    """Every allocation over 128 KiB gets its own mapping, returned to the kernel when freed.

    glibc otherwise raises that threshold after the first large free, and later
    tensors then come from heap memory it keeps resident: a call that reuses the
    warm-up's freed memory would show no peak at all.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)


def _return_free_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def measure_cpu_here(setup_fn, provider: str, params: dict) -> dict:
    """One call on the CPU, in this process: extra peak RSS, largest tensor created, wall time."""
    from .memory import TensorSizeTracker

    device = torch.device("cpu")
    _allocations_map_and_unmap()
    setup = setup_fn(provider, params, device)
    setup.fn()  # warm-up: lazy initialisation and first-call allocations are not the case's
    _return_free_memory()
    before = _memory_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak-RSS counter (Linux >= 4.0)
    start = time.perf_counter()
    setup.fn()
    seconds = time.perf_counter() - start
    peak_extra_mb = max(0, _memory_status_kib("VmHWM") - before) / 1024
    with TensorSizeTracker() as tracker:
        setup.fn()
    return dict(peak_extra_rss_mb=peak_extra_mb, largest_tensor_mb=tracker.largest_bytes / 2**20,
                largest_tensor_shape=list(tracker.largest_shape), cpu_wall_ms=seconds * 1e3,
                timing_note=CPU_TIMING_NOTE, **setup.extra)


def measure_cpu(suite: str, provider: str, params: dict, timeout: float) -> dict:
    """``measure_cpu_here`` in a fresh process, so no other case's memory is counted.

    The process is forked from a server that has imported torch, transformers and
    the suites once (multiprocessing's forkserver), so a case costs its own work
    and not ten seconds of imports; its memory counters start from its own fork.
    """
    context = _forkserver()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_measure_in_child, args=(sender, suite, provider, params))
    child.start()
    sender.close()
    answered = receiver.poll(timeout)  # True on an answer, and at end of file: the child died without one
    answer = _receive(receiver) if answered else None
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
    if answer is None:
        if not answered:
            raise TimeoutError(f"no result within {timeout:.0f} s")
        if child.exitcode == -signal.SIGKILL:  # the kernel's OOM killer
            raise MemoryError("out of memory (the case's process was killed)")
        raise RuntimeError(f"the case's process exited with status {child.exitcode} without a result")
    kind, payload = answer
    if kind == "skipped":
        raise ProviderMissing(payload)
    if kind == "oom":
        raise MemoryError(payload)
    if kind == "error":
        raise RuntimeError(payload)
    return payload


def _receive(receiver):
    try:
        return receiver.recv()
    except EOFError:
        return None


_FORKSERVER_PRELOAD = ["torch", "transformers", "peft", "ember.bench.harness"]


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    # The CPU user's path is the PyTorch one: the server (and so every case) starts without the interpreter.
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        context.set_forkserver_preload(_FORKSERVER_PRELOAD)
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return context


def _measure_in_child(sender, suite: str, provider: str, params: dict) -> None:
    """Child-process entry: measure one CPU case and send ("ok", row) or the reason it has none."""
    try:
        answer = ("ok", measure_cpu_here(SUITES[suite].setup, provider, params))
    except ProviderMissing as missing:
        answer = ("skipped", str(missing))
    except Exception as error:  # noqa: BLE001  (sent to the parent, which makes it a row)
        answer = ("oom" if _is_oom(error) else "error", f"{type(error).__name__}: {error}")
    sender.send(answer)
    sender.close()


def run_case(suite: str, provider: str, params: dict, device: torch.device, timeout: float = 600, *,
             fresh_process: bool = True) -> dict:
    """One case as a result row. On a CPU it is measured in a fresh process unless ``fresh_process`` is False
    (a quick look, e.g. the acceptance dry run: a process per case costs more than its small case)."""
    row = dict(suite=suite, provider=provider, params=params)
    reason = SUITES[suite].unavailable(provider, device)
    if reason is not None:
        return dict(row, status="skipped", message=reason)
    try:
        if device.type == "cuda":
            measured = measure_cuda(SUITES[suite].setup, provider, params, device)
        elif fresh_process:
            measured = measure_cpu(suite, provider, params, timeout)
        else:
            measured = measure_cpu_here(SUITES[suite].setup, provider, params)
        row.update(status="ok", **measured)
    except ProviderMissing as missing:
        row.update(status="skipped", message=str(missing))
    except Exception as error:  # noqa: BLE001  (a failed case is a result, not the end of the run)
        if _is_oom(error):
            row.update(status="oom", message=f"out of memory at {describe_size(params)}")
        else:
            row.update(status="error", message=f"{type(error).__name__}: {error}"[:500])
    return row


# ----------------------------------------------------------------------------
# Ceilings and the run
# ----------------------------------------------------------------------------


def ceilings(device: torch.device) -> dict:
    """The card's measured peaks in this run: a large bf16 matmul and a large device copy."""
    if device.type != "cuda":
        return {}
    import triton.testing

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a)
    source = torch.empty(2**28, device=device, dtype=torch.uint8)
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source))
    return {"matmul_bf16_tflops": 2 * 8192**3 / (ms * 1e-3) / 1e12,
            "copy_gbps": 2 * source.numel() / (copy_ms * 1e-3) / 1e9}


def run(suites: list[str], *, quick: bool, out_dir: Path, device: torch.device, providers: list[str] | None = None,
        progress=print) -> Path:
    """Every size of every suite for each provider (or only ``providers``); returns the JSON file written."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError(f"unknown suite {', '.join(map(repr, unknown))}; suites: {', '.join(SUITES)}")
    known = {name for suite in suites for name in SUITES[suite].providers}
    unknown = [name for name in providers or () if name not in known]
    if unknown:
        raise ConfigError(f"unknown provider(s) {', '.join(unknown)} for these suites; providers: "
                         f"{', '.join(sorted(known))}")
    record = {"env": environment(device), "quick": quick, "ceilings": ceilings(device), "results": []}
    for suite in suites:
        chosen = [name for name in SUITES[suite].providers if providers is None or name in providers]
        for params in SUITES[suite].sizes(quick, device):
            for provider in chosen:
                row = run_case(suite, provider, params, device)
                record["results"].append(row)
                progress(f"{suite:14s} {provider:20s} {describe_size(params):60s} {_headline(row)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{device.type}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def _headline(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')}"
    if "time_ms" in row:
        return f"{row['time_ms']:.3f} ms" + (f", {row['tflops']:.1f} TFLOP/s" if "tflops" in row else "")
    return f"peak +{row['peak_extra_rss_mb']:.1f} MiB RSS, largest tensor {row['largest_tensor_mb']:.1f} MiB"
