"""Make a Hugging Face model train through ember's kernels.

    model = patch(model)                      # attention, loss, norms, rotary, MLP
    loss = model(**batch, labels=labels).loss

- attention: ``attn_implementation="ember"`` (``ember.engine.hf_attention``),
  for every model that dispatches through transformers' AttentionInterface.
- loss, causal LMs (Llama, Mistral, Qwen2/3, Gemma, SmolLM2, ... any
  ``*ForCausalLM`` with an ``lm_head``): with ``labels``, the loss is
  ``linear_cross_entropy`` of the final hidden states against the LM head and
  the shifted labels, so the (tokens, vocab) logits are never computed;
  ``logits`` in the output is then None. Without labels the model is unchanged.
- loss, classification heads (``*ForSequenceClassification`` single-label and
  ``*ForTokenClassification``): the logits are small and kept; the loss is
  ``ember.kernels.cross_entropy`` on them.

The patched forward takes ``num_items_in_batch`` as transformers' Trainer
passes it: the loss is then summed and divided by that count, so gradient
accumulation weights every target token (or example) of the accumulated batch
equally. Gemma 2's final logit softcap is applied inside the fused loss.
- norm, rope, mlp (``ember.engine.layers``): the RMSNorm / LayerNorm modules,
  the rotary embedding and the gated MLP of Llama, Mistral, Qwen2/3, Gemma,
  Gemma 2, Phi-3 (BERT and RoBERTa: their LayerNorms) run ember's kernels, and
  a normed input that q, k and v (or gate and up) share is cast and kept once.
  Modules ember does not recognise are left as they are; one log line
  (logger ``ember.patch``) says which parts were patched.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn

from ember.kernels import cross_entropy, linear_cross_entropy

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
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    outputs = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state
    # Position t predicts token t + 1; the last position predicts nothing (transformers' ForCausalLMLoss).
    targets = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    head = self.lm_head
    loss_sum = linear_cross_entropy(
        hidden, head.weight, targets, bias=head.bias,
        softcap=getattr(self.config, "final_logit_softcapping", None), reduction="sum",
    )
    loss = _normalized(loss_sum, (targets != -100).sum(), num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _classification_forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
    outputs = self._ember_stock_forward(*args, **kwargs)
    if labels is None:
        return outputs
    logits = outputs.logits
    targets = labels.to(logits.device).reshape(-1)
    loss_sum = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
    outputs.loss = _normalized(loss_sum, (targets != -100).sum(), num_items_in_batch)
    return outputs


def _loss_kind(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") and isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "causal-lm"
    if name.endswith("ForTokenClassification"):
        return "classification"
    if name.endswith("ForSequenceClassification"):
        problem = getattr(model.config, "problem_type", None)
        if getattr(model, "num_labels", 2) > 1 and problem in (None, "single_label_classification"):
            return "classification"
    return None


def patch(model: nn.Module, *, attention: bool = True, loss: bool = True, norm: bool = True, rope: bool = True,
          mlp: bool = True) -> nn.Module:
    """Patch ``model`` (a transformers PreTrainedModel) in place to use ember's kernels; returns it.

    Raises ValueError naming what cannot be patched when asked for: a model
    whose attention does not go through AttentionInterface, or a loss ember
    has no kernel for (regression, multi-label). norm, rope and mlp patch the
    modules ember recognises and leave the others (logged, never an error).
    Patching twice is a no-op. Apply LoRA before or after: the MLP reads its
    projections at each call.
    """
    done = {}
    if attention:
        if not getattr(model, "_supports_attention_backend", False):
            raise ValueError(f"patch: {type(model).__name__} does not dispatch attention through transformers' "
                             f"AttentionInterface; pass attention=False")
        model.set_attn_implementation(register_attention())
        done["attention"] = "ember"
    if loss and not getattr(model, _PATCHED, False):
        kind = _loss_kind(model)
        if kind is None:
            raise ValueError(f"patch: no ember loss for {type(model).__name__} (problem_type "
                             f"{getattr(model.config, 'problem_type', None)!r}); pass loss=False")
        model._ember_stock_forward = model.forward
        new_forward = _causal_lm_forward if kind == "causal-lm" else _classification_forward
        model.forward = types.MethodType(new_forward, model)
        setattr(model, _PATCHED, True)
        done["loss"] = kind
    done.update(patch_layers(model, norm=norm, rope=rope, mlp=mlp))
    logger.info("patch: %s: %s", type(model).__name__, "; ".join(f"{k}: {v}" for k, v in done.items()) or "nothing")
    return model
