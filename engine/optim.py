"""Optimizers: ember's fused 8-bit AdamW, and one factory over it and its peers.

    optimizer = build("adamw8bit", model.parameters(), lr=2e-4, weight_decay=0.01)

| name                  | what                                   | state bytes / parameter |
|-----------------------|----------------------------------------|-------------------------|
| "adamw"               | torch.optim.AdamW, fused               | 8 (fp32 m and v)        |
| "adamw8bit"           | ember's AdamW8bit (this module)        | 2 + 8/256 per block     |
| "bnb_adamw8bit"       | bitsandbytes.optim.AdamW8bit           | 2 + 8/256 per block     |
| "bnb_paged_adamw8bit" | bitsandbytes.optim.PagedAdamW8bit      | same, in paged memory   |

(The README lists the values measured by ``state_bytes_per_param``.)
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:  # a torch built without torch.distributed: no parameter is ever a DTensor
    class DTensor:  # noqa: D101
        pass

from ember.kernels.adamw8bit import MIN_8BIT_SIZE, adamw8bit_step, init_state, num_blocks

OPTIMIZERS = ("adamw", "adamw8bit", "bnb_adamw8bit", "bnb_paged_adamw8bit")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise 8-bit moments, updated by one fused kernel per bucket of parameters.

    Numerically bitsandbytes' ``AdamW8bit`` (0.50): signed/unsigned dynamic
    maps, blocks of 256, tensors under ``min_8bit_size`` elements in fp32
    state, decoupled weight decay; see ``ember.kernels.adamw8bit``.

    Per parameter group, besides lr, betas, eps and weight_decay:

    - ``state_bits``: 8 (default) or 32; 32 keeps fp32 state for the group,
      e.g. ``[{"params": embeddings, "state_bits": 32}, {"params": rest}]``.
    - ``stochastic_rounding``: bf16 parameters are rounded stochastically when
      written, so they can be trained without an fp32 master copy.

    With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` hands the step
    the scale and the overflow flag as device tensors: the gradients are
    unscaled in the kernel and an overflowed step changes nothing, with no
    host sync. ``state_dict`` / ``load_state_dict`` round-trip the uint8 codes
    and fp32 absmax exactly, whatever the parameters' dtype.
    """

    # GradScaler then sets `grad_scale` and `found_inf` on the optimizer before
    # calling step(), instead of unscaling and checking for inf on the host.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 8,
        stochastic_rounding: bool = False,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 1):
            raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        state_bits=state_bits, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        bits = group["state_bits"]
        if bits == 8 and param.numel() < self.min_8bit_size:  # a DTensor's numel is the whole tensor's
            bits = 32  # so every rank chooses as one process would
        if not isinstance(param, DTensor):
            return init_state(param, state_bits=bits)
        return _sharded_state(param, bits)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and grad_scale is None:
            # The user unscaled the gradients already (to clip them): only the flag applies.
            grad_scale = torch.ones((), dtype=torch.float32, device=found_inf.device)
        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                if isinstance(p, DTensor):  # an FSDP2 shard: the kernel updates this rank's part in place
                    if p.to_local().numel() == 0:
                        continue
                    params.append(p.to_local())
                    grads.append(p.grad.to_local())
                    states.append(_local_state(state, p.to_local().numel()))
                    continue
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            adamw8bit_step(
                params, grads, states,
                lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=group["stochastic_rounding"],
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but every state tensor keeps its saved dtype.

        torch casts floating state to the parameter's dtype, which would turn
        the fp32 absmax and fp32 moments of a bf16 parameter into bf16: resume
        would no longer be exact.
        """
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    key: value.to(param.device, copy=True) if isinstance(value, torch.Tensor) else value
                    for key, value in state_dict["state"][saved_id].items()
                }


def _sharded_state(param: DTensor, bits: int) -> dict:
    """State of an FSDP2 parameter (a DTensor sharded on dim 0): each rank quantizes its own shard.

    The blocks of 256 values are counted from the start of each local shard, so no block straddles two
    ranks and the kernel runs unchanged on the local tensors. Where every shard but the last holds a
    multiple of 256 elements the blocks are exactly those of one process; otherwise each shard's last
    block is shorter. Moments (codes or fp32) are DTensors placed as the parameter, so
    torch.distributed.checkpoint saves each rank's part; the absmax of each rank is padded to the blocks of
    the largest shard and laid out as one DTensor of (world size x those blocks): it reloads only on the
    same world size.
    """
    from .distributed import max_local_numel

    local = param.to_local()
    state = init_state(local, state_bits=bits)
    mesh, placements = param.device_mesh, param.placements
    for key in ("state1", "state2"):
        state[key] = DTensor.from_local(state[key], mesh, placements, run_check=False, shape=param.shape,
                                        stride=param.stride())
    if bits == 8:
        blocks = num_blocks(max_local_numel(param))
        for key in ("absmax1", "absmax2"):
            padded = torch.zeros(blocks, dtype=torch.float32, device=local.device)
            state[key] = DTensor.from_local(padded, mesh, [Shard(0)], run_check=False,
                                            shape=(blocks * mesh.size(),), stride=(1,))
    return state


def _local_state(state: dict, local_numel: int) -> dict:
    """The kernel's view of a sharded state: this rank's tensors, the absmax cut to its shard's blocks."""
    local = {key: value.to_local() if isinstance(value, DTensor) else value for key, value in state.items()}
    for key in ("absmax1", "absmax2"):
        if key in local:
            local[key] = local[key][: num_blocks(local_numel)]
    return local


def build(
    name: str,
    params: Iterable,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    stochastic_rounding: bool = False,
    min_8bit_size: int = MIN_8BIT_SIZE,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of ``OPTIMIZERS``) over ``params``, with AdamW's hyperparameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    if stochastic_rounding and name != "adamw8bit":
        raise ValueError(f"stochastic_rounding is offered by adamw8bit only, not {name!r}")
    params = list(params)
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper, fused=_fused_allowed(params))
    if name == "adamw8bit":
        return AdamW8bit(params, **hyper, stochastic_rounding=stochastic_rounding, min_8bit_size=min_8bit_size)
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit if name == "bnb_adamw8bit" else bnb.optim.PagedAdamW8bit
    return optimizer(params, **hyper, min_8bit_size=min_8bit_size)


def _fused_allowed(params: list) -> bool:
    """torch's fused AdamW runs on CUDA and CPU, for floating parameters all on one device type."""
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    device_types = {p.device.type for p in tensors}
    return len(device_types) == 1 and device_types <= {"cuda", "cpu"} and all(p.is_floating_point() for p in tensors)


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Optimizer state bytes per parameter it holds state for, as measured on its tensors.

    Tensors shared between parameters (bitsandbytes' quantization maps) count once. With FSDP2 both
    counts are this rank's: its shards and their state.
    """
    seen: set[int] = set()
    state_bytes = 0
    params = 0
    for param, state in optimizer.state.items():
        params += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
        for value in state.values():
            value = value.to_local() if isinstance(value, DTensor) else value  # an FSDP2 rank's own part
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                state_bytes += value.numel() * value.element_size()
    return state_bytes / params if params else 0.0
