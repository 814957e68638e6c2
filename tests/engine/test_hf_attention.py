"""attn_implementation="ember" inside real transformers models, built from small random configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember.engine.hf_attention import register_attention

# Head dim 32 everywhere; GQA in the decoder models; a sliding window shorter
# than the batch in Mistral and Gemma 2, and Gemma 2's attention softcap.
_COMMON = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)
_DECODER = dict(_COMMON, num_key_value_heads=2)
CONFIGS = {
    "bert": (transformers.BertConfig, dict(_COMMON, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)),
    "roberta": (transformers.RobertaConfig, dict(_COMMON, pad_token_id=1, attention_probs_dropout_prob=0.0,
                                                 hidden_dropout_prob=0.0)),
    "llama": (transformers.LlamaConfig, _DECODER),
    "mistral": (transformers.MistralConfig, dict(_DECODER, sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, _DECODER),
    "gemma2": (transformers.Gemma2Config, dict(_DECODER, head_dim=32, sliding_window=6, attn_logit_softcapping=5.0,
                                               query_pre_attn_scalar=32)),
}
ENCODERS = ("bert", "roberta")


def _batch(name, device):
    """Three rows of 20 tokens: full, right-padded, and left-padded (decoders) or right-padded again (encoders)."""
    input_ids = torch.randint(3, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(3, 20, dtype=torch.long)
    attention_mask[1, 13:] = 0
    if name in ENCODERS:
        attention_mask[2, 9:] = 0
    else:
        attention_mask[2, :5] = 0
    return input_ids.to(device), attention_mask.to(device)


def _model(name, attn_implementation, device):
    config_class, options = CONFIGS[name]
    torch.manual_seed(0)  # the same weights for every implementation
    config = config_class(**options)
    return transformers.AutoModel.from_config(config, attn_implementation=attn_implementation).to(device).eval()


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_attention()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batch_matches_eager_on_real_tokens(name, device):
    input_ids, attention_mask = _batch(name, device)
    results = {}
    for implementation in ("ember", "eager"):
        model = _model(name, implementation, device)
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        real = attention_mask.bool()[..., None]
        (hidden * real).square().sum().backward()
        grad = next(p for n, p in model.named_parameters() if "layers.0" in n or "layer.0" in n).grad
        results[implementation] = (hidden.masked_fill(~real, 0), grad)
    torch.testing.assert_close(results["ember"][0], results["eager"][0], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(results["ember"][1], results["eager"][1], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_padding_reaches_the_kernel(name, device):
    # Without the mask function transformers 5 would pass attention_mask=None:
    # the real tokens of padded rows would then see the padding, and change.
    input_ids, attention_mask = _batch(name, device)
    model = _model(name, "ember", device)
    with torch.no_grad():
        masked = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ignored = model(input_ids=input_ids).last_hidden_state
        stock = _model(name, "sdpa", device)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    torch.testing.assert_close(masked[real], stock[real], rtol=2e-4, atol=2e-4)
    padded_row = 1 if name in ENCODERS else 2  # causal models: only left padding is visible to real tokens
    assert not torch.allclose(masked[padded_row][real[padded_row]], ignored[padded_row][real[padded_row]], atol=1e-3)


def test_a_prepared_4d_mask_is_refused_clearly(device):
    from ember.engine.hf_attention import ember_attention_forward

    q = torch.randn(1, 2, 4, 32, device=device)
    with pytest.raises(ValueError, match="2-D mask"):
        ember_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device))


@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_packed_documents_do_not_attend_to_each_other(name, source, device):
    # Two documents in one row, told apart by position ids that restart, or by
    # the cu_seq_lens_* arguments of DataCollatorWithFlattening: each document's
    # hidden states equal those of the document run alone.
    lengths = (12, 8)
    input_ids = torch.randint(3, 128, (1, sum(lengths)), generator=torch.Generator().manual_seed(1)).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu_seq_lens = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    packing = (dict(position_ids=position_ids) if source == "position_ids" else
               dict(position_ids=position_ids, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                    max_length_q=max(lengths), max_length_k=max(lengths)))
    model = _model(name, "ember", device)
    with torch.no_grad():
        packed = model(input_ids=input_ids, **packing).last_hidden_state[0]
        alone = [model(input_ids=part).last_hidden_state[0] for part in input_ids.split(lengths, dim=1)]
    # Were the second document to see the first, its states would differ from it alone.
    torch.testing.assert_close(packed, torch.cat(alone), rtol=2e-4, atol=2e-4)
