"""Loading a model for a small card: in the target dtype, on the target device, NF4 bases quantized while loading.

    from ember.engine import from_pretrained, LoRAConfig
    model = from_pretrained("HuggingFaceTB/SmolLM2-135M", lora=LoRAConfig(r=16, target_modules="all-linear"),
                            load_in_4bit=True, dtype=torch.bfloat16, device="cuda")

``from_pretrained`` is the one-line integration (in the spirit of Liger's
``AutoLigerKernelForCausalLM``): load, LoRA or QLoRA, ember's kernels, and a
plain transformers model back for any trainer. ``load_pretrained`` is the
loader under it, and under ``ember train``.

How the loader works (``stream``):

1. the model is built on the ``meta`` device (``accelerate.init_empty_weights``):
   no memory for its parameters;
2. the safetensors file(s) are read one tensor at a time, the file mapped
   only while that tensor is read (``safetensors.safe_open``); a checkpoint
   key is renamed as transformers renames it (its conversion mapping and the
   base-model prefix);
3. a Linear layer to be quantized gets its weight in the file's dtype on the
   target device, is quantized there to NF4 (``quantize_nf4``), and becomes an
   ``NF4Linear`` (``apply_lora`` adopts it without a copy); the 16/32-bit copy
   is freed before the next tensor is read. Everything else is cast to the
   target dtype and placed on its device;
4. tied weights are tied, weights the checkpoint lacks (a fresh
   classification head) are initialized by transformers' own
   ``initialize_weights``, as ``from_pretrained`` does.

So the host never holds more than the model as it will be (NF4 bases, the
rest in the target dtype) plus the one tensor being converted; the old path
(``transformers.from_pretrained`` in fp32, quantize, move) held the whole fp32
model first. What the streaming loader does not support (``.bin``
checkpoints, transformers' weight converters such as fused MoE experts,
``_keep_in_fp32_modules``) goes through ``from_pretrained`` as before, with
one log line (logger ``ember.loading``), and is quantized after loading.

Placement (``device_map``): a device for everything, ``"auto"`` (accelerate's
``infer_auto_device_map`` over the visible GPUs, then the CPU), or a dict
from module names to devices ("" for the whole model), as transformers takes
it. A map over several devices is dispatched with accelerate's hooks
(``dispatch_model``), which move activations between them; ``"disk"`` is
refused.

Hub ids (``"HuggingFaceTB/SmolLM2-135M"``) are read from the local Hugging
Face cache only (``HF_HUB_CACHE``); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ember.kernels.nf4 import quantize_nf4

from .errors import ConfigError
from .lora import LoRAConfig, NF4Linear, apply_lora, replace_module, select_targets

logger = logging.getLogger("ember.loading")

__all__ = ["from_pretrained", "hub_snapshot", "load_pretrained"]

TASK_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
}

# ----------------------------------------------------------------------------
# Hub ids from the local cache
# ----------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(spec: str) -> bool:
    """``org/name``: one slash, no leading ``/``, ``.`` or ``~`` (those are paths)."""
    return bool(_HUB_ID.fullmatch(spec)) and ".." not in spec


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str) -> Path:
    """The folder of ``repo_id``'s snapshot in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {repo_id!r} is neither a folder here nor in the local Hugging Face cache "
                          f"({cache}); ember never downloads: run `hf download {repo_id}` once, or give a "
                          f"model folder") from None


# ----------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------


