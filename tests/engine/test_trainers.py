"""ember's fused loss inside other trainers: transformers.Trainer, TRL's SFTTrainer (EmberSFTTrainer), accelerate.

Each run proves two things: ember's ``linear_cross_entropy`` ran (its calls are
counted through the symbol ``ember.engine.patch`` calls) and no (tokens x
vocab) tensor existed during training (every tensor any operator created,
backward and optimizer included, is inspected). The vocabulary, 1009, is prime
and far from every other size here, so a tensor whose last dimension is 1009 is
a slice of logits or of the LM head; the stock runs (the controls) show that
the check sees the logits when they are built.

Everything runs on the PyTorch path (``forced_backend("torch")``): these tests
prove what the trainers call, not the kernels, which through the interpreter
would take minutes per step.
"""

from __future__ import annotations

import copy
import random

import accelerate
import datasets
import peft
import pytest
import tokenizers
import torch
import transformers
import trl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ember.engine.patch as patch_module
from ember.engine.patch import patch
from ember.engine.trainers import EmberSFTTrainer
from ember.kernels.backend import forced_backend

VOCAB = 1009
HIDDEN = 32
BATCH, SEQ = 8, 16  # every micro-batch: BATCH rows of SEQ tokens, no padding
TOKENS = BATCH * SEQ
WORDS = ["the", "a", "film", "plot", "cast", "was", "is", "good", "bad", "dull", "warm", "and", "but", "very"]


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=None, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


class _LargestVocabTensor(TorchDispatchMode):
    """The most elements of any tensor with a last dimension of VOCAB that an operator creates inside the block."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == VOCAB:
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.fixture
def fused_loss_calls(monkeypatch):
    """The row count of every ``linear_cross_entropy`` call the patched forward makes."""
    calls = []
    kernel = patch_module.linear_cross_entropy

    def counted(hidden, *args, **kwargs):
        calls.append(hidden.shape[:-1].numel())
        return kernel(hidden, *args, **kwargs)

    monkeypatch.setattr(patch_module, "linear_cross_entropy", counted)
    return calls


@pytest.fixture(autouse=True)
def _offline_and_fresh_accelerate(monkeypatch):
    # TRL pings the hub with usage telemetry when a trainer is built: never from a test.
    monkeypatch.setattr("trl.trainer.base_trainer.send_telemetry", lambda **kwargs: None)
    yield
    # Trainer and Accelerator share accelerate's process-wide state; each test starts from its own settings.
    accelerate.state.AcceleratorState._reset_state(True)


def _train(trainer):
    """trainer.train() on the PyTorch path -> (losses, largest (.., VOCAB) tensor's elements, log history)."""
    with forced_backend("torch"), _LargestVocabTensor() as largest:
        trainer.train()
    history = trainer.state.log_history
    return [entry["loss"] for entry in history if "loss" in entry], largest.numel, history


_COMMON = dict(per_device_train_batch_size=BATCH, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
               logging_steps=1, disable_tqdm=True)


# ----------------------------------------------------------------------------
# transformers.Trainer: a patched model needs nothing more.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("patched", [False, True], ids=["stock-control", "ember"])
def test_trainer_runs_the_fused_loss_and_never_builds_the_logits(tmp_path, fused_loss_calls, patched):
    model = _llama()
    if patched:
        model = patch(model)
    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, VOCAB, (3 * BATCH, SEQ)).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, **_COMMON)
    losses, largest, _ = _train(transformers.Trainer(model=model, args=args, train_dataset=rows))
    if not patched:  # the control: stock logits, which the check sees
        assert fused_loss_calls == [] and largest >= TOKENS * VOCAB
        return
    assert fused_loss_calls == [TOKENS] * 3
    # ember's loss works through row chunks of at most a quarter of the rows.
    assert largest < TOKENS * VOCAB / 2
    assert len(losses) == 3 and losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# TRL's SFTTrainer: its own LM head replaces the model's loss; EmberSFTTrainer puts ember's back.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built here (no hub): [PAD] 0, [UNK] 1, [EOS] 2, then the words."""
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[EOS]"] + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="[EOS]")


@pytest.fixture(scope="module")
def texts():
    """4 batches of texts of SEQ - 1 words: SFTTrainer appends [EOS], so every row is SEQ tokens."""
    rng = random.Random(0)
    return datasets.Dataset.from_dict({"text": [" ".join(rng.choices(WORDS, k=SEQ - 1)) for _ in range(4 * BATCH)]})


def _sft(trainer_class, model, texts, tokenizer, tmp_path, steps, **options):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, **{"max_length": SEQ, **_COMMON, **options})
    return _train(trainer_class(model=model, args=args, train_dataset=texts, processing_class=tokenizer))


def test_stock_sft_trainer_bypasses_the_patched_loss(tmp_path, fused_loss_calls, texts, tokenizer):
    """The finding EmberSFTTrainer exists for: SFTTrainer's own LM head runs, never ember's loss, logits built."""
    _, largest, _ = _sft(trl.SFTTrainer, patch(_llama()), texts, tokenizer, tmp_path, steps=1)
    assert fused_loss_calls == []
    assert largest >= BATCH * (SEQ - 1) * VOCAB  # TRL's tile: every labelled position at once


