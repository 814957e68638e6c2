"""Several processes: data parallelism through PyTorch's own stack (torch.distributed, DDP, FSDP2).

    torchrun --nproc_per_node=4 $(which ember) train job.toml      # one node, 4 processes

The launcher (torchrun, or Slurm and the like setting the same variables)
starts one process per device and sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init`` joins the
process group from them (NCCL on CUDA, gloo on the CPU) and puts the process
on its ``LOCAL_RANK`` device. Without ``WORLD_SIZE`` (or with 1) nothing here
runs: one process trains exactly as it always has.

Two modes (config key ``distributed``):

- ``"ddp"``: ``DistributedDataParallel``. Every rank holds the whole model and
  optimizer state; gradients are all-reduced. The choice for LoRA and QLoRA,
  whose trainable part is small.
- ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``), each layer of the
  model's layer list sharded on its own, then the rest. Parameters, gradients
  and optimizer state are sharded (each rank holds 1/N), layers are gathered
  one at a time for their forward and backward. The choice for full
  fine-tunes. Mixed precision through ``MixedPrecisionPolicy`` (bf16 compute,
  fp32 gradient reduction).
- ``"auto"``: FSDP2 for a full fine-tune, DDP for LoRA/QLoRA.

Both modes average gradients over ranks; the loop multiplies each rank's loss
by the world size so the average becomes the sum, and normalizes it by the
targets of the whole global batch (one all-reduce of the count): N ranks with
micro-batch b make the update one rank makes with N*b.
"""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError

MODES = ("auto", "ddp", "fsdp")
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a run; the defaults are one process alone."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 prints, logs, writes the single-writer files and the final export."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def from_environment(environ=None) -> Processes:
    """The launcher's variables as a ``Processes``; a missing or malformed one is a ConfigError naming it."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        if "RANK" in environ or "LOCAL_RANK" in environ:
            raise ConfigError("RANK is set but WORLD_SIZE is not: launch with torchrun (or set WORLD_SIZE, RANK, "
                              "LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        return Processes()
    values = {}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if name not in environ:
            if name == "RANK" or environ.get("WORLD_SIZE", "").strip() != "1":
                raise ConfigError(f"WORLD_SIZE is set but {name} is not: launch with torchrun, or set "
                                  f"{', '.join(RENDEZVOUS)}")
            values[name] = 0
            continue
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {environ[name]!r}") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"WORLD_SIZE {world}, RANK {rank}, LOCAL_RANK {local}: expected 0 <= RANK < WORLD_SIZE "
                          f"and LOCAL_RANK >= 0")
    if world > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if missing and not dist.is_initialized():
            raise ConfigError(f"WORLD_SIZE is {world} but {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not set: the processes cannot find "
                              f"each other; launch with torchrun (--rdzv-endpoint for several nodes)")
    return Processes(rank=rank, local_rank=local, world_size=world)


def init(device_request: str) -> tuple[Processes, torch.device]:
    """Join the process group the launcher describes (once per process) and choose this rank's device.

    One process (no ``WORLD_SIZE``, or 1): no process group, the device as ``device_request`` says.
    """
    from .device import resolve_device

    processes = from_environment()
    device = resolve_device(device_request)
    if not processes.several:
        return processes, device
    if device.type == "cuda":
        if processes.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {processes.local_rank} but this node has {torch.cuda.device_count()} "
                              f"CUDA devices: start at most that many processes per node")
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_world_size() != processes.world_size:
        raise ConfigError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says "
                          f"{processes.world_size}")
    return processes, device


def shutdown() -> None:
    """Leave the process group (the command line does at its end; a library caller may keep it)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> Processes:
    """The processes of the group this process is in (one process alone when there is none)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Processes()
    return Processes(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                     world_size=dist.get_world_size())


def resolve_mode(requested: str, lora_r: int) -> str:
    """``"auto"``: FSDP2 for a full fine-tune (its state is what does not fit), DDP for LoRA/QLoRA."""
    if requested == "auto":
        return "fsdp" if lora_r == 0 else "ddp"
    return requested


def check(mode: str, *, lora_r: int, qlora: bool, optimizer: str, precision: str) -> None:
    """What FSDP2 does not run here, refused by name before anything loads."""
    if mode != "fsdp":
        return
    if qlora:
        raise ConfigError("qlora with distributed = 'fsdp' is not supported (NF4 base weights are not sharded); "
                          "use distributed = 'ddp' (or 'auto')")
    if lora_r:
        raise ConfigError("distributed = 'fsdp' trains full fine-tunes (lora_r = 0); LoRA adapters are small, "
                          "use distributed = 'ddp' (or 'auto')")
    if optimizer.startswith("bnb_"):
        raise ConfigError(f"optimizer {optimizer!r} with distributed = 'fsdp' is not supported: bitsandbytes' "
                          f"optimizers update whole tensors, not FSDP2's DTensor shards; use adamw8bit or adamw "
                          f"(bitsandbytes' optimizers work with distributed = 'ddp')")
    if precision == "fp16":
        raise ConfigError("precision fp16 with distributed = 'fsdp' is not supported (the loss scaler's overflow "
                          "check would be per shard); use bf16 or fp32")


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder or encoder layers): the members of its layer lists."""
    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            found.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return found