def _placement(model: nn.Module, device, device_map, dtype: torch.dtype) -> dict[str, torch.device]:
    """{module name prefix: device}, "" covering the whole model, from ``device`` or ``device_map``."""
    from .device import resolve_device

    if device is not None and device_map is not None:
        raise ValueError("device and device_map: give one of them, not both")
    if device_map is None:
        return {"": resolve_device(device if device is not None else "cpu")}
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        inferred = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
        device_map = {name: ("cuda:" + str(place) if isinstance(place, int) else place)
                      for name, place in inferred.items()}
    if isinstance(device_map, (str, torch.device)):
        return {"": resolve_device(device_map)}
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"device_map must be 'auto', a device, or a non-empty dict of module names to devices, "
                         f"got {device_map!r}")
    placement = {}
    for name, place in device_map.items():
        if place == "disk":
            raise ValueError(f"device_map[{name!r}] = 'disk': ember does not offload to disk")
        if name and not _has_submodule(model, name):
            raise ValueError(f"device_map: {name!r} is not a module of {type(model).__name__}")
        placement[name] = resolve_device(f"cuda:{place}" if isinstance(place, int) else place)
    return placement


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _device_for(key: str, placement: dict[str, torch.device]) -> torch.device:
    """The device of the longest module prefix of ``key`` in the placement."""
    parts = key.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in placement:
            return placement[prefix]
    raise ValueError(f"device_map places no module holding {key!r}; add it (or \"\" for everything else)")


# ----------------------------------------------------------------------------
# The streaming loader
# ----------------------------------------------------------------------------


class Unsupported(Exception):
    """What the streaming loader leaves to transformers' from_pretrained (the reason is logged)."""


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise Unsupported(f"no model.safetensors in {folder} (other formats load through transformers)")


def _skeleton(folder: Path, task: str, dtype, hf_kwargs: dict):
    """(model on the meta device, its config); the dtype resolved ("auto"/None: the config's, else fp32)."""
    import transformers
    from accelerate import init_empty_weights

    auto_class = getattr(transformers, TASK_CLASSES[task])
    config = transformers.AutoConfig.from_pretrained(folder, **hf_kwargs)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # Buffers stay real: non-persistent ones (rotary frequencies) are computed here and not in the file.
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    return model, dtype


def stream(folder: Path, *, task: str = "causal-lm", dtype=None, device=None, device_map=None,
           quantize: Sequence[str] | str | Callable | None = None, **hf_kwargs) -> nn.Module:
    """The model in ``folder`` built tensor by tensor (see the module's note); raises ``Unsupported``."""
    model, dtype = _skeleton(folder, task, dtype, hf_kwargs)
    if model._get_dtype_plan(dtype):
        raise Unsupported(f"{type(model).__name__} keeps some modules in fp32 (_keep_in_fp32_modules)")
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    if len(renamings) < len(transforms):
        raise Unsupported(f"{type(model).__name__}'s checkpoints go through transformers' weight converters")
    placement = _placement(model, device, device_map, dtype)
    to_quantize = set(_quantize_targets(model, quantize))
    expected = dict(model.state_dict(keep_vars=True))  # name -> meta tensor
    loaded = _read_checkpoint(model, _checkpoint_files(folder), expected, to_quantize, placement, dtype,
                              lambda key: rename_source_key(key, renamings, [], model.base_model_prefix, expected)[0])
    missing_targets = sorted(name for name in to_quantize if f"{name}.weight" not in loaded)
    if missing_targets:
        raise ValueError(f"quantize: {missing_targets[:4]} have no weight in the checkpoint (a fresh layer would "
                         f"be quantized random values)")
    _finish(model, set(expected) - loaded, placement, dtype)
    devices = set(placement.values())
    if len(devices) > 1:  # accelerate's hooks move activations between the devices
        from accelerate import dispatch_model

        dispatch_model(model, device_map={name: str(place) for name, place in placement.items()})
    return model.eval()


