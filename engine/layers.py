"""The rest of a transformer layer through ember's kernels: norms, rotary embeddings and the gated MLP.

``ember.engine.patch.patch`` applies these to a Hugging Face model; each piece
is usable alone.

- Norms: a recognised RMSNorm (Llama, Mistral, Qwen2/3, Phi-3: ``weight *
  normed.to(dtype)``; Gemma, Gemma 2: ``(normed * (1 + weight)).to(dtype)``)
  or BERT/RoBERTa's ``nn.LayerNorm`` runs ``ember.kernels.rms_norm`` /
  ``layer_norm``, which keep the input and one or two fp32 numbers per row
  instead of fp32 copies of input and output.
- Rotary: transformers' attention forwards call the module-level function
  ``apply_rotary_pos_emb`` of their modeling file. That name is pointed, once
  per modeling file, at a dispatcher that runs ``ember.kernels.apply_rotary``
  while a patched attention module runs and transformers' own function
  otherwise, so an unpatched model in the same process stays stock and no
  model forward is copied. The kernel keeps nothing of q or k.
- One cast of a shared input: q, k and v (and gate and up) read the same
  normed input. Under autocast each projection would cast it to the autocast
  dtype and keep its own copy; a pre-hook on the attention module (and the
  gated MLP's forward) casts it once, so it is kept once.
- The gated MLP (``GatedMLPFunction``): ``down(act(gate(x)) * up(x))`` over the
  three projections as one autograd Function, LoRA adapters (``LoRALinear``)
  or plain ``nn.Linear`` for each. It keeps x (once), gate and up, and each
  adapter's rank-r ``x A^T``; the product act(gate) * up, which the down
  projection would keep, is recomputed in the backward, and so are the base
  weights' 16-bit copies under autocast (the fp32 weights are read again,
  where ``lora_linear`` would keep a cast copy per call). PEFT's LoRA layers,
  bitsandbytes layers and anything else the function does not know run the
  stock composition with the fused activation (``swiglu``/``geglu``), which
  already drops the activation's own saved output.

Modules are patched by swapping their class for a subclass made once per stock
class (``EmberLlamaRMSNorm(LlamaRMSNorm)``): parameters, buffers, names,
``state_dict`` keys, hooks and ``isinstance`` checks stay as they were; only
``forward`` changes. ``unpatch_module`` restores the stock class.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import NF4Weight, apply_rotary, geglu, layer_norm, rms_norm, swiglu
# The gated MLP runs LoRA's forward and backward halves itself (so that it can recompute the product and
# re-read the base weights between them), through lora's public halves rather than lora_linear's Function.
from ember.kernels.lora import lora_dropout_seed, lora_linear_backward, lora_linear_forward
from ember.kernels.autocast import autocast_dtype, autocast_off

from .lora import LoRALinear

__all__ = ["GatedMLPFunction", "gated_mlp", "patch_layers", "unpatch_module"]

# ----------------------------------------------------------------------------
# What ember recognises, by transformers' class names (checked to come from
# transformers' own modeling files, so a user's look-alike is left alone).
# ----------------------------------------------------------------------------

# RMSNorm class -> (eps attribute, offset added to the weight, where the result is rounded)
RMS_NORMS = {
    "LlamaRMSNorm": ("variance_epsilon", 0.0, "llama"),
    "MistralRMSNorm": ("variance_epsilon", 0.0, "llama"),
    "Qwen2RMSNorm": ("variance_epsilon", 0.0, "llama"),
    "Qwen3RMSNorm": ("variance_epsilon", 0.0, "llama"),
    "Phi3RMSNorm": ("variance_epsilon", 0.0, "llama"),
    "GemmaRMSNorm": ("eps", 1.0, "gemma"),
    "Gemma2RMSNorm": ("eps", 1.0, "gemma"),
}
# Model types whose nn.LayerNorm modules are the plain post-norm ones ember's layer_norm computes.
LAYER_NORM_MODELS = ("bert", "roberta")
# Gated MLP class -> (names of the projections to the intermediate size, the activation module's name)
GATED_MLPS = {
    "LlamaMLP": (("gate_proj", "up_proj"), "act_fn"),
    "MistralMLP": (("gate_proj", "up_proj"), "act_fn"),
    "Qwen2MLP": (("gate_proj", "up_proj"), "act_fn"),
    "Qwen3MLP": (("gate_proj", "up_proj"), "act_fn"),
    "GemmaMLP": (("gate_proj", "up_proj"), "act_fn"),
    "Gemma2MLP": (("gate_proj", "up_proj"), "act_fn"),
    "Phi3MLP": (("gate_up_proj",), "activation_fn"),  # one projection to 2 * I: gate, then up
}
# Attention modules whose forward calls their modeling file's apply_rotary_pos_emb on q and k.
ROTARY_ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                     "Gemma2Attention", "Phi3Attention")
# Attention modules whose hidden_states feed q, k and v alone (the residual add reads the caller's copy).
SHARED_INPUT_ATTENTIONS = ROTARY_ATTENTIONS + ("BertSelfAttention", "RobertaSelfAttention")


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.models.")


def _activation_kind(act: nn.Module) -> str | None:
    """"silu", "tanh" or "none" (gelu's approximate) for the activations the fused kernels compute, else None."""
    from transformers import activations

    if isinstance(act, (nn.SiLU, activations.SiLUActivation)):
        return "silu"
    if type(act) is activations.GELUTanh:
        return "tanh"
    if type(act) is activations.GELUActivation:
        return "none"
    if type(act) is nn.GELU:
        return act.approximate
    return None


# ----------------------------------------------------------------------------
# Class swapping: one subclass per stock class, forward replaced.
# ----------------------------------------------------------------------------


@functools.cache
def _ember_class(stock: type, mixin: type) -> type:
    return type(f"Ember{stock.__name__}", (mixin, stock), {"_ember_stock_class": stock})


def _swap_class(module: nn.Module, mixin: type) -> None:
    module.__class__ = _ember_class(type(module), mixin)


def unpatch_module(module: nn.Module) -> None:
    """Give every module of ``module`` patched by this file its stock class back."""
    for m in module.modules():
        stock = type(m).__dict__.get("_ember_stock_class")
        if stock is not None:
            m.__class__ = stock
        for handle in getattr(m, "_ember_hooks", ()):
            handle.remove()
        m.__dict__.pop("_ember_hooks", None)


def _patched(module: nn.Module) -> bool:
    return "_ember_stock_class" in type(module).__dict__


# ----------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------


class _RMSNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        eps_name, offset, cast = RMS_NORMS[self._ember_stock_class.__name__]
        return rms_norm(hidden_states, self.weight, eps=getattr(self, eps_name), offset=offset, cast=cast)


class _LayerNorm:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, eps=self.eps)


