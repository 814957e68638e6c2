"""ember's LoRA and PEFT: adapters in PEFT's on-disk format both ways, and PEFT models taken over.

    save_adapter(model, "out/adapter")        # peft.PeftModel.from_pretrained(base, "out/adapter") reads it
    load_adapter(model, "peft/adapter")       # an adapter PEFT saved, applied as ember's LoRALinear layers
    model = from_peft(peft_model)             # a PEFT LoRA model's layers swapped for ember's, tensors shared

The config file is written by PEFT's own ``LoraConfig`` and read back through
it, so the two always agree on its fields. Features PEFT has and ember does
not (DoRA, LoRA bias, rank/alpha patterns, ...) are refused with an error
naming the field, never silently dropped. peft is imported only where it is
needed: importing it costs seconds.

A complete artifact for a task with a trained head (a fine-tune's classifier):

    save_adapter(model, "out/adapter", task_type="SEQ_CLS", modules_to_save=["classifier"])

writes the head whole in PEFT's ``modules_to_save`` layout, so
``PeftModel.from_pretrained`` and ``AutoPeftModelForSequenceClassification``
load the trained head with the adapters. An adapter over an NF4 base also
records how the base was quantized (``base_quantization.json``: the keyword
arguments of transformers' ``BitsAndBytesConfig``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .atomic import write_atomically
from .lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    bnb_linear4bit_class,
    lora_layers,
    lora_scaling,
    matches_target,
    nf4_from_bnb,
    replace_module,
    select_targets,
)

__all__ = ["base_quantization", "from_peft", "load_adapter", "save_adapter"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# How the frozen base was quantized: BitsAndBytesConfig's keyword arguments (PEFT's config has no field for it).
BASE_QUANTIZATION_NAME = "base_quantization.json"
# What an ember export before modules_to_save wrote beside its adapter folder: the trained head, keys as in the model.
_LEGACY_HEAD_NAME = "head.safetensors"
# PEFT's key for one adapter matrix, written without the adapter name ("default")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_PEFT_PREFIX = "base_model.model."

# ----------------------------------------------------------------------------
# Writing PEFT's format
# ----------------------------------------------------------------------------


def _uniform(layers: dict[str, LoRALinear], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"save_adapter: the LoRA layers differ in {attribute} ({sorted(values)}); "
                         "PEFT's config holds one value (per-layer patterns are not supported)")
    return values.pop()


def _minimal_targets(model: nn.Module, adapted: Iterable[str]) -> list[str]:
    """Leaf names when they select exactly the adapted modules (PEFT's usual form), else full names."""
    adapted = set(adapted)
    candidates = {name.rsplit(".", 1)[-1] for name in adapted}
    selectable = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear)) and name]
    selected = {name for name in selectable if any(matches_target(name, t) for t in candidates)}
    return sorted(candidates) if selected == adapted else sorted(adapted)


def _check_modules_to_save(model: nn.Module, modules_to_save: Iterable[str]) -> dict[str, nn.Module]:
    """The modules saved whole, by name; each must exist, hold no LoRA layer and be the only one its name selects."""
    if isinstance(modules_to_save, str):
        raise TypeError(f"modules_to_save must be a list of module names, got the string {modules_to_save!r}")
    modules = dict(model.named_modules())
    chosen = {}
    for name in modules_to_save:
        if not name or name not in modules:
            raise ValueError(f"modules_to_save: {name!r} is not a module of {type(model).__name__}")
        if any(isinstance(m, LoRALinear) for m in modules[name].modules()):
            raise ValueError(f"modules_to_save: {name!r} holds LoRA layers; a module is adapted or saved whole, "
                             "not both")
        # PEFT selects modules_to_save by plain name suffix (str.endswith): "classifier" would also take
        # "encoder.x.classifier" or "token_classifier".
        also = sorted(other for other in modules if other != name and other.endswith(name))
        if also:
            raise ValueError(f"modules_to_save: PEFT would select {also[:4]} as well as {name!r} (it matches "
                             "names by suffix)")
        chosen[name] = modules[name]
    return chosen


def _check_task_type(task_type: str | None) -> None:
    import peft

    known = sorted(t.value for t in peft.TaskType)
    if task_type is not None and task_type not in known:
        raise ValueError(f"task_type must be None or one of PEFT's task types {known}, got {task_type!r}")


