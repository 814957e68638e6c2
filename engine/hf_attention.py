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
for FlashAttention. Packed batches (documents one after another in a row, as
``DataCollatorWithFlattening`` makes them) are read as FlashAttention's path
reads them, from ``cu_seq_lens_*`` keyword arguments or from position ids
that restart, and run through the varlen kernel: no document attends to
another.

Registration is explicit (no import-time side effects) and idempotent.
"""

from __future__ import annotations

import torch

from ember.kernels import flash_attention, flash_attention_varlen

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
    # transformers' sliding window w lets a query see the w - 1 keys before it (and itself).
    options = dict(
        causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
        softmax_scale=scaling, dropout_p=dropout if module.training else 0.0, softcap=softcap,
        window=None if sliding_window is None else (sliding_window - 1, sliding_window - 1),
    )
    packed = _packed_documents(query, kwargs) if attention_mask is None else None
    if packed is not None:
        tokens = lambda t: t[0].transpose(0, 1)  # noqa: E731  (1, H, S, D) -> (S, H, D), a view
        out = flash_attention_varlen(tokens(query), tokens(key), tokens(value), *packed, **options)
        return out[None], None  # (1, S, H, D)
    out = flash_attention(query, key, value, key_padding_mask=attention_mask, **options)
    # (B, H, Sq, D) in query's memory layout: (B, S, H, D) underneath for transformers' models
    return out.transpose(1, 2), None


def _packed_documents(query: torch.Tensor, kwargs: dict):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when a row holds packed documents, else None.

    The same rules as transformers' FlashAttention path: explicit ``cu_seq_lens_*``
    and ``max_length_*`` keyword arguments, or, for a single row, position ids
    that restart. Reading the position ids syncs with the device, as it does there.
    """
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if all(kwargs.get(name) is not None for name in names):
        cu_q, cu_k, max_q, max_k = (kwargs[name] for name in names)
        return cu_q, cu_k, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[0] != 1 or query.shape[2] == 1:
        return None
    if not (position_ids.reshape(-1).diff() != 1).any():
        return None  # one document
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return cu_q, cu_k, int(max_q), int(max_k)


def register_attention(name: str = ATTENTION_NAME) -> str:
    """Register ember's attention (and its mask function) with transformers under ``name``; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, ember_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
