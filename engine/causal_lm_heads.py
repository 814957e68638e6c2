"""What each causal-LM family does between its backbone and its loss, so that ember's fused loss does the same.

``patch()`` replaces a causal LM's loss by ``linear_cross_entropy`` of the final
hidden states against the LM head, which never builds the (tokens, vocab)
logits. That is only right when ember knows everything the family's stock
``forward`` does after the backbone: a scale on the logits (Granite divides by
``logits_scaling``, Cohere multiplies by ``logit_scale``), a final softcap
(Gemma 2/3), an auxiliary loss (the MoE routers' load balancing), an extra
projection or a loss that is not transformers' shifted ``ForCausalLMLoss``
(BART's and Whisper's decoders do not shift at all).

``HEADS`` is that knowledge, one rule per transformers class, written after
reading each family's stock ``forward`` (``inspect.getsource``) and kept only
where ``tests/engine/test_patch_families.py`` proves the patched loss and
gradients equal to stock. A class that is not in it keeps its stock loss:
``patch()`` says so in one log line, or refuses with a ValueError when the
caller asked for the loss explicitly (``loss=True``).

The rule's transforms, applied as the stock forward applies them:

- ``scale``: logits = scale * (hidden @ W^T + b). Folded into the hidden states
  (and the bias), an (N, H) product, not a copy of the (V, H) weight.
- ``softcap``: logits = c * tanh(logits / c), computed inside the fused loss.
- ``router_aux``: loss += coefficient * load_balancing_loss_func(router logits,
  num_experts, num_experts_per_tok, attention_mask), with the function of the
  family's own modeling module and the model's own attributes, as stock.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ModelNumber = Callable[[nn.Module], "float | None"]


@dataclass(frozen=True)
class Head:
    """How one family forms logits and loss from the backbone's last hidden state.

    scale: the number the logits are multiplied by (read from the model), or None.
    softcap: the final logit softcap c (read from the model), or None when the family has none or it is off.
    router_aux: the name of the model attribute weighting the MoE load-balancing loss, or None.
    """

    scale: ModelNumber | None = None
    softcap: ModelNumber | None = None
    router_aux: str | None = None


PLAIN = Head()
# Each family below was read (its stock forward) and is proven equal to stock, loss and gradients, by
# tests/engine/test_patch_families.py. Families read but not in the table are left stock: their tiny models
# do not build from their config's defaults on the CPU (so the test cannot prove them), or their linear-attention
# or state-space layers make the test too slow for CI (Qwen3-Next, Qwen3.5, Kimi Linear, Falcon-H1, ...).

# logits = lm_head(hidden) and transformers' ForCausalLMLoss (labels shifted by one).
_PLAIN_FAMILIES = (
    "Apertus1p5TextForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "BitNetForCausalLM",
    "BloomForCausalLM", "CTRLLMHeadModel", "CwmForCausalLM", "DiffLlamaForCausalLM", "Ernie4_5ForCausalLM",
    "Exaone4ForCausalLM", "GemmaForCausalLM", "Glm4ForCausalLM", "GlmForCausalLM", "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM", "GPTNeoXForCausalLM", "HeliumForCausalLM", "HrmTextForCausalLM",
    "HunYuanDenseV1ForCausalLM", "Jais2ForCausalLM", "Lfm2ForCausalLM", "Lfm3ForCausalLM", "LlamaForCausalLM",
    "MinistralForCausalLM", "Ministral3ForCausalLM", "MistralForCausalLM", "MptForCausalLM",
    "NemotronForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoForCausalLM", "OpenAIGPTLMHeadModel",
    "OPTForCausalLM", "PersimmonForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM", "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
    # Mixture-of-experts families whose stock loss has no router term (their outputs carry the router logits).
    "AfmoeForCausalLM", "AriaTextForCausalLM", "ExaoneMoeForCausalLM", "Glm4MoeForCausalLM",
    "HunYuanMoEV1ForCausalLM", "HYV3ForCausalLM", "Kolibri1ForCausalLM", "Llama4ForCausalLM",
    "LongcatFlashForCausalLM", "MiMoV2FlashForCausalLM", "SolarOpenForCausalLM",
)
# Mixture-of-experts families that add router_aux_loss_coef * load_balancing_loss when output_router_logits.
_ROUTER_AUX_FAMILIES = (
    "FlexOlmoForCausalLM", "GptOssForCausalLM", "MellumForCausalLM", "MiniMaxForCausalLM", "MiniMaxM2ForCausalLM",
    "MiniMaxM3VLForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "PhimoeForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
_final_softcap: ModelNumber = lambda model: model.config.final_logit_softcapping  # noqa: E731
_granite_scale: ModelNumber = lambda model: 1.0 / model.config.logits_scaling  # noqa: E731

HEADS: dict[str, Head] = {
    **dict.fromkeys(_PLAIN_FAMILIES, PLAIN),
    **dict.fromkeys(_ROUTER_AUX_FAMILIES, Head(router_aux="router_aux_loss_coef")),
    "JetMoeForCausalLM": Head(router_aux="aux_loss_coef"),
    # Final logit softcap, when the config sets one.
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "VaultGemmaForCausalLM", "NanoChatForCausalLM",
                     "BeamForCausalLM"), Head(softcap=_final_softcap)),
    "RecurrentGemmaForCausalLM": Head(softcap=lambda model: model.config.logits_soft_cap),
    # Logits divided by config.logits_scaling.
    **dict.fromkeys(("GraniteForCausalLM", "GraniteSWAForCausalLM"), Head(scale=_granite_scale)),
    **dict.fromkeys(("GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM", "GraniteMoeSharedForCausalLM"),
                    Head(scale=_granite_scale, router_aux="router_aux_loss_coef")),
    # Logits multiplied by the model's logit_scale (Cohere) or config.logits_scaling (HyperCLOVA X).
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM"),
                    Head(scale=lambda model: model.logit_scale)),
    "HyperCLOVAXForCausalLM": Head(scale=lambda model: model.config.logits_scaling),
}


def head_rule(model: nn.Module) -> tuple[Head | None, str]:
    """(the rule for ``model``'s class, "") or (None, why ember leaves its loss stock)."""
    cls = type(model)
    name = cls.__name__
    if not cls.__module__.startswith("transformers.models."):
        return None, f"{name} is not a transformers model class (a subclass may change what its forward does)"
    if name not in HEADS:
        return None, f"ember has not verified how {name} forms its logits and loss"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return None, f"{name}.lm_head is {type(head).__name__}, not a plain nn.Linear (an adapter or a quantized " \
                     f"layer would be skipped by the fused loss)"
    if backbone(model) is None:
        return None, f"{name} has no backbone module ember can find (base_model or .model)"
    loss_type = getattr(model, "loss_type", None)
    if loss_type not in (None, "ForCausalLM"):
        return None, f"{name} uses the loss {loss_type!r}, not ForCausalLMLoss"
    return HEADS[name], ""


def backbone(model: nn.Module) -> nn.Module | None:
    """The module under the head: ``base_model`` where ``base_model_prefix`` names it, else ``model.model``
    (Llama 4's causal LM names its prefix ``language_model`` but keeps the backbone in ``model``)."""
    for candidate in (model.base_model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    return None


def logits(model: nn.Module, rule: Head, hidden: torch.Tensor) -> torch.Tensor:
    """The family's logits, computed as its stock forward does: (..., H) -> (..., V)."""
    out = model.lm_head(hidden)
    scale = rule.scale(model) if rule.scale else None
    if scale is not None:
        out = out * scale
    softcap = rule.softcap(model) if rule.softcap else None
    if softcap is not None:
        out = torch.tanh(out / softcap) * softcap
    return out


def fused_loss_inputs(model: nn.Module, rule: Head, hidden: torch.Tensor):
    """(hidden, weight, bias, softcap) for ``linear_cross_entropy`` that give the family's logits."""
    head = model.lm_head
    scale = rule.scale(model) if rule.scale else None
    bias = head.bias
    if scale is not None:
        # scale * (h W^T + b) = (scale h) W^T + scale b: an (N, H) product instead of a scaled (V, H) weight.
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, head.weight, bias, rule.softcap(model) if rule.softcap else None


def router_aux_loss(model: nn.Module, outputs, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss (unweighted), computed as the stock forward computes it."""
    # The family's own function (each modeling file has its copy), with the model's own settings.
    load_balancing_loss_func = sys.modules[type(model).__module__].load_balancing_loss_func
    return load_balancing_loss_func(outputs.router_logits, model.num_experts, model.num_experts_per_tok,
                                    attention_mask)
