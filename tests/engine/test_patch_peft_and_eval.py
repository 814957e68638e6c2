"""patch() with PEFT in either order (the fused loss runs, loss and adapter gradients equal PEFT's own), and logits at
evaluation (a patched causal LM in eval mode returns them, so Trainer's compute_metrics receives predictions)."""

from __future__ import annotations

import copy
import logging

import peft
import pytest
import torch
import transformers

import ember.engine.patch as patch_module
from ember.engine.patch import patch
from ember.kernels.backend import forced_backend

VOCAB = 300


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 13), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=input_ids, labels=labels)


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the patched forward ran ember's fused LM-head loss."""
    calls = []
    fused = patch_module.linear_cross_entropy
    monkeypatch.setattr(patch_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    return calls


TARGETS = ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def _lora_config(targets=TARGETS):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))


def _peft_stock(targets=TARGETS):
    """PEFT around the stock model, with random (not zero) B matrices so that every adapter has a gradient."""
    stock = peft.get_peft_model(_llama(), _lora_config(targets))
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return stock


def _loss_and_adapter_grads(model):
    with forced_backend("torch"):
        loss = model(**_batch()).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_in_either_order_runs_the_fused_loss_and_matches_peft(order, fused_calls, assert_within_tolerance):
    stock = _peft_stock()
    reference = copy.deepcopy(stock).double()
    if order == "patch_then_peft":
        ours = peft.get_peft_model(patch(_llama(), return_logits="never"), _lora_config())
        ours.load_state_dict(stock.state_dict())
    else:
        ours = patch(copy.deepcopy(stock), return_logits="never")
    assert isinstance(ours, peft.PeftModel)
    results = [_loss_and_adapter_grads(m) for m in (ours, reference, stock)]
    assert len(fused_calls) == 1
    (loss, grads), (ref_loss, ref_grads), (stock_loss, stock_grads) = results
    assert_within_tolerance("loss", loss.reshape(1), ref_loss.reshape(1), stock_loss.reshape(1), torch.float32)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * 5
    for name, grad in ref_grads.items():
        assert_within_tolerance(name, grads[name], grad, stock_grads[name], torch.float32)


def test_adapter_on_the_lm_head_after_patch_runs_stock_and_says_so(caplog, fused_calls):
    """An adapter put on lm_head after patch() would be skipped by the fused loss: that call runs the stock loss."""
    stock = _peft_stock(("q_proj", "lm_head"))
    ours = peft.get_peft_model(patch(_llama()), _lora_config(("q_proj", "lm_head")))
    ours.load_state_dict(stock.state_dict())
    with caplog.at_level(logging.WARNING, logger="ember.patch"):
        loss = _loss_and_adapter_grads(ours)[0]
    assert not fused_calls
    torch.testing.assert_close(loss, _loss_and_adapter_grads(stock)[0])
    assert "stock loss for this call: LlamaForCausalLM.lm_head is Linear, not a plain nn.Linear" in caplog.text


def test_eval_mode_returns_the_stock_logits_and_loss():
    stock = _llama()
    patched = patch(copy.deepcopy(stock))
    with forced_backend("torch"), torch.no_grad():
        expected, got = stock(**_batch()), patched(**_batch())
    assert got.logits.shape == (2, 13, VOCAB)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    with forced_backend("torch"):
        assert patched.train()(**_batch()).logits is None  # training: the fused loss, no logits
        always = patch(copy.deepcopy(stock).train(), return_logits="always")(**_batch())
        never = patch(copy.deepcopy(stock), return_logits="never")(**_batch())
    torch.testing.assert_close(always.logits, expected.logits)
    torch.testing.assert_close(always.loss, expected.loss)
    assert never.logits is None
    torch.testing.assert_close(never.loss, expected.loss)


def test_return_logits_is_checked():
    with pytest.raises(ValueError, match="return_logits must be one of"):
        patch(_llama(), return_logits=True)
    with pytest.raises(ValueError, match="loss must be True, False or 'auto'"):
        patch(_llama(), loss="yes")


def test_trainer_compute_metrics_receives_the_predictions(tmp_path):
    """Trainer.evaluate on a patched model: compute_metrics gets (rows, tokens, vocab) logits, not ()."""
    model = patch(_llama())
    received = []

    def compute_metrics(prediction):
        received.append(prediction.predictions)
        return {"rows": float(len(prediction.predictions))}

    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (3, 12)).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, eval_dataset=rows, compute_metrics=compute_metrics)
    with forced_backend("torch"):
        metrics = trainer.evaluate()
    assert len(received) == 1 and received[0].shape == (3, 12, VOCAB)
    assert metrics["eval_rows"] == 3.0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