def wrap(model: nn.Module, mode: str, processes: Processes, device: torch.device,
         compute_dtype: torch.dtype | None) -> nn.Module:
    """The model as it trains on several processes: DDP around it, or FSDP2 applied in place.

    ``compute_dtype``: bf16 for the bf16 policy, FSDP2 then gathers parameters in bf16 and reduces
    gradients in fp32; None keeps the parameters' dtype.
    """
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast: the models' buffers (position ids, NF4 scales) are equal on every rank by
        # construction, and a broadcast in every forward would make evaluation a collective too.
        # Gradients as views into DDP's all-reduce buckets: no second copy of them.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (processes.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype is not None else MixedPrecisionPolicy()
    blocks = layers(model)
    if not blocks:
        raise ConfigError(f"distributed = 'fsdp': {type(model).__name__} has no layer list (nn.ModuleList) to "
                          f"shard layer by layer; use distributed = 'ddp'")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 changes the model in place: it is the model)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextmanager
def gradient_sync(model: nn.Module, sync: bool):
    """Gradients reduced over ranks only on the last micro-batch of an accumulated step."""
    if sync:
        yield
        return
    if type(model).__name__ == "DistributedDataParallel":
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with nullcontext():
        yield


# ----------------------------------------------------------------------------
# Collectives the loop needs (each a no-op for one process)
# ----------------------------------------------------------------------------


def _several() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(value, device: torch.device):
    """``value`` (an int, a float, or a list of floats) summed over every rank in one all-reduce (int64 for
    an int, float64 for floats)."""
    if not _several():
        return value
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    tensor = torch.tensor(value, dtype=dtype, device=device)
    dist.all_reduce(tensor)
    if isinstance(value, list):
        return tensor.tolist()
    return int(tensor) if dtype == torch.int64 else float(tensor)


def gather(value) -> list:
    """Every rank's ``value`` (picklable, small), in rank order."""
    if not _several():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_main(value):
    """Rank 0's ``value`` on every rank."""
    if not _several():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _several():
        dist.barrier()


def max_local_numel(param) -> int:
    """Elements of the largest local shard of an FSDP2 parameter (dim 0 cut as torch.chunk cuts it)."""
    from torch.distributed.tensor import Shard

    placements = param.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"expected a parameter sharded on dim 0 over one mesh dimension, got {placements}")
    rows = param.shape[0]
    per_rank = math.ceil(rows / param.device_mesh.size()) if rows else 0
    return per_rank * (param.numel() // rows if rows else 0)


def bytes_on_this_rank(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in the model's parameters (and buffers), their gradients and the optimizer's
    state: an FSDP2 rank counts its shards, a DDP rank its whole copy (storage shared by views counts once)."""
    from torch.distributed.tensor import DTensor

    def local(tensor):
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def total(tensors) -> int:
        seen, size = set(), 0
        for tensor in tensors:
            tensor = local(tensor)
            if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                size += tensor.numel() * tensor.element_size()
        return size

    params = list(model.parameters()) + list(model.buffers())
    return {"parameters": total(params),
            "gradients": total(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer": total(v for state in optimizer.state.values() for v in state.values())}