def _patch_norms(model: nn.Module) -> int:
    count = 0
    layer_norms = getattr(getattr(model, "config", None), "model_type", None) in LAYER_NORM_MODELS
    for module in model.modules():
        if _patched(module):
            continue
        if type(module).__name__ in RMS_NORMS and _from_transformers(module):
            _swap_class(module, _RMSNorm)
            count += 1
        elif layer_norms and type(module) is nn.LayerNorm and module.elementwise_affine \
                and len(module.normalized_shape) == 1:
            _swap_class(module, _LayerNorm)
            count += 1
    return count


# ----------------------------------------------------------------------------
# Rotary embeddings, and one cast of the attention's input
# ----------------------------------------------------------------------------

_ROTARY_ON = contextvars.ContextVar("ember_rotary_on", default=False)


def _rotary_dispatcher(stock):
    @functools.wraps(stock)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not _ROTARY_ON.get():
            return stock(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        return apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._ember_stock = stock
    return apply_rotary_pos_emb


def _install_rotary(module: nn.Module) -> bool:
    """Point the module's modeling file's apply_rotary_pos_emb at the dispatcher (once per file)."""
    modeling = sys.modules[type(module).__module__]
    stock = getattr(modeling, "apply_rotary_pos_emb", None)
    if stock is None:
        return False
    if not hasattr(stock, "_ember_stock"):
        modeling.apply_rotary_pos_emb = _rotary_dispatcher(stock)
    return True


def _rotary_on(module, args, kwargs):
    module._ember_rotary_token = _ROTARY_ON.set(True)


def _rotary_off(module, args, kwargs, output):
    token = module.__dict__.pop("_ember_rotary_token", None)
    if token is not None:
        _ROTARY_ON.reset(token)


def _cast_input_once(module, args, kwargs):
    """hidden_states in the autocast dtype, cast here once rather than by each of q, k and v."""
    if args:
        hidden = args[0]
        dtype = autocast_dtype(hidden)
        if dtype is not None and hidden.is_floating_point() and hidden.dtype != dtype:
            args = (hidden.to(dtype),) + tuple(args[1:])
    elif "hidden_states" in kwargs:
        hidden = kwargs["hidden_states"]
        dtype = autocast_dtype(hidden)
        if dtype is not None and hidden.is_floating_point() and hidden.dtype != dtype:
            kwargs = dict(kwargs, hidden_states=hidden.to(dtype))
    return args, kwargs


def _hook(module: nn.Module, handle) -> None:
    module.__dict__.setdefault("_ember_hooks", []).append(handle)


def _patch_attention(model: nn.Module, rope: bool) -> tuple[int, int]:
    """(attention modules with one shared input cast, with ember's rotary)."""
    shared = rotary = 0
    for module in model.modules():
        name = type(module).__name__
        if not _from_transformers(module) or getattr(module, "_ember_hooks", None):
            continue
        if name in SHARED_INPUT_ATTENTIONS:
            _hook(module, module.register_forward_pre_hook(_cast_input_once, with_kwargs=True))
            shared += 1
        if rope and name in ROTARY_ATTENTIONS and _install_rotary(module):
            _hook(module, module.register_forward_pre_hook(_rotary_on, with_kwargs=True))
            _hook(module, module.register_forward_hook(_rotary_off, with_kwargs=True, always_call=True))
            rotary += 1
    return shared, rotary


# ----------------------------------------------------------------------------
# The gated MLP
# ----------------------------------------------------------------------------


class _Projection:
    """What the Function needs of one projection: a LoRALinear (not merged) or a plain nn.Linear.

    tensors: (weight, bias, lora_a, lora_b), None where absent; an NF4 base is
    held here, not among the tensors (it is buffers, never differentiated).
    """

    def __init__(self, module: nn.Module, training: bool):
        if isinstance(module, LoRALinear):
            base = module.base_weight
            self.nf4 = base if isinstance(base, NF4Weight) else None
            self.tensors = (None if self.nf4 is not None else base, module.bias, module.lora_A, module.lora_B)
            self.scaling, self.dropout_p = module.scaling, module.dropout if training else 0.0
        else:
            self.nf4 = None
            self.tensors = (module.weight, module.bias, None, None)
            self.scaling, self.dropout_p = 0.0, 0.0
        self.out_features = module.out_features

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if isinstance(module, LoRALinear):
            return not module.merged
        return type(module) is nn.Linear


class _Run:
    """One projection's forward state inside the Function: its tensors, xa (LoRA) and dropout seed."""

    def __init__(self, projection: _Projection, weight, bias, lora_a, lora_b):
        self.p = projection
        self.weight = projection.nf4 if projection.nf4 is not None else weight
        self.bias, self.lora_a, self.lora_b = bias, lora_a, lora_b
        self.xa, self.seed = None, 0

    def weight_in(self, dtype):
        # Read again (and cast again) in the backward rather than keeping a 16-bit copy per call.
        return self.weight if isinstance(self.weight, NF4Weight) else self.weight.to(dtype)

    def forward(self, x2):  # (M, in) -> (M, out)
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        if self.lora_a is None:
            return F.linear(x2, self.weight_in(x2.dtype), bias)
        self.seed = lora_dropout_seed(self.p.dropout_p)
        # The uncast weight: lora_linear_forward casts it for this call only.
        y, self.xa = lora_linear_forward(x2, self.weight, self.lora_a, self.lora_b, scaling=self.p.scaling,
                                         bias=bias, dropout_p=self.p.dropout_p, seed=self.seed)
        return y

    def backward(self, dy2, x2, needs_dx: bool):
        """(dx, grads of (weight, bias, lora_a, lora_b)) for dy2 (M, out) and the input x2 (M, in)."""
        grad_bias = None
        if self.bias is not None and self.bias.requires_grad:
            grad_bias = dy2.sum(0, dtype=torch.float32).to(self.bias.dtype)
        if self.lora_a is None:
            dx = dy2 @ self.weight_in(x2.dtype) if needs_dx else None
            grad_weight = None
            if self.weight.requires_grad:
                grad_weight = (dy2.t() @ x2).to(self.weight.dtype)
            return dx, (grad_weight, grad_bias, None, None)
        dx, grad_a, grad_b = lora_linear_backward(dy2, x2, self.xa, self.weight, self.lora_a, self.lora_b,
                                                  scaling=self.p.scaling, dropout_p=self.p.dropout_p,
                                                  seed=self.seed, needs_dx=needs_dx)
        return dx, (None, grad_bias, grad_a.to(self.lora_a.dtype), grad_b.to(self.lora_b.dtype))


def _activate(gate, up, activation: str):
    """act(gate) * up through the fused kernels; act(gate) alone when up is None (BERT's plain MLP)."""
    if up is None:
        return F.silu(gate) if activation == "silu" else F.gelu(gate, approximate=activation)
    return swiglu(gate, up) if activation == "silu" else geglu(gate, up, approximate=activation)


def _gate_and_up(outs, gated: bool):
    if not gated:
        return outs[0], None
    return outs[0].chunk(2, dim=-1) if len(outs) == 1 else outs


class GatedMLPFunction(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)), keeping x, gate, up and the adapters' x A^T; the product is recomputed.

    ``projections``: the _Projection of gate and up (or of one fused gate_up
    projection whose output is [gate | up]) and of down; ``tensors``: their
    (weight, bias, lora_a, lora_b) in that order, flattened, for autograd.
    Not ``gated``: y = down(act(up(x))) (BERT's MLP), keeping x and up(x).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, dtype, activation, gated, projections, *tensors):
        # x (M, H) -> (M, H); every matmul in ``dtype``
        runs = [_Run(p, *tensors[4 * i:4 * i + 4]) for i, p in enumerate(projections)]
        x2 = x.to(dtype)  # kept once for gate and up (no copy when x is in dtype already)
        *ups, down = runs
        outs = [run.forward(x2) for run in ups]
        y = down.forward(_activate(*_gate_and_up(outs, gated), activation))  # the product lives only here
        ctx.save_for_backward(x2, *outs, *(run.xa for run in runs), *tensors)
        for run in runs:
            run.xa = None  # through saved_tensors only, so that checkpointing's hooks see every activation
        ctx.runs, ctx.activation, ctx.gated, ctx.x_dtype = runs, activation, gated, x.dtype
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        runs = ctx.runs
        x2, outs = saved[0], saved[1:len(runs)]
        for run, xa in zip(runs, saved[len(runs):2 * len(runs)]):
            run.xa = xa
        *ups, down = runs
        with torch.enable_grad():
            outs = [o.detach().requires_grad_() for o in outs]
            # recomputed; the activation's own Function keeps gate and up (no copies) until the grad below
            product = _activate(*_gate_and_up(outs, ctx.gated), ctx.activation)
        d_product, down_grads = down.backward(dy, product.detach(), needs_dx=True)
        d_outs = torch.autograd.grad(product, outs, d_product)
        del product
        dx, grads = None, []
        for run, d_out in zip(ups, d_outs):
            dx_part, run_grads = run.backward(d_out, x2, needs_dx=ctx.needs_input_grad[0])
            grads += run_grads
            if dx_part is not None:
                # summed in fp32: as autograd sums the fp32 gradients of two separately cast inputs
                dx = dx_part.float() if dx is None else dx.add_(dx_part)
        grads += down_grads
        dx = None if dx is None else dx.to(ctx.x_dtype)
        return (dx, None, None, None, None, *grads)


def gated_mlp(x: torch.Tensor, up_projections: tuple[nn.Module, ...], down: nn.Module, activation: str,
              training: bool = False, gated: bool = True) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) through ``GatedMLPFunction``.

    x: (..., H). up_projections: (gate, up), or (gate_up,) whose output is [gate | up] (Phi-3);
    with ``gated=False``, (up,) and y = down(act(up(x))) (BERT).
    Each projection a ``LoRALinear`` or an ``nn.Linear``. activation: "silu"
    (SwiGLU), "tanh" or "none" (GeGLU, gelu's approximation). Matmuls run in
    autocast's dtype when it is on, else in the base weights' dtype.
    """
    first = up_projections[0]
    if isinstance(first, LoRALinear) and first.quantized:
        base_dtype = first._nf4_fields["dtype"]
    else:
        base_dtype = first.weight.dtype
    dtype = autocast_dtype(x) or base_dtype
    projections = [_Projection(m, training) for m in (*up_projections, down)]
    tensors = [t for p in projections for t in p.tensors]
    y = GatedMLPFunction.apply(x.reshape(-1, x.shape[-1]), dtype, activation, gated, projections, *tensors)
    return y.view(*x.shape[:-1], y.shape[-1])


class _GatedMLP:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names, act_name = GATED_MLPS[self._ember_stock_class.__name__]
        projections = tuple(getattr(self, n) for n in names)
        activation = _activation_kind(getattr(self, act_name))
        if activation is not None and all(_Projection.supports(m) for m in (*projections, self.down_proj)):
            return gated_mlp(x, projections, self.down_proj, activation, self.training)
        # PEFT's or bitsandbytes' layers (or an activation the kernels lack): the stock composition, with the
        # fused activation where there is one.
        outs = [m(x) for m in projections]
        gate, up = _gate_and_up(outs, True)
        act = getattr(self, act_name)
        product = act(gate) * up if activation is None else _activate(gate, up, activation)
        return self.down_proj(product)


class _PlainMLPLayer:
    """BERT/RoBERTa's layer: intermediate (dense, act) then output (dense, dropout, LayerNorm(. + input)) as one
    recomputing MLP, so that act(dense(x)) is not kept for the output dense. This replaces the layer's
    three-line feed_forward_chunk, so hooks on ``intermediate`` and ``output`` themselves are not called."""

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        intermediate, output = self.intermediate, self.output
        activation = _activation_kind(intermediate.intermediate_act_fn)
        if activation is None or not all(_Projection.supports(m) for m in (intermediate.dense, output.dense)):
            return super().feed_forward_chunk(attention_output)
        hidden = gated_mlp(attention_output, (intermediate.dense,), output.dense, activation, self.training,
                           gated=False)
        return output.LayerNorm(output.dropout(hidden) + attention_output)


PLAIN_MLP_LAYERS = ("BertLayer", "RobertaLayer")


def _unfusable_projections(module: nn.Module) -> list[str]:
    names, _ = GATED_MLPS[type(module).__name__.removeprefix("Ember")]
    kinds = [type(getattr(module, n)) for n in (*names, "down_proj") if not _Projection.supports(getattr(module, n))]
    return [f"{k.__module__}.{k.__qualname__}" for k in kinds]


def _patch_mlps(model: nn.Module) -> tuple[int, set[str]]:
    """(MLP modules patched, names of the projection types that will run unfused)."""
    count, unfused = 0, set()
    for module in model.modules():
        if _patched(module) or type(module).__name__ not in GATED_MLPS or not _from_transformers(module):
            continue
        names, act_name = GATED_MLPS[type(module).__name__]
        if _activation_kind(getattr(module, act_name)) is None:
            continue
        unfused.update(_unfusable_projections(module))
        _swap_class(module, _GatedMLP)
        count += 1
    for module in model.modules():
        if _patched(module) or type(module).__name__ not in PLAIN_MLP_LAYERS or not _from_transformers(module):
            continue
        if _activation_kind(module.intermediate.intermediate_act_fn) is None:
            continue
        kinds = [type(m) for m in (module.intermediate.dense, module.output.dense) if not _Projection.supports(m)]
        unfused.update(f"{k.__module__}.{k.__qualname__}" for k in kinds)
        _swap_class(module, _PlainMLPLayer)
        count += 1
    return count, unfused


# ----------------------------------------------------------------------------
# All together
# ----------------------------------------------------------------------------


def patch_layers(model: nn.Module, *, norm: bool = True, rope: bool = True, mlp: bool = True) -> dict[str, str]:
    """Route the recognised norm, rotary and MLP modules of ``model`` through ember's kernels, in place.

    Returns {part: what was done} for each part asked for, for the one log line
    ``patch`` writes; a part with nothing recognised says so. Patching twice is
    a no-op for modules already patched.
    """
    done = {}
    if norm:
        n = _patch_norms(model)
        done["norm"] = f"{n} modules" if n else "none recognised"
    shared, rotary = _patch_attention(model, rope) if (rope or mlp or norm) else (0, 0)
    if rope:
        done["rope"] = f"{rotary} attention modules" if rotary else "none recognised"
    if mlp:
        n, unfused = _patch_mlps(model)
        done["mlp"] = f"{n} modules" if n else "none recognised"
        if unfused:
            done["mlp"] += f" (projections of type {', '.join(sorted(unfused))} run unfused)"
    if shared:
        done["input cast"] = f"once per {shared} attention modules"
    return done


@contextlib.contextmanager
def rotary_enabled():
    """Run ember's rotary in transformers' apply_rotary_pos_emb inside the block (tests, benchmarks)."""
    token = _ROTARY_ON.set(True)
    try:
        yield
    finally:
        _ROTARY_ON.reset(token)