def base_quantization(model: nn.Module, compute_dtype: torch.dtype | None = None) -> dict | None:
    """How the LoRA layers' frozen bases are quantized, as transformers' ``BitsAndBytesConfig`` keyword arguments;
    None when no base is quantized.

    ``BitsAndBytesConfig(**record)`` loads a base quantized the same way: NF4,
    double quantization or not, the compute dtype (``compute_dtype``, else the
    dtype the NF4 weights dequantize to), and every other Linear layer kept dense
    (``llm_int8_skip_modules``: the head, and the Linears LoRA did not target).
    ``blocksize`` is recorded too, though BitsAndBytesConfig ignores it: bitsandbytes
    loads 4-bit weights in blocks of 64 always, as ember quantizes them.
    """
    layers = lora_layers(model)
    weights = [layer.base_weight for layer in layers.values() if layer.quantized]
    if not weights:
        return None
    # (NF4Weight allows only bitsandbytes' nested blocksize, 256, for double quantization.)
    formats = {(w.blocksize, w.nested_absmax is not None, w.dtype) for w in weights}
    if len(formats) != 1:
        raise ValueError(f"model: its NF4 bases differ in (blocksize, double quantization, dtype) "
                         f"{sorted(formats, key=str)}; one BitsAndBytesConfig cannot describe them")
    blocksize, double_quant, dequantized_dtype = formats.pop()
    dense = sorted(name for name, m in model.named_modules()
                   if (isinstance(m, nn.Linear) or (isinstance(m, LoRALinear) and not m.quantized)) and name)
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype or dequantized_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": dense or None,
        "blocksize": blocksize,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, *, task_type: str | None = None,
                 modules_to_save: Iterable[str] = (), base_model_name_or_path: str | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
    """Write the adapters of ``model`` in PEFT's format: ``peft.PeftModel.from_pretrained`` loads them.

    ``adapter_config.json`` is written by ``peft.LoraConfig`` itself;
    ``adapter_model.safetensors`` holds "base_model.model.<module>.lora_A.weight" /
    ".lora_B.weight" as PEFT names them. Each file is written to a temporary
    name in ``path`` and renamed over the old one, so a crash never leaves a
    half-written adapter under the real name.

    ``modules_to_save``: modules trained whole (a fresh classification head),
    saved as PEFT saves its ``modules_to_save``: "base_model.model.<module>.<tensor>"
    (PEFT drops its "modules_to_save.default." infix on saving). ``task_type``:
    PEFT's ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", ...), which picks the
    ``PeftModelFor...`` class and the ``AutoPeftModelFor...`` that loads it.
    ``base_model_name_or_path``: where PEFT's auto classes load the base from;
    by default the model's ``config.name_or_path``, made absolute when it is a
    local folder. An NF4 base adds ``base_quantization.json`` (see
    ``base_quantization``; ``compute_dtype`` is recorded there).
    """
    import peft
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no LoRA layers to save (call apply_lora first)")
    r, alpha = _uniform(layers, "r"), _uniform(layers, "alpha")
    dropout, use_rslora = _uniform(layers, "dropout"), _uniform(layers, "use_rslora")
    whole = _check_modules_to_save(model, modules_to_save)
    _check_task_type(task_type)
    quantization = base_quantization(model, compute_dtype)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
        if base_model_name_or_path is not None and os.path.isdir(base_model_name_or_path):
            base_model_name_or_path = os.path.abspath(base_model_name_or_path)
    os.makedirs(path, exist_ok=True)

    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
    for name, module in whole.items():
        for key, tensor in module.state_dict().items():  # PEFT saves the wrapped module's state_dict
            tensors[f"{_PEFT_PREFIX}{name}.{key}"] = tensor.detach().contiguous()
    write_atomically(Path(path) / ADAPTER_WEIGHTS_NAME,
                     lambda file: save_file(tensors, str(file), metadata={"format": "pt"}))

    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, bias="none",
        target_modules=_minimal_targets(model, layers), task_type=task_type,
        modules_to_save=list(whole) or None, base_model_name_or_path=base_model_name_or_path,
    )

    def write_config(file: Path) -> None:
        # PEFT writes the config into a folder, under its own name: give it a scratch one.
        with tempfile.TemporaryDirectory(dir=path, prefix=".tmp-config-") as scratch:
            config.save_pretrained(scratch)
            shutil.move(os.path.join(scratch, ADAPTER_CONFIG_NAME), file)

    write_atomically(Path(path) / ADAPTER_CONFIG_NAME, write_config)
    record = Path(path) / BASE_QUANTIZATION_NAME
    if quantization is not None:
        write_atomically(record, lambda file: file.write_text(json.dumps(quantization, indent=2) + "\n",
                                                              encoding="utf-8"))
    elif record.exists():  # an earlier save into this folder had an NF4 base; this one does not
        record.unlink()