def _read_checkpoint(model, files, expected, to_quantize, placement, dtype, rename: Callable[[str], str]) -> set[str]:
    """Copy every checkpoint tensor into ``model``; returns the names loaded. Unexpected keys are skipped (as
    transformers skips them); a shape that differs is an error naming the key."""
    from safetensors import safe_open

    loaded = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as checkpoint:
            keys = list(checkpoint.keys())
        for key in keys:
            name = rename(key)
            if name not in expected or name in loaded:
                continue
            # The file is mapped for this one tensor: a mapping kept open over the whole file keeps every page
            # read resident, which is the whole checkpoint by the end (measured: 518 MiB of SmolLM2's 538 MiB).
            with safe_open(str(file), framework="pt", device="cpu") as checkpoint:
                shape = tuple(checkpoint.get_slice(key).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"checkpoint tensor {key!r} has shape {shape}, the model expects "
                                     f"{tuple(expected[name].shape)} for {name!r}")
                tensor = checkpoint.get_tensor(key)
            module_name, _, leaf = name.rpartition(".")
            device = _device_for(name, placement)
            if module_name in to_quantize and leaf == "weight":
                _quantize_into(model, module_name, tensor.to(device), dtype)
            else:
                _set_tensor(model, name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None))
            del tensor  # the file's copy goes before the next one is read
            loaded.add(name)
    return loaded


def _quantize_targets(model: nn.Module, quantize) -> list[str]:
    """Names of the Linear layers ``quantize`` selects: LoRA's target_modules, or a function of the model."""
    if quantize is None:
        return []
    return select_targets(model, quantize(model) if callable(quantize) else quantize)


