"""Make a Hugging Face model train through ember's kernels.

    model = patch(model)                      # attention, loss, norms, rotary, MLP
    loss = model(**batch, labels=labels).loss

- attention: ``attn_implementation="ember"`` (``ember.engine.hf_attention``),
  for every model that dispatches through transformers' AttentionInterface.
- loss, causal LMs (the families of ``ember.engine.causal_lm_heads.HEADS``:
  Llama, Mistral, Qwen2/3, Gemma 1-3, Granite, Cohere, Mixtral, Qwen2-MoE,
  GPT-2, ...): with ``labels``, the loss is ``linear_cross_entropy`` of the
  final hidden states against the LM head and the shifted labels, with the
  family's logit scale, final softcap and MoE router loss reproduced, so the
  (tokens, vocab) logits are never computed while training. In eval mode the
  logits are returned (and the loss taken from them), so evaluation metrics
  see predictions; ``return_logits`` changes that. Without labels the model is
  unchanged. Any other family keeps its stock loss: one warning line says so
  (``loss="auto"``), or ``loss=True`` raises a ValueError naming it.
- loss, classification heads (``*ForSequenceClassification`` single-label and
  ``*ForTokenClassification``): the logits are small and kept; the loss is
  ``ember.kernels.cross_entropy`` on them.

The patched forward takes ``num_items_in_batch`` as transformers' Trainer
passes it: the loss is then summed and divided by that count, so gradient
accumulation weights every target token (or example) of the accumulated batch
equally.
- PEFT in either order: ``patch(get_peft_model(model))`` patches the
  transformers model inside PEFT's wrappers, as ``get_peft_model(patch(model))``
  does; an adapter later put on ``lm_head`` makes the patched forward run the
  stock loss for that call (logged), since the fused loss reads the bare weight.
- norm, rope, mlp (``ember.engine.layers``): the RMSNorm / LayerNorm modules,
  the rotary embedding and the gated MLP of Llama, Mistral, Qwen2/3, Gemma,
  Gemma 2, Phi-3 (BERT and RoBERTa: their LayerNorms) run ember's kernels, and
  a normed input that q, k and v (or gate and up) share is cast and kept once.
  Modules ember does not recognise are left as they are; one log line
  (logger ``ember.patch``) says which parts were patched.
"""

from __future__ import annotations

import dataclasses
import logging
import types

import torch
import torch.nn as nn

from ember.kernels import cross_entropy, linear_cross_entropy

from . import causal_lm_heads
from .hf_attention import register_attention
from .layers import patch_layers

_PATCHED = "_ember_patched"
logger = logging.getLogger("ember.patch")


def _normalized(loss_sum: torch.Tensor, count, num_items_in_batch) -> torch.Tensor:
    denominator = num_items_in_batch if num_items_in_batch is not None else count
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(loss_sum.device)
    return loss_sum / denominator


def _causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
    if labels is None:
        return self._ember_stock_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    rule, why_not = causal_lm_heads.head_rule(self)
    if rule is None:  # an adapter or another layer put on the head after patch(): stock is exact
        _log_once(self, f"patch: {type(self).__name__}: stock loss for this call: {why_not}")
        return self._ember_stock_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                         num_items_in_batch=num_items_in_batch, **kwargs)
    kwargs.pop("logits_to_keep", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    router_logits = None
    if rule.router_aux is not None:
        router_logits = kwargs.pop("output_router_logits", None)
        router_logits = self.config.output_router_logits if router_logits is None else router_logits
        kwargs["output_router_logits"] = router_logits
    outputs = causal_lm_heads.backbone(self)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state  # (B, S, H)
    if shift_labels is None:
        # Position t predicts token t + 1; the last position predicts nothing (transformers' ForCausalLMLoss).
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device)  # (B, S)
    if self._ember_return_logits == "always" or (self._ember_return_logits == "eval" and not self.training):
        # The logits are built anyway: the stock head makes them, and the loss is taken from them.
        logits = causal_lm_heads.logits(self, rule, hidden)  # (B, S, V)
        loss_sum = cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    else:
        logits = None
        fused_hidden, weight, bias, softcap = causal_lm_heads.fused_loss_inputs(self, rule, hidden)
        loss_sum = linear_cross_entropy(fused_hidden, weight, targets, bias=bias, softcap=softcap,
                                        ignore_index=ignore_index, reduction="sum")
    loss = _normalized(loss_sum, (targets != ignore_index).sum(), num_items_in_batch)
    aux_loss = None
    if router_logits:
        aux_loss = causal_lm_heads.router_aux_loss(self, outputs, attention_mask)
        loss = loss + getattr(self, rule.router_aux) * aux_loss.to(loss.device)
    return _causal_lm_output(loss, logits, aux_loss, outputs)


