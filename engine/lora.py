"""LoRA and QLoRA layers that run the fused ``lora_linear`` kernel, interchangeable with PEFT.

    from ember.engine.lora import LoRAConfig, apply_lora, lora_report
    model = apply_lora(model, LoRAConfig(r=16, alpha=32, quantize_base="nf4"))
    print(lora_report(model))

PEFT's file format and PEFT models (``save_adapter``, ``load_adapter``,
``from_peft``) are in ``ember.engine.peft_format``.

Design
------
- One layer, ``LoRALinear``: y = x W^T + b + scaling * dropout(x) A^T B^T through
  ``ember.kernels.lora.lora_linear``, which fuses the low-rank path into the base
  matmul instead of running PEFT's three separate matmuls and an add.
- The base weight is frozen and is either dense (an ``nn.Parameter`` with
  ``requires_grad=False``: the very Parameter of the ``nn.Linear`` it replaces,
  never a copy) or NF4 (QLoRA). NF4 storage lives in buffers so ``state_dict``,
  ``.to(device)`` and ``load_state_dict`` work; a bitsandbytes ``Linear4bit``
  is adopted without a copy (``NF4Weight.from_bnb``).
- Semantics are PEFT's, so adapters move freely both ways: the same module
  matching (``target_modules``: exact name or ``.name`` suffix, a regex string
  matched in full, or ``"all-linear"``), scaling (alpha / r, alpha / sqrt(r)
  with rsLoRA), initialisation (A kaiming-uniform with a = sqrt(5), B zeros),
  dropout on the LoRA input only, adapters kept in fp32 over a 16-bit base (PEFT's
  ``autocast_adapter_dtype``), and PEFT's on-disk format
  (``ember.engine.peft_format``).
- Dtypes: the kernel computes in x's dtype, the "compute dtype": autocast's
  when autocast is on, else the base weight's (NF4: the dtype it dequantizes
  to). Without autocast the layer casts x to the base's dtype; under autocast
  ``lora_linear`` casts x and a dense base itself, as F.linear would (see
  ``ember.kernels.autocast``). Adapters stay in their dtype (fp32 over a
  16-bit base): the kernel casts their tiles and returns their gradients in
  their dtype, so nothing of theirs is copied per call.
- ``merge()`` folds scaling * B @ A into a dense base for inference; NF4 bases
  refuse it (see ``LoRALinear.merge``).

peft and bitsandbytes are imported only where they are needed: importing them
costs seconds, and bitsandbytes prints warnings on machines without CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ember.kernels.lora import MAX_RANK, lora_linear
from ember.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["LoRAConfig", "LoRALinear", "LoRAReport", "NF4Linear", "apply_lora", "lora_report"]

ALL_LINEAR = "all-linear"

# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how; the defaults are PEFT's common attention-only setup.

    r: rank of the update, 1..256.
    alpha: the update is scaled by alpha / r (alpha / sqrt(r) with ``use_rslora``).
    dropout: dropout probability on the LoRA input while training, in [0, 1).
    target_modules: module names matched as PEFT matches them: a sequence of names
        (a module matches when its full name equals one or ends with "." + one),
        ``"all-linear"`` (every Linear but the output embedding), or any other
        string, a regex that must match the full module name.
    use_rslora: rank-stabilized scaling alpha / sqrt(r).
    quantize_base: None (keep the base weights as they are) or "nf4" (QLoRA:
        blocksize 64 with double quantization, QLoRA's defaults).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    quantize_base: str | None = None

    def __post_init__(self):
        _check_rank(self.r, "LoRAConfig.r")
        _check_alpha(self.alpha, "LoRAConfig.alpha")
        _check_dropout(self.dropout, "LoRAConfig.dropout")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be a bool, got {self.use_rslora!r}")
        if self.quantize_base not in (None, "nf4"):
            raise ValueError(f"LoRAConfig.quantize_base must be None or 'nf4', got {self.quantize_base!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("LoRAConfig.target_modules must not be empty")
            return
        if isinstance(targets, (set, frozenset)):
            targets = sorted(targets)  # a set (as PEFT resolves "all-linear") has no order to keep
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError("LoRAConfig.target_modules must be a non-empty sequence of module names or a string, "
                             f"got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)  # a list would make the frozen config unhashable

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_peft(self):
        """The same adapter as a ``peft.LoraConfig`` (the base quantization is not PEFT's to record)."""
        import peft

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                               use_rslora=self.use_rslora, bias="none")