def _quantize_into(model: nn.Module, name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """Layer ``name`` becomes an NF4Linear over ``weight`` quantized as read from the file (its values exactly,
    not rounded to ``dtype`` first), dequantizing to ``dtype``."""
    import dataclasses

    linear = model.get_submodule(name)
    nf4 = dataclasses.replace(quantize_nf4(weight, blocksize=64, double_quant=True), dtype=dtype)
    layer = NF4Linear(nf4, linear.bias)  # the bias: still on meta, or loaded already; set by name either way
    layer.train(linear.training)
    replace_module(model, name, layer)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        param = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
        param._is_hf_initialized = True  # transformers' initialize_weights leaves it alone
        module._parameters[leaf] = param
    else:
        tensor._is_hf_initialized = True
        module._buffers[leaf] = tensor


def _finish(model: nn.Module, missing: set[str], placement, dtype) -> None:
    """Tie what is tied, give the checkpoint's missing weights transformers' initialization, buffers to devices."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for name in missing - tied:
        current = model.get_parameter_or_buffer(name)
        value = torch.empty_like(current, device=_device_for(name, placement),
                                 dtype=dtype if current.is_floating_point() else current.dtype)
        _set_tensor(model, name, value)
        # from_config marked every module initialized (on meta); these get transformers' init now.
        model.get_parameter_or_buffer(name)._is_hf_initialized = False
        model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = False
    for module in model.modules():
        if isinstance(module, NF4Linear):
            module._is_hf_initialized = True  # nothing to initialize: its base was read and quantized
    model.initialize_weights()
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    for name, buffer in list(model.named_buffers()):
        device = _device_for(name, placement)
        if buffer.device != device:
            _set_tensor(model, name, buffer.to(device))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"the checkpoint leaves {left[:4]} unset")


# ----------------------------------------------------------------------------
# The loader with its fallback
# ----------------------------------------------------------------------------


def load_pretrained(folder: str | Path, *, task: str = "causal-lm", dtype=None, device=None, device_map=None,
                    quantize: Sequence[str] | str | Callable | None = None, **hf_kwargs) -> nn.Module:
    """The ``task``'s model from a Hugging Face folder, in ``dtype`` on ``device`` (or placed by ``device_map``),
    the Linear layers that ``quantize`` selects (as LoRA's ``target_modules`` does, or a function of the model
    returning their names) as NF4Linear.

    Streams the checkpoint (``stream``); what it does not support loads through transformers' from_pretrained
    and is then quantized and moved, with one log line saying why.
    """
    if task not in TASK_CLASSES:
        raise ValueError(f"task must be one of {', '.join(TASK_CLASSES)}, got {task!r}")
    folder = Path(folder)
    try:
        return stream(folder, task=task, dtype=dtype, device=device, device_map=device_map, quantize=quantize,
                      **hf_kwargs)
    except Unsupported as reason:
        logger.info("loading %s through transformers' from_pretrained (whole model, then quantized): %s",
                    folder, reason)
    return _load_whole(folder, task, dtype, device, device_map, quantize, hf_kwargs)


def _load_whole(folder: Path, task, dtype, device, device_map, quantize, hf_kwargs) -> nn.Module:
    """The old path: transformers loads everything, then the targets are quantized in place and the model moved."""
    import transformers

    auto_class = getattr(transformers, TASK_CLASSES[task])
    if device is not None and device_map is not None:
        raise ValueError("device and device_map: give one of them, not both")
    model = auto_class.from_pretrained(folder, dtype=dtype if dtype is not None else "auto",
                                       device_map=device_map, **hf_kwargs)
    if quantize is not None:
        for name in _quantize_targets(model, quantize):
            linear = model.get_submodule(name)
            _quantize_into(model, name, linear.weight.detach(), linear.weight.dtype)
    if device_map is None:
        model.to(device if device is not None else "cpu")
    return model


# ----------------------------------------------------------------------------
# The one-line integration
# ----------------------------------------------------------------------------


def from_pretrained(path_or_id: str | os.PathLike, *, task: str = "causal-lm", lora: LoRAConfig | dict | None = None,
                    load_in_4bit: bool = False, dtype=None, device=None, device_map=None, attention: bool = True,
                    loss: bool = True, norm: bool = True, rope: bool = True, mlp: bool = True,
                    **hf_kwargs) -> nn.Module:
    """A transformers model ready to fine-tune through ember's kernels, in one call.

    path_or_id: a Hugging Face model folder, ``asset:<name>`` (ember's offline assets), or a hub id
        (``org/name``) already in the local Hugging Face cache (never downloaded).
    task: "causal-lm", "sequence-classification" or "token-classification" (pass ``num_labels=...``
        for a fresh head: ``hf_kwargs`` go to the model's config).
    lora: a ``LoRAConfig`` (or a dict of its fields): adapters on its ``target_modules``, everything else
        frozen; None: no adapters.
    load_in_4bit: the LoRA targets (all Linear layers but the output embedding when ``lora`` is None) are
        quantized to NF4 while loading (QLoRA); also implied by ``lora.quantize_base="nf4"``.
    dtype: what everything else is loaded in (torch.float32 / bfloat16 / float16); None: the config's.
    device, device_map: where it goes (see the module's note); neither: the CPU.
    attention, loss, norm, rope, mlp: which of ember's kernels ``ember.engine.patch`` puts in.

    Returns the model (a plain ``PreTrainedModel``: Trainer, TRL and ``save_adapter`` take it as it is).
    """
    from .data import model_folder
    from .patch import patch

    if isinstance(lora, dict):
        lora = LoRAConfig(**lora)
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise TypeError(f"lora must be a LoRAConfig, a dict of its fields, or None; got {type(lora).__name__}")
    if not isinstance(load_in_4bit, bool):
        raise TypeError(f"load_in_4bit must be a bool, got {load_in_4bit!r}")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16, torch.float16 or None, got {dtype!r}")
    for name, value in dict(attention=attention, loss=loss, norm=norm, rope=rope, mlp=mlp).items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    quantize = None
    if load_in_4bit or (lora is not None and lora.quantize_base == "nf4"):
        quantize = lora.target_modules if lora is not None else "all-linear"
    model = load_pretrained(model_folder(os.fspath(path_or_id)), task=task, dtype=dtype, device=device,
                            device_map=device_map, quantize=quantize, **hf_kwargs)
    if lora is not None:  # first, so that patch's log names the layers the fused MLP will see
        apply_lora(model, lora)
    return patch(model, attention=attention, loss=loss, norm=norm, rope=rope, mlp=mlp)