def test_ember_sft_trainer_runs_the_fused_loss_and_never_builds_the_logits(tmp_path, fused_loss_calls, texts,
                                                                          tokenizer):
    """SFTConfig's defaults (bf16 autocast, which SFTConfig turns on even on the CPU)."""
    losses, largest, history = _sft(EmberSFTTrainer, patch(_llama()), texts, tokenizer, tmp_path, steps=3)
    assert fused_loss_calls == [TOKENS] * 3
    assert largest < TOKENS * VOCAB / 2
    assert len(losses) == 3 and losses[-1] < losses[0]
    logged = history[0]
    assert logged["num_tokens"] == TOKENS
    # These two need the full next-token distribution, which ember's loss never builds: not logged.
    assert "entropy" not in logged and "mean_token_accuracy" not in logged


def test_ember_sft_trainer_matches_stock_sft_trainer(tmp_path, fused_loss_calls, texts, tokenizer):
    """fp32, the same data and weights, two accumulated micro-batches: the first step's loss and gradient norm,
    stock SFTTrainer against ember (the same normalization over the accumulated batch)."""
    options = dict(steps=1, bf16=False, gradient_accumulation_steps=2)
    stock = _sft(trl.SFTTrainer, _llama(), texts, tokenizer, tmp_path / "stock", **options)[2][0]
    ours = _sft(EmberSFTTrainer, patch(_llama()), texts, tokenizer, tmp_path / "ember", **options)[2][0]
    assert fused_loss_calls == [TOKENS, TOKENS]
    assert ours["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(stock["grad_norm"], rel=1e-4)


def test_ember_sft_trainer_packed_matches_sft_trainer(tmp_path, fused_loss_calls, texts, tokenizer):
    """packing=True: SFTTrainer packs documents padding-free into one row; ember's attention keeps them apart
    (cu_seq_lens) and the loss counts no target across a boundary, as the stock model and SFTTrainer do."""
    options = dict(steps=1, bf16=False, packing=True, max_length=2 * SEQ)
    stock = _sft(trl.SFTTrainer, _llama(), texts, tokenizer, tmp_path / "stock", **options)[2][0]
    ours = _sft(EmberSFTTrainer, patch(_llama()), texts, tokenizer, tmp_path / "ember", **options)[2][0]
    assert fused_loss_calls == [2 * TOKENS]  # BATCH packed rows of two documents each, flattened into one row
    assert ours["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(stock["grad_norm"], rel=1e-4)


def test_ember_sft_trainer_with_a_peft_config(tmp_path, fused_loss_calls, texts, tokenizer):
    """LoRA through SFTTrainer's peft_config: PEFT wraps the patched model, ember's loss still runs."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, max_length=SEQ, **_COMMON)
    trainer = EmberSFTTrainer(model=patch(_llama()), args=args, train_dataset=texts, processing_class=tokenizer,
                              peft_config=config)
    assert isinstance(trainer.model, peft.PeftModel)
    _, largest, _ = _train(trainer)
    assert fused_loss_calls == [TOKENS] and largest < TOKENS * VOCAB / 2


def test_ember_sft_trainer_refuses_what_would_bypass_its_loss(tmp_path, texts, tokenizer):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, **_COMMON)
    with pytest.raises(ValueError, match="model must be a model passed through ember.engine.patch_model"):
        EmberSFTTrainer(model=_llama(), args=args, train_dataset=texts, processing_class=tokenizer)
    with pytest.raises(ValueError, match="got 'some/model-id'"):
        EmberSFTTrainer(model="some/model-id", args=args, train_dataset=texts, processing_class=tokenizer)
    dft = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, loss_type="dft", **_COMMON)
    with pytest.raises(ValueError, match="loss_type='dft' replaces the negative log-likelihood"):
        EmberSFTTrainer(model=patch(_llama()), args=dft, train_dataset=texts, processing_class=tokenizer)
    smoothed = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, label_smoothing_factor=0.1, **_COMMON)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 replaces the negative log-likelihood"):
        EmberSFTTrainer(model=patch(_llama()), args=smoothed, train_dataset=texts, processing_class=tokenizer)
    with pytest.raises(ValueError, match="compute_loss_func replaces the loss"):
        EmberSFTTrainer(model=patch(_llama()), args=args, train_dataset=texts, processing_class=tokenizer,
                        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)


# ----------------------------------------------------------------------------
# accelerate: a prepared patched model trains through ember's kernels.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_prepared_model_runs_the_fused_loss(fused_loss_calls, mixed_precision):
    """prepare() wraps the forward (autocast and fp32 outputs under bf16); the loss equals the unprepared model's
    (under the same autocast), and the step moves the weights."""
    model = patch(_llama())
    unprepared = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision)
    prepared, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    before = prepared.lm_head.weight.detach().clone()
    with forced_backend("torch"):
        loss = prepared(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        # With gradients, as in the step: without them the loss kernel takes its forward-only path, whose bf16
        # rounding differs in the last bits.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            expected = unprepared(input_ids=input_ids, labels=input_ids).loss
    assert fused_loss_calls == [TOKENS, TOKENS]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=0, atol=0)
    assert not torch.equal(prepared.lm_head.weight, before)