def _check_rank(r, name: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise ValueError(f"{name} must be an int in [1, {MAX_RANK}], got {r!r}")


def _check_alpha(alpha, name: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")


def _check_dropout(p, name: str) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    # exactly PEFT's LoraLayer.update_layer, so that one adapter means the same in both
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ----------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------


class NF4Storage(nn.Module):
    """A layer whose frozen base weight is either a dense ``weight`` or an ``NF4Weight`` kept in buffers.

    Every tensor field of the NF4Weight becomes a buffer "weight_<field>", the
    rest (shape, dtype, block sizes) plain attributes; the NF4Weight is rebuilt
    per call, which costs a dataclass construction, no tensor work. Shared by
    ``LoRALinear`` and ``NF4Linear`` (a base quantized while loading), so one
    hands its storage to the other without a copy.
    """

    _nf4_fields: dict | None = None  # None: a dense base

    def _set_nf4(self, weight: NF4Weight) -> None:
        self._nf4_fields = {}
        for field in dataclasses.fields(NF4Weight):
            value = getattr(weight, field.name)
            if isinstance(value, torch.Tensor) or (value is None and field.name != "dtype"):
                self.register_buffer(f"weight_{field.name}", value)
                self._nf4_fields[field.name] = None
            else:
                self._nf4_fields[field.name] = value

    @property
    def quantized(self) -> bool:
        return self._nf4_fields is not None

    @property
    def base_weight(self) -> torch.Tensor | NF4Weight:
        """The frozen base: the dense Parameter, or the NF4Weight over this layer's buffers."""
        if not self.quantized:
            return self.weight
        fields = {name: getattr(self, f"weight_{name}") if value is None else value
                  for name, value in self._nf4_fields.items()}
        return NF4Weight(**fields)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would cast every floating buffer, and rounding the
        # fp32 NF4 scales to bf16 corrupts every block. So the NF4 buffers only move
        # device, and a cast is read as a new dequantization dtype: an empty probe
        # tensor in that dtype shows where fn sends tensors without touching data.
        if not self.quantized:
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self._nf4_fields["dtype"], device=self.weight_packed.device))
        storage = {name: self._buffers.pop(name) for name in list(self._buffers) if name.startswith("weight_")}
        super()._apply(fn, recurse)  # the bias and the adapters, as for any module
        for name, buffer in storage.items():
            self._buffers[name] = None if buffer is None else buffer.to(probe.device)
        self._nf4_fields["dtype"] = probe.dtype
        return self