# ----------------------------------------------------------------------------
# Reading PEFT's adapters and models
# ----------------------------------------------------------------------------

# PEFT config fields ember does not implement, with the value that means "unused".
_UNSUPPORTED_PEFT_FIELDS = {
    "use_dora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False, "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None,
}


def _check_supported(peft_config, where: str) -> None:
    if getattr(peft_config, "peft_type", "LORA") != "LORA":  # PeftType is a str enum
        raise ValueError(f"{where}: peft_type is {peft_config.peft_type}, only LORA adapters are supported")
    for field, unused in _UNSUPPORTED_PEFT_FIELDS.items():
        value = getattr(peft_config, field, unused)
        if value != unused and value not in (None, {}, [], ()):
            raise ValueError(f"{where}: {field}={value!r} is a PEFT feature ember's LoRA does not implement")


def _saved_whole(model: nn.Module, modules_to_save, saved: dict[str, torch.Tensor]) -> dict[str, str]:
    """model key -> saved key for the tensors of the modules PEFT saved whole.

    PEFT selects a module of ``modules_to_save`` by the end of its name (str.endswith),
    and lists names a model may not have (its SEQ_CLS config names "classifier" and
    "score" both): a listed name that selects nothing and has nothing saved is
    skipped, as PEFT skips it.
    """
    keys = {}
    for wanted in modules_to_save or ():
        for name, module in model.named_modules():
            if name.endswith(wanted):
                keys.update({f"{name}.{key}": f"{_PEFT_PREFIX}{name}.{key}" for key in module.state_dict()})
    return keys


