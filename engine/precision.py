"""Mixed precision: the policy is decided once, logged with its reason, and read everywhere else.

| policy      | weights (trainable)   | matmuls            | loss scaling | optimizer writes            |
|-------------|-----------------------|--------------------|--------------|-----------------------------|
| "bf16"      | fp32 (master weights) | bf16 autocast      | no           | fp32                        |
| "fp16"      | fp32 (master weights) | fp16 autocast      | GradScaler   | fp32                        |
| "bf16-pure" | bf16, no master copy  | bf16               | no           | bf16, stochastically rounded|
| "fp32"      | fp32                  | fp32               | no           | fp32                        |

"auto" picks bf16 where the device has native bf16 matmuls (CUDA sm_80 and
later; a CPU with AVX512-BF16 or AMX), fp16 with loss scaling on older GPUs,
and fp32 on a CPU without it (emulated bf16 is many times slower there). An
explicit "bf16" is allowed on any CPU. Every
ember kernel behaves under autocast as the op it replaces
(``ember.kernels.autocast``), so the policy applies to them unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from .device import resolve_device

logger = logging.getLogger("ember.precision")

POLICIES = ("bf16", "fp16", "bf16-pure", "fp32")


@dataclasses.dataclass(frozen=True)
class Precision:
    policy: str
    reason: str
    device_type: str
    param_dtype: torch.dtype  # the dtype trainable weights are kept in
    autocast_dtype: torch.dtype | None  # None: no autocast
    loss_scaling: bool
    stochastic_rounding: bool  # for the optimizer: bf16 weights without a master copy

    def autocast(self):
        """The context the forward pass runs in (and nothing when the policy has no autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16: elsewhere its scale/step/update are pass-throughs."""
        return torch.amp.GradScaler(self.device_type, enabled=self.loss_scaling)

    def __str__(self) -> str:
        return f"{self.policy} ({self.reason})"


def _native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA sm_80 and later; a CPU with AVX512-BF16 or AMX. Elsewhere on a CPU bf16
    is emulated, correct but far slower than fp32 (a 2048x1024 by 1024x1024 matmul: 5.2 s against 0.09 s)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def decide(requested: str = "auto", device: torch.device | str = "cpu") -> Precision:
    """The precision policy for training on ``device``: ``requested`` (one of POLICIES) or "auto"."""
    if requested not in POLICIES + ("auto",):
        raise ValueError(f"precision must be one of auto, {', '.join(POLICIES)}; got {requested!r}")
    device = resolve_device(device)
    native_bf16 = _native_bf16(device)
    where = "the CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)

    if requested != "auto":
        policy, reason = requested, f"requested ({where})"
    elif native_bf16:
        policy = "bf16"
        reason = (f"auto: {where} supports bf16; bf16 autocast with fp32 master weights "
                  f"keeps fp32's range, so no loss scaling")
    elif device.type == "cpu":
        policy = "fp32"
        reason = "auto: the CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is emulated and slower than fp32"
    else:
        policy = "fp16"
        reason = f"auto: {where} has no native bf16; fp16 autocast with dynamic loss scaling"
    # A CPU runs bf16 correctly without native support (slowly): asked for, it is allowed.
    if policy in ("bf16", "bf16-pure") and device.type == "cuda" and not native_bf16:
        raise ValueError(f"precision {policy!r}: {where} has no native bf16 support; use fp16 or fp32")

    chosen = Precision(
        policy=policy,
        reason=reason,
        device_type=device.type,
        param_dtype=torch.bfloat16 if policy == "bf16-pure" else torch.float32,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(policy),
        loss_scaling=policy == "fp16",
        stochastic_rounding=policy == "bf16-pure",
    )
    logger.info("precision: %s", chosen)
    return chosen
