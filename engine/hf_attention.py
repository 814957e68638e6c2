"""``attn_implementation="ember"`` for Hugging Face transformers models.

    from ember.engine.hf_attention import register_attention
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ember")

Any model that dispatches through transformers' ``AttentionInterface`` (Llama,
Mistral, Qwen2/3, Gemma, BERT, RoBERTa, ...) then runs
``ember.kernels.flash_attention``. Two registrations are needed, not one:
transformers 5 hands a custom attention function ``attention_mask=None``
unless a mask function is registered under the same name, so without the
second one padding would be silently ignored. The mask function is
transformers' own FlashAttention one: it gives the (B, Sk) bool padding mask,
or None when nothing is padded, and the causal, sliding-window and softcap
options arrive as the module's attributes and keyword arguments, as they do
for FlashAttention.

Registration is explicit (no import-time side effects) and idempotent.
"""

from __future__ import annotations

import torch

from ember.kernels import flash_attention

ATTENTION_NAME = "ember"


def ember_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, S, D) in, (B, S, H, D) out, no weights."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' takes a (B, Sk) padding mask, got a "
            f"{attention_mask.dim()}-D attention_mask: pass a 2-D mask (or none), not a prepared 4-D one"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' sliding window w lets a query see the w - 1 keys before it (and itself).
    window = None if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    out = flash_attention(
        query, key, value,
        causal=causal, softmax_scale=scaling, key_padding_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0, window=window, softcap=softcap,
    )  # (B, H, Sq, D), in query's memory layout: (B, S, H, D) underneath for transformers' models
    return out.transpose(1, 2), None


def register_attention(name: str = ATTENTION_NAME) -> str:
    """Register ember's attention (and its mask function) with transformers under ``name``; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, ember_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