def load_adapter(model: nn.Module, path: str | os.PathLike, *, quantize_base: str | None = None) -> nn.Module:
    """Apply the adapter PEFT saved in ``path`` (``save_pretrained``) to ``model``; returns ``model``.

    The layers to wrap are the ones the weights file names; they must be exactly
    the ones the config's ``target_modules`` select, else the error lists the
    missing and unexpected keys. The modules of ``modules_to_save`` (a trained
    head) are loaded whole. An ember export written before heads went into the
    adapter (``head.safetensors`` beside the adapter folder) has its head read
    from there. ``quantize_base="nf4"`` quantizes the adapted bases (the adapter's
    ``base_quantization.json`` says whether training did).
    """
    import peft
    from safetensors.torch import load_file

    path = os.fspath(path)
    for filename in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(path, filename)):
            raise ValueError(f"path: {path!r} has no {filename} (an adapter saved by PEFT's save_pretrained has both)")
    peft_config = peft.LoraConfig.from_pretrained(path)
    _check_supported(peft_config, f"adapter in {path!r}")
    weights = load_file(os.path.join(path, ADAPTER_WEIGHTS_NAME))
    whole = _saved_whole(model, peft_config.modules_to_save, weights)
    legacy_head = os.path.join(os.path.dirname(os.path.abspath(path)), _LEGACY_HEAD_NAME)
    if not peft_config.modules_to_save and os.path.isfile(legacy_head):
        head = load_file(legacy_head)
        unknown = sorted(set(head) - set(model.state_dict()))
        if unknown:
            raise ValueError(f"{legacy_head!r} does not fit {type(model).__name__}: unexpected keys {unknown[:8]}")
        weights.update({f"{_PEFT_PREFIX}{key}": tensor for key, tensor in head.items()})
        whole = {key: f"{_PEFT_PREFIX}{key}" for key in head}

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    saved_whole = set(whole.values())
    for key, tensor in weights.items():
        match = _PEFT_KEY.match(key)
        if match is not None:
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        elif key not in saved_whole:
            unexpected.append(key)
    targets = peft_config.target_modules
    expected = set(select_targets(model, targets if isinstance(targets, str) else sorted(targets), strict=False))
    for module in sorted(set(pairs) - expected):
        unexpected += [f"{_PEFT_PREFIX}{module}.lora_{w}.weight" for w in sorted(pairs[module])]
    missing = [f"{_PEFT_PREFIX}{m}.lora_{w}.weight" for m in sorted(expected)
               for w in "AB" if w not in pairs.get(m, {})]
    missing += sorted(saved for saved in saved_whole if saved not in weights)
    if missing or unexpected:
        raise ValueError(f"adapter in {path!r} does not fit {type(model).__name__}: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    # shapes of the whole modules first: a refused adapter leaves the model as it was
    state = model.state_dict()
    for key, saved in whole.items():
        if tuple(weights[saved].shape) != tuple(state[key].shape):
            raise ValueError(f"adapter in {path!r}: {saved} has shape {tuple(weights[saved].shape)}, the model's "
                             f"{key} has {tuple(state[key].shape)} (a head built for another number of labels?)")

    config = LoRAConfig(r=peft_config.r, alpha=peft_config.lora_alpha, dropout=peft_config.lora_dropout,
                        target_modules=tuple(sorted(expected)), use_rslora=peft_config.use_rslora,
                        quantize_base=quantize_base)
    apply_lora(model, config)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, pair in pairs.items():
            layer = layers[name]
            for which, param in (("A", layer.lora_A), ("B", layer.lora_B)):
                if pair[which].shape != param.shape:
                    raise ValueError(f"adapter in {path!r}: {_PEFT_PREFIX}{name}.lora_{which}.weight has shape "
                                     f"{tuple(pair[which].shape)}, the model's layer needs {tuple(param.shape)}")
                param.copy_(pair[which])
        state = model.state_dict(keep_vars=True)
        for key, saved in whole.items():
            state[key].copy_(weights[saved])
    return model


def from_peft(peft_model: nn.Module) -> nn.Module:
    """The base model of a PEFT LoRA model with every LoRA Linear swapped for a ``LoRALinear``.

    Like ``merge_and_unload`` but unmerged: each ember layer holds the very same
    Parameters (base weight, bias, lora_A, lora_B) as the PEFT layer it replaces,
    so outputs, gradients and optimizer state carry over. Only the adapter
    "default" with PEFT's plain LoRA over nn.Linear or bitsandbytes Linear4bit
    (nf4) is supported; anything else raises before the model is changed. The
    PEFT wrapper is consumed: use the returned model, not ``peft_model``.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else getattr(peft_model, "model", None)
    if not isinstance(base, nn.Module) or not any(isinstance(m, LoraLayer) for m in base.modules()):
        raise ValueError(f"peft_model: a {type(peft_model).__name__} with no PEFT LoRA layers")
    _check_supported(getattr(peft_model, "peft_config", {}).get("default"), "peft_model")

    linear4bit = bnb_linear4bit_class()
    layers = {}
    for name, module in base.named_modules():
        if not type(module).__module__.startswith("peft.") or any(name.startswith(done + ".") for done in layers):
            continue
        if not isinstance(module, LoraLayer):
            raise ValueError(f"peft_model: {name} is a PEFT {type(module).__name__}, which ember cannot take over")
        if set(module.lora_A.keys()) != {"default"}:
            raise ValueError(f"peft_model: {name} holds adapters {sorted(module.lora_A.keys())}; "
                             "only 'default' is supported")
        if module.merged:
            raise ValueError(f"peft_model: {name} is merged; unmerge it first")
        if module.disable_adapters or "default" not in module.active_adapters:
            raise ValueError(f"peft_model: the adapter of {name} is not active")
        variant = (module.use_dora.get("default"), module.lora_bias.get("default"),
                   getattr(module, "fan_in_fan_out", False), "default" in getattr(module, "lora_variant", {}))
        if any(variant):
            raise ValueError(f"peft_model: {name} uses a LoRA variant (DoRA, lora_bias, fan_in_fan_out, ...) "
                             "ember does not implement")
        base_layer = module.get_base_layer()
        if linear4bit is not None and isinstance(base_layer, linear4bit):
            weight = nf4_from_bnb(base_layer, name)
        elif type(base_layer) is nn.Linear:
            weight = base_layer.weight
        else:
            raise ValueError(f"peft_model: {name} adapts a {type(base_layer).__name__}; "
                             "only nn.Linear and bitsandbytes Linear4bit are supported")
        r, alpha, use_rslora = module.r["default"], module.lora_alpha["default"], module.use_rslora["default"]
        if not math.isclose(module.scaling["default"], lora_scaling(r, alpha, use_rslora)):
            raise ValueError(f"peft_model: {name} has scaling {module.scaling['default']} (changed by set_scale?), "
                             f"not {lora_scaling(r, alpha, use_rslora)} as its r and alpha give")
        dropout = module.lora_dropout["default"]
        layers[name] = LoRALinear(
            weight, base_layer.bias, r=r, alpha=alpha, use_rslora=use_rslora,
            dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            lora_A=module.lora_A["default"].weight, lora_B=module.lora_B["default"].weight,
        ).train(module.training)
    # every check passed before the first swap: a refused model is left as it was
    for name, layer in layers.items():
        replace_module(base, name, layer)
    return base
