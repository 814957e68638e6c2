"""Every causal-LM family of transformers' auto mapping, patched: stock-equal loss and gradients, or its stock loss kept
with one warning line (and a named refusal when the loss is asked for). Never a silent difference.

Each family is built from its own config class with tiny sizes (hidden 32, 2 layers, vocab 128, 8 tokens), in
fp32 on the PyTorch path, with norm/rope/mlp patching on and attention left stock (not every family dispatches
through AttentionInterface; the attention kernel has its own tests). A family that cannot be built tiny on the
CPU is skipped with the reason, and counted: the counts are asserted so that a transformers upgrade that breaks
the tiny builds does not pass quietly.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings

import pytest
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ember.engine.causal_lm_heads import HEADS, head_rule
from ember.engine.patch import patch
from ember.kernels.backend import forced_backend

VOCAB = 128
# Tiny sizes under each name a config may use for them; only the names a config has are passed.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=1, n_head=4, d_model=32,
    n_positions=64, num_layers=1, ffn_dim=64, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
    encoder_layers=1, shared_expert_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # What the head does must show: a router loss weighted heavily enough to see, a scale that is not 1.
    output_router_logits=True, router_aux_loss_coef=0.5, aux_loss_coef=0.5, logits_scaling=4.0,
)
MAX_PARAMETERS = 10_000_000
 # counted on the meta device first: some defaults are billions
# Lower bounds on what builds and what is verified (transformers 5.24: 137 of 196 build, 80 classes verified).
MIN_BUILT, MIN_VERIFIED = 125, 75


@functools.cache
def _tiny_model(model_type: str):
    """The family's causal LM at tiny sizes in eval mode (no dropout), or the reason it cannot be built."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        config_class = CONFIG_MAPPING[model_type]
        model_class = getattr(transformers, class_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            defaults = config_class()
            config = config_class(**{k: v for k, v in TINY.items() if hasattr(defaults, k)})
            with torch.device("meta"):
                size = sum(p.numel() for p in model_class(config).parameters())
            if size > MAX_PARAMETERS:
                return f"{class_name}: {size:,} parameters at the tiny sizes this test sets"
            torch.manual_seed(0)
            model = model_class(config).eval()
            if model._can_set_experts_implementation():
                model.set_experts_implementation("eager")  # grouped_mm has no float64, which the reference needs
    except Exception as error:  # noqa: BLE001  (any failure to build is a reason to skip, recorded)
        return f"{class_name}: {type(error).__name__}: {str(error)[:200]}"
    return model


@functools.cache
def _stock(model_type: str):
    """The stock model's fp32 loss and gradients, or the reason its stock forward fails at the tiny sizes."""
    try:
        return _loss_and_grads(_tiny_model(model_type), torch.float32)
    except Exception as error:  # noqa: BLE001
        return f"the stock {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]} fails: {type(error).__name__}: " \
               f"{str(error)[:200]}"


def _batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding: the router loss reads the mask
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)


def _loss(model, **options):
    with forced_backend("torch"):
        return model(**_batch(), **options)


def _loss_and_grads(model, dtype):
    model = copy.deepcopy(model).to(dtype)
    out = _loss(model)
    out.loss.backward()
    return out.loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _ember_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ember.patch" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_family_loss_is_stock_or_left_stock(model_type, caplog, assert_within_tolerance):
    model = _tiny_model(model_type)
    if isinstance(model, str):
        pytest.skip(f"cannot build tiny: {model}")
    name = type(model).__name__
    rule = head_rule(model)[0]
    if rule is None:
        with caplog.at_level(logging.INFO, logger="ember.patch"):
            patched = patch(copy.deepcopy(model), attention=False)
        assert not getattr(patched, "_ember_patched", False)
        (warning,) = _ember_warnings(caplog)
        assert warning.startswith(f"patch: {name}: loss left stock: ")
        with pytest.raises(ValueError, match=name):
            patch(copy.deepcopy(model), attention=False, loss=True)
        return

    stock = _stock(model_type)
    if isinstance(stock, str):
        pytest.skip(stock)
    # Training's path, the fused loss (return_logits="never": these models stay in eval mode, without dropout).
    ours = _loss_and_grads(patch(copy.deepcopy(model), attention=False, loss=True, return_logits="never"),
                           torch.float32)
    reference = _loss_and_grads(model, torch.float64)
    assert_within_tolerance(f"{name} loss", ours[0].reshape(1), reference[0].reshape(1), stock[0].reshape(1),
                            torch.float32)
    assert ours[1].keys() == stock[1].keys()
    scale = max(g.abs().max().item() for g in reference[1].values())
    for param, grad in reference[1].items():
        assert_within_tolerance(f"{name} {param}", ours[1][param], grad, stock[1][param], torch.float32, scale=scale)

    # Evaluation's path: the stock head's logits, and the loss from them.
    with torch.no_grad():
        evaluated, expected = _loss(patch(copy.deepcopy(model), attention=False)), _loss(model)
    torch.testing.assert_close(evaluated.logits, expected.logits)
    torch.testing.assert_close(evaluated.loss, expected.loss)


def test_enough_families_build_and_every_table_entry_is_verified():
    """The tiny builds have not silently collapsed, and every class in HEADS is one this test proves."""
    built = {t: m for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if not isinstance(m := _tiny_model(t), str)}
    verified = {type(m).__name__ for t, m in built.items() if head_rule(m)[0] is not None and
                not isinstance(_stock(t), str)}
    assert len(built) >= MIN_BUILT, f"only {len(built)} causal-LM families build tiny"
    assert len(verified) >= MIN_VERIFIED, f"only {len(verified)} families verified"
    unproven = sorted(set(HEADS) - verified)
    assert not unproven, f"in ember's table but never run by this test: {unproven}"