class LoRALinear(NF4Storage):
    """A frozen linear layer plus a trainable low-rank update, run by the fused kernel.

    weight: (out, in) dense tensor (kept as a frozen Parameter; an ``nn.Parameter``
        is adopted as is, so the layer shares it) or an ``NF4Weight``.
    bias: (out,) or None, used as given (shared, its requires_grad untouched).
    lora_A: (r, in) and lora_B: (out, r): existing Parameters to share (``from_peft``);
        when None they are created as PEFT creates them (A kaiming-uniform with
        a = sqrt(5), B zeros) in fp32 over a 16-bit or NF4 base, else in the
        base's dtype.

    The forward pass computes in autocast's dtype, else the base's,
    and returns that dtype; see the module's design note.
    """

    def __init__(
        self,
        weight: torch.Tensor | NF4Weight,
        bias: torch.Tensor | None = None,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        lora_A: nn.Parameter | None = None,
        lora_B: nn.Parameter | None = None,
    ):
        super().__init__()
        _check_rank(r, "r")
        _check_alpha(alpha, "alpha")
        _check_dropout(dropout, "dropout")
        if isinstance(weight, NF4Weight):
            out_features, in_features = weight.shape
            base_dtype, device = weight.dtype, weight.device
            self.register_parameter("weight", None)
            self._set_nf4(weight)
        elif isinstance(weight, torch.Tensor):
            if weight.dim() != 2:
                raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
            out_features, in_features = weight.shape
            base_dtype, device = weight.dtype, weight.device
            # nn.Parameter(t) shares t's storage: no copy either way
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            self.weight.requires_grad_(False)
            self._nf4_fields = None
        else:
            raise TypeError(f"weight must be a torch.Tensor or an NF4Weight, got {type(weight).__name__}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},) to match weight, got {tuple(bias.shape)}")
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False

        # PEFT's autocast_adapter_dtype: 16-bit adapters would lose the small updates an
        # optimizer makes to them, so they stay fp32 over 16-bit and NF4 bases.
        half = base_dtype in (torch.float16, torch.bfloat16)
        adapter_dtype = torch.float32 if half or isinstance(weight, NF4Weight) else base_dtype
        self.lora_A = self._adapter(lora_A, (r, in_features), "lora_A", adapter_dtype, device)
        self.lora_B = self._adapter(lora_B, (out_features, r), "lora_B", adapter_dtype, device)
        if lora_A is None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if lora_B is None:
            nn.init.zeros_(self.lora_B)

    @staticmethod
    def _adapter(given, shape, name, dtype, device) -> nn.Parameter:
        if given is None:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        if tuple(given.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for this weight and rank, got {tuple(given.shape)}")
        return given if isinstance(given, nn.Parameter) else nn.Parameter(given)

    # -- forward --------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, got shape {tuple(x.shape)}")
        # Under autocast, F.linear and lora_linear cast to its dtype themselves;
        # otherwise the compute dtype is the base's (NF4: the dtype it dequantizes to).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype if not self.quantized else self._nf4_fields["dtype"])
        if self.merged:
            return F.linear(x, self.weight, None if self.bias is None else self.bias.to(self.weight.dtype))
        return lora_linear(x, self.base_weight, self.lora_A, self.lora_B, scaling=self.scaling, bias=self.bias,
                           dropout_p=self.dropout if self.training else 0.0)

    # -- merging ----------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in fp32 (detached)."""
        with torch.no_grad():
            return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merge(self) -> None:
        """W += scaling * B @ A, so inference runs one plain matmul. Dense bases only.

        For inference: while merged, the forward pass is F.linear and the adapters
        get no gradient. An NF4 base refuses: requantizing W + delta adds NF4's
        rounding error (several percent of each block's absmax) on top of an
        update usually far smaller than that, and ``unmerge`` could then not give
        the original base back. Dequantize the model to merge and export it.
        """
        if self.quantized:
            raise ValueError(
                "merge() needs a dense base weight; this layer's base is NF4-quantized, and requantizing "
                "W + scaling * B @ A would bury the update in quantization error (and unmerge() could not "
                "restore the base). Build the layer over the dequantized weight to merge."
            )
        if self.merged:
            return
        with torch.no_grad():
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W -= scaling * B @ A. Exact in fp32 up to rounding; a 16-bit base rounds twice, as in PEFT."""
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        base = "nf4" if self.quantized else str(self.weight.dtype).removeprefix("torch.")
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, base={base}, "
                f"bias={self.bias is not None}, merged={self.merged}")


class NF4Linear(NF4Storage, nn.Linear):
    """A frozen Linear over an NF4 weight: what ``ember.engine.loading`` makes of a layer it quantizes while
    loading, before (or without) LoRA. ``apply_lora`` adopts its storage without a copy.

    An ``nn.Linear`` for ``isinstance`` checks (module selection, PEFT's "all-linear"), with ``weight`` None:
    the base lives in the NF4 buffers. The forward pass dequantizes the whole weight to the compute dtype
    (autocast's, else the one it dequantizes to) and runs one matmul, as bitsandbytes' Linear4bit does.
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a dense weight
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.register_parameter("weight", None)
        self._set_nf4(weight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},) to match weight, got {tuple(bias.shape)}")
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
            else self._nf4_fields["dtype"]
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), dequantize_nf4(self.base_weight, dtype=dtype), bias)  # rounded once to dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, base=nf4, "
                f"bias={self.bias is not None}")


# ----------------------------------------------------------------------------
# Putting layers into a model
# ----------------------------------------------------------------------------


def bnb_linear4bit_class() -> type | None:
    # Only a model built with bitsandbytes can hold its layers: no need to import it otherwise.
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can target: nn.Linear and bitsandbytes' Linear4bit (a subclass of it)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and name}


def matches_target(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def select_targets(model: nn.Module, target_modules: Sequence[str] | str, *, strict: bool = True) -> list[str]:
    """Module names to adapt, in model order.

    Strict: each name in a sequence must match something, since a misspelt target
    would otherwise silently train fewer layers. Not strict (PEFT's rule, for
    reading PEFT's configs): only matching nothing at all is an error.
    """
    linear = _linear_modules(model)
    names_by_leaf = sorted({name.rsplit(".", 1)[-1] for name in linear})
    already = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]

    def nothing_matched(what: str) -> ValueError:
        hint = f"; these already are LoRA layers: {already[:8]}" if already else ""
        return ValueError(
            f"target_modules: {what} matches no Linear module of {type(model).__name__}; "
            f"Linear modules available (by name suffix): {names_by_leaf}{hint}"
        )

    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            # PEFT's "all-linear" leaves out the output embedding (the LM head)
            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            selected = [name for name, module in linear.items() if module is not output]
        else:
            selected = [name for name in linear if re.fullmatch(target_modules, name)]
        if not selected:
            raise nothing_matched(repr(target_modules))
        return selected
    if strict:
        for target in target_modules:
            if not any(matches_target(name, target) for name in linear):
                raise nothing_matched(repr(target))
    selected = [name for name in linear if any(matches_target(name, target) for target in target_modules)]
    if not selected:
        raise nothing_matched(f"none of {list(target_modules)}")
    return selected


