"""The suites through pytest-benchmark: ``pytest bench/ --benchmark-only`` (quick sizes).

Timings on a CPU are not performance; run it on a GPU. ``ember bench`` is the
full harness (percentiles, TFLOP/s, memory, NVML, JSON, reports).
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
def test_suite(benchmark, suite, provider, params):
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
