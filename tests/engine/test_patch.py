"""patch(): Hugging Face models train through ember's attention and losses, with the stock model's loss and grads."""

from __future__ import annotations

import copy
import logging
import math

import peft
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ember.engine.patch as patch_module
from ember.engine.patch import patch
from ember.kernels.backend import forced_backend

VOCAB = 300


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _bert(head):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return head(config).eval()


def _loss_and_grads(model, batch, dtype, device):
    model = copy.deepcopy(model).to(device, dtype)
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def _compare(model, batch, device, assert_within_tolerance):
    """ember's patched model in fp32 against the stock model in float64 (reference) and fp32 (stock).

    The models are in eval mode (no dropout); return_logits="never" keeps the fused loss that training runs.
    """
    reference = _loss_and_grads(model, batch, torch.float64, "cpu")
    stock = _loss_and_grads(model, batch, torch.float32, "cpu")
    ours = _loss_and_grads(patch(copy.deepcopy(model), return_logits="never"), batch, torch.float32, device)
    assert_within_tolerance("loss", ours[0].reshape(1), reference[0].reshape(1), stock[0].reshape(1), torch.float32)
    for name, grad in reference[1].items():
        assert_within_tolerance(name, ours[1][name], grad, stock[1][name], torch.float32,
                                scale=max(g.abs().max().item() for g in reference[1].values()))


def test_causal_lm_loss_and_grads_match_stock(device, assert_within_tolerance):
    """Padding on the left of one row, a masked prompt (labels -100): loss and every parameter's gradient."""
    input_ids = torch.randint(0, VOCAB, (2, 17))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    _compare(_llama(), batch, device, assert_within_tolerance)


@pytest.mark.parametrize("head", [transformers.BertForSequenceClassification, transformers.BertForTokenClassification],
                         ids=["sequence", "token"])
def test_classification_loss_and_grads_match_stock(device, head, assert_within_tolerance):
    input_ids = torch.randint(0, VOCAB, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    if head is transformers.BertForSequenceClassification:
        labels = torch.tensor([0, 2, 1])
    else:
        labels = torch.randint(0, 3, (3, 11)).masked_fill(attention_mask == 0, -100)
    _compare(_bert(head), dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels), device,
             assert_within_tolerance)


class _ShapesCreated(TorchDispatchMode):
    """Every tensor shape any operator creates inside the block, backward included."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def test_causal_lm_never_builds_the_logits():
    """3072 tokens x vocab 300: no tensor with a vocab dimension holds even half of the logits.

    On the PyTorch path, which works through 1024-row tiles of logits (the
    interpreter copies whole tensors into flat storages of its own).
    """
    model = patch(_llama().train())
    input_ids = torch.randint(0, VOCAB, (12, 256))
    with forced_backend("torch"), _ShapesCreated() as created:
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
    assert out.logits is None
    with_vocab = [shape for shape in created.shapes if VOCAB in shape and shape != (VOCAB, 64)]
    assert with_vocab and max(math.prod(shape) for shape in with_vocab) <= input_ids.numel() * VOCAB / 3
    # Without labels the model is the stock one, logits included.
    with forced_backend("torch"):
        assert model(input_ids=input_ids).logits.shape == (12, 256, VOCAB)


def test_num_items_in_batch_sums_then_divides():
    model = patch(_llama())
    input_ids = torch.randint(0, VOCAB, (2, 9))
    mean = model(input_ids=input_ids, labels=input_ids).loss
    over_100 = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=100).loss
    targets = 2 * 8  # the last position of each row predicts nothing
    torch.testing.assert_close(over_100, mean * targets / 100)


def test_works_in_hugging_face_trainer(tmp_path):
    """The patched model trains in transformers' Trainer, which passes num_items_in_batch."""
    model = patch(_llama().train())
    seen = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: seen.append(kwargs.get("num_items_in_batch")) or forward(*args, **kwargs)
    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (16, 12)).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
                                          remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    # The PyTorch path: this tests the Trainer's calls, not the kernels, which through the interpreter
    # (every norm, rotary and MLP call of 8 forwards and backwards) would take minutes.
    with forced_backend("torch"):
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert seen and all(isinstance(n, (int, torch.Tensor)) for n in seen)


def test_refuses_what_it_cannot_patch(caplog):
    """A loss ember has no kernel for: refused when asked for (loss=True), left stock with one warning by default."""
    regression = _bert(transformers.BertForSequenceClassification)
    regression.config.problem_type = "regression"
    with pytest.raises(ValueError, match="no ember loss for BertForSequenceClassification"):
        patch(regression, loss=True)
    stock_forward = regression.forward
    with caplog.at_level(logging.INFO, logger="ember.patch"):
        patch(regression)
    assert regression.forward == stock_forward
    warnings = [r.getMessage() for r in caplog.records if r.name == "ember.patch" and r.levelno == logging.WARNING]
    assert warnings == ["patch: BertForSequenceClassification: loss left stock: no ember loss for "
                        "BertForSequenceClassification (problem_type 'regression')"]
    patch(regression, loss=False)  # attention alone is fine
    assert regression.config._attn_implementation == "ember"


def _tiny_causal_lm(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=8),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16),
        # Gemma 2: attention logit softcap, sliding-window layers and a final logit softcap.
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=16, sliding_window=8,
                                                    final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma2"])
def test_causal_lm_families_match_stock(family, assert_within_tolerance):
    """Each family's patched loss and gradients against its stock model in float64, on the PyTorch path."""
    model = _tiny_causal_lm(family)
    input_ids = torch.randint(0, VOCAB, (2, 20))
    labels = input_ids.clone()
    labels[:, :3] = -100
    with forced_backend("torch"):
        _compare(model, dict(input_ids=input_ids, labels=labels), "cpu", assert_within_tolerance)


def test_roberta_classification_matches_stock(assert_within_tolerance):
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(config).eval()
    input_ids = torch.randint(3, VOCAB, (3, 11))
    with forced_backend("torch"):
        _compare(model, dict(input_ids=input_ids, labels=torch.tensor([2, 0, 1])), "cpu", assert_within_tolerance)


# ----------------------------------------------------------------------------
# PEFT in either order (the fused loss runs, loss and adapter gradients equal PEFT's own), and logits at
# evaluation (a patched causal LM in eval mode returns them, so Trainer's compute_metrics receives predictions)
# ----------------------------------------------------------------------------


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
