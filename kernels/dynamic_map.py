"""bitsandbytes' dynamic 8-bit quantization maps, bit for bit.

A dynamic map spends its 256 codes like a tiny float: for each decade
10**-6 .. 10**0 it has evenly spaced fractions, twice as many per decade as
the one below, so small magnitudes keep relative precision. bitsandbytes
quantizes NF4's nested absmax with the signed map and its 8-bit optimizers'
first moment with the signed map and second moment (never negative) with the
unsigned one, which spends the sign bit on finer fractions.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    data: list[float] = []
    for i in range(7):
        # bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8):
        # 2**i fractions per decade signed, 2**(i+1) unsigned.
        boundaries = torch.linspace(0.1, 1, 2 ** (i if signed else i + 1) + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        # The decade factor applied to an fp32 tensor, then the round trip
        # through Python floats: bitsandbytes' own arithmetic, so values match.
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 codes of ``bitsandbytes.functional.create_dynamic_map(signed)``.

    Signed: [-0.993, 1] with 0 among them; unsigned: [0, 1]. A fresh tensor per
    call, so callers may keep or modify it.
    """
    return _dynamic_map_cpu(bool(signed)).to(device, copy=True)