def _causal_lm_output(loss, logits, aux_loss, outputs):
    """transformers' output class for the family's kind, carrying what the backbone returned (cache, hidden
    states, attentions, router logits) under the field names of the installed transformers."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    kind = MoeCausalLMOutputWithPast if "router_logits" in outputs or aux_loss is not None else CausalLMOutputWithPast
    fields = {field.name for field in dataclasses.fields(kind)} - {"loss", "logits", "aux_loss"}
    carried = {name: value for name, value in outputs.items() if name in fields}
    extra = {} if aux_loss is None else {"aux_loss": aux_loss}
    return kind(loss=loss, logits=logits, **extra, **carried)


def _log_once(model: nn.Module, message: str) -> None:
    if getattr(model, "_ember_logged", None) != message:
        model._ember_logged = message
        logger.warning(message)


def _classification_forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
    outputs = self._ember_stock_forward(*args, **kwargs)
    if labels is None:
        return outputs
    logits = outputs.logits
    targets = labels.to(logits.device).reshape(-1)
    loss_sum = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
    outputs.loss = _normalized(loss_sum, (targets != -100).sum(), num_items_in_batch)
    return outputs


def _loss_kind(model: nn.Module) -> tuple[str | None, str]:
    """("causal-lm" or "classification", "") for a loss ember computes exactly, else (None, why not)."""
    name = type(model).__name__
    if name in causal_lm_heads.HEADS or name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        rule, why_not = causal_lm_heads.head_rule(model)
        return ("causal-lm", "") if rule is not None else (None, why_not)
    if name.endswith("ForTokenClassification"):
        return "classification", ""
    if name.endswith("ForSequenceClassification"):
        problem = getattr(model.config, "problem_type", None)
        if getattr(model, "num_labels", 2) > 1 and problem in (None, "single_label_classification"):
            return "classification", ""
        return None, f"no ember loss for {name} (problem_type {problem!r})"
    return None, f"no ember loss for {name}"


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT's wrappers (PeftModel -> LoraModel -> model), or ``model`` itself.

    PEFT's wrappers forward to the model's own ``forward``, so patching the inner model patches both orders:
    ``patch(get_peft_model(model))`` and ``get_peft_model(patch(model))``.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


RETURN_LOGITS = ("eval", "always", "never")


def patch(model: nn.Module, *, attention: bool = True, loss: bool | str = "auto", norm: bool = True,
          rope: bool = True, mlp: bool = True, return_logits: str = "eval") -> nn.Module:
    """Patch ``model`` (a transformers PreTrainedModel, or PEFT's model around one) in place to use ember's
    kernels; returns it.

    loss: "auto" (default) patches the loss where ember computes it exactly (the causal-LM families of
    ``ember.engine.causal_lm_heads.HEADS``, single-label and token classification) and leaves any other
    loss stock, saying so in one warning line; True raises a ValueError naming the model instead; False
    leaves the loss alone.
    return_logits: a causal LM's ``logits`` output when labels are given. "eval" (default): None while
    ``model.training`` (the fused loss never builds them), the logits (and the loss computed from them)
    in eval mode, so that Trainer's ``compute_metrics`` receives predictions; "always": in training too
    (the (tokens, vocab) logits are then built and kept for the backward, as stock); "never": None.
    Raises ValueError naming what cannot be patched when asked for: a model whose attention does not go
    through AttentionInterface, a loss ember does not know (with ``loss=True``). norm, rope and mlp patch
    the modules ember recognises and leave the others (logged, never an error). Patching twice is a
    no-op. Apply LoRA (ember's or PEFT's) before or after: the MLP reads its projections at each call.
    """
    if loss not in (True, False, "auto"):
        raise ValueError(f"patch: loss must be True, False or 'auto', got {loss!r}")
    if return_logits not in RETURN_LOGITS:
        raise ValueError(f"patch: return_logits must be one of {RETURN_LOGITS}, got {return_logits!r}")
    wrapper, model = model, transformers_model(model)
    name = type(model).__name__
    done = {}
    if attention:
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(f"patch: {name} does not dispatch attention through transformers' "
                             f"AttentionInterface; pass attention=False")
        model.set_attn_implementation(register_attention())
        done["attention"] = "ember"
    if loss and not getattr(model, _PATCHED, False):
        kind, why_not = _loss_kind(model)
        if kind is None and loss is True:
            raise ValueError(f"patch: {why_not}; pass loss='auto' to keep the stock loss, or loss=False")
        if kind is None:
            logger.warning("patch: %s: loss left stock: %s", name, why_not)
            done["loss"] = "stock"
        else:
            model._ember_stock_forward = model.forward
            model._ember_return_logits = return_logits
            new_forward = _causal_lm_forward if kind == "causal-lm" else _classification_forward
            model.forward = types.MethodType(new_forward, model)
            setattr(model, _PATCHED, True)
            done["loss"] = kind
    done.update(patch_layers(model, norm=norm, rope=rope, mlp=mlp))
    logger.info("patch: %s: %s", name, "; ".join(f"{k}: {v}" for k, v in done.items()) or "nothing")
    return wrapper
