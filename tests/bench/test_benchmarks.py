"""The suites through pytest-benchmark: ``pytest tests/bench/test_benchmarks.py --benchmark-only`` (quick sizes).

Skipped unless ``--benchmark-only`` is given: a plain ``pytest`` run (CI) proves
the suites in tests/bench/test_suites.py and test_harness.py instead of timing
them. Timings on a CPU are not performance; run it on a GPU. ``ember bench`` is
the full harness (percentiles, TFLOP/s, memory, NVML, JSON, reports).
"""

from __future__ import annotations

import pytest
import torch

from ember.bench.suites import SUITES, ProviderMissing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(name, provider, params) for name, suite in SUITES.items()
         for params in suite.sizes(True, DEVICE) for provider in suite.providers]


@pytest.mark.parametrize(("suite", "provider", "params"), CASES,
                         ids=[f"{s}-{p}-" + "-".join(str(v) for v in params.values()) for s, p, params in CASES])
def test_suite(benchmark, request, suite, provider, params):
    if not request.config.getoption("benchmark_only"):
        pytest.skip("a benchmark: run with --benchmark-only")
    reason = SUITES[suite].unavailable(provider, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    try:
        setup = SUITES[suite].setup(provider, params, DEVICE)
    except ProviderMissing as missing:
        pytest.skip(str(missing))
    benchmark.extra_info.update(flops=setup.flops, bytes=setup.bytes, **setup.extra)
    if DEVICE.type == "cuda":  # time the work, not only its launch
        benchmark(lambda: (setup.fn(), torch.cuda.synchronize()))
    else:
        benchmark(setup.fn)