def _lora_layer_for(module: nn.Linear, config: LoRAConfig, name: str) -> LoRALinear:
    linear4bit = bnb_linear4bit_class()
    options = dict(r=config.r, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora)
    if isinstance(module, NF4Linear):  # quantized while loading (ember.engine.loading): adopted, no copy
        return LoRALinear(module.base_weight, module.bias, **options)
    if linear4bit is not None and isinstance(module, linear4bit):
        return LoRALinear(nf4_from_bnb(module, name), module.bias, **options)
    if type(module) is not nn.Linear:
        # e.g. bitsandbytes' Linear8bitLt: an nn.Linear whose weight is not a plain matrix
        raise ValueError(f"target_modules: {name} is a {type(module).__name__}, which LoRA cannot wrap; "
                         "targets must be nn.Linear or bitsandbytes Linear4bit (nf4)")
    weight = module.weight
    if config.quantize_base == "nf4":
        weight = quantize_nf4(weight.detach(), blocksize=64, double_quant=True)
    return LoRALinear(weight, module.bias, **options)


def nf4_from_bnb(module: nn.Module, name: str) -> NF4Weight:
    params = module.weight
    state = getattr(params, "quant_state", None)
    if state is None or not getattr(params, "bnb_quantized", True):
        raise ValueError(f"target_modules: {name} is a Linear4bit that is not quantized yet; "
                         "move the model to its device first (bitsandbytes quantizes on .to(device))")
    if state.quant_type != "nf4":
        raise ValueError(f"target_modules: {name} is a {state.quant_type!r} Linear4bit; only 'nf4' is supported")
    return NF4Weight.from_bnb(params)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the targeted Linear layers of ``model`` in ``LoRALinear``, in place; returns ``model``.

    Every parameter but the adapters is frozen. With ``config.quantize_base="nf4"``
    the targeted dense bases are quantized; bitsandbytes Linear4bit targets are
    adopted as they are (no copy). A target matching nothing raises a ValueError
    that lists the Linear modules there are.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    targets = select_targets(model, config.target_modules)
    # build every layer before replacing any, so a bad target leaves the model untouched
    layers = {name: _lora_layer_for(model.get_submodule(name), config, name) for name in targets}
    for name, layer in layers.items():
        layer.train(model.get_submodule(name).training)  # a fresh module would be in training mode: dropout on
        replace_module(model, name, layer)
    _freeze_all_but_adapters(model)
    return model


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAReport:
    """Parameter counts and the memory of the frozen base weights LoRA adapts.

    total_params counts an NF4 weight at its logical size (out x in), as PEFT
    does for bitsandbytes 4-bit weights. base_params / base_bytes cover the
    weight matrices of the LoRA layers (not their biases, not the rest of the
    model): bytes per base parameter is 2.0 for bf16, about 0.52 for NF4 with
    double quantization.
    """

    trainable_params: int
    total_params: int
    base_params: int
    base_bytes: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def bytes_per_base_param(self) -> float:
        return self.base_bytes / self.base_params if self.base_params else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.total_params:,d} || "
                f"trainable%: {100 * self.trainable_fraction:.4f} || base weights: {self.base_params:,d} params "
                f"in {_human_bytes(self.base_bytes)} ({self.bytes_per_base_param:.3f} bytes/param)")


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def lora_report(model: nn.Module) -> LoRAReport:
    trainable = total = 0
    for param in model.parameters():  # shared Parameters are listed once
        # bitsandbytes packs two 4-bit values per uint8 element, as PEFT counts them
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    base_params = base_bytes = 0
    for layer in lora_layers(model).values():
        weight = layer.base_weight
        base_params += layer.in_features * layer.out_features
        if isinstance(weight, NF4Weight):
            total += layer.in_features * layer.out_features
            base_bytes += weight.nbytes
        else:
            base_bytes += weight.numel() * weight.element_size()
    return LoRAReport(trainable_params=trainable, total_params=total, base_params=base_params, base_bytes=base_bytes)
