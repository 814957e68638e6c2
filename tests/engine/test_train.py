"""The training loop on a tiny BERT and generated data: learning, exact resume, Ctrl-C, bad steps, early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import ember.engine.patch as patch_module
import ember.engine.train as train_module
from ember.engine.checkpoint import list_checkpoints
from ember.engine.config import ConfigError, TrainConfig, TrainingError, load_config
from ember.engine.data import asset_path
from ember.kernels.backend import forced_backend


def _config(tiny_bert, sentiment_csv, tmp_path, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_bert), data=str(sentiment_csv), out_dir=str(tmp_path / "run"), max_length=16,
                  eval_size=100, batch_size=16, max_steps=40, warmup_steps=4, lr=1e-2, eval_every=20,
                  save_every=20, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, progress=False, log_every=5,
                  precision="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def _train(config):
    # The loop's own logic is under test here; the kernels are proven in tests/kernels.
    with forced_backend("torch"):
        return train_module.train(config)


def test_the_defaults_are_the_default_job():
    config = load_config()
    assert config == TrainConfig()
    assert (config.task, config.model, config.data) == (
        "sequence-classification", "asset:all-minilm-l6-v2", "asset:rotten-tomatoes")
    assert (config.lora_r, config.optimizer, config.precision) == (16, "adamw8bit", "auto")


@pytest.mark.parametrize(("lora_r", "lr", "ember_kernels"), [(4, 1e-2, True), (0, 3e-3, True), (4, 1e-2, False)],
                         ids=["lora", "full", "lora-stock-kernels"])
def test_learns_and_exports(tiny_bert, sentiment_csv, tmp_path, lora_r, lr, ember_kernels):
    """A random tiny BERT learns which adjectives are positive: held-out accuracy from about 0.5 to 0.85+."""
    result = _train(_config(tiny_bert, sentiment_csv, tmp_path, lora_r=lora_r, lr=lr, precision="bf16",
                            max_steps=120, eval_every=60, save_every=60, ember_kernels=ember_kernels))
    assert result.stopped == "max_steps" and result.steps == 120
    assert result.eval_after["accuracy"] >= 0.85 > result.eval_before["accuracy"]
    assert result.eval_after["loss"] < result.eval_before["loss"]
    assert [c.name for c in result.report.classes] == ["neg", "pos"]
    assert sum(c.support for c in result.report.classes) == 100
    final = result.out_dir / "final"
    if lora_r:
        # the head travels in the adapter (PEFT's modules_to_save); the labels in the exported config
        assert json.loads((final / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
        assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
        assert not (final / "head.safetensors").exists()
    else:
        assert (final / "model" / "config.json").is_file()
    log = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert log[0]["kind"] == "config" and log[0]["config"]["lora_r"] == lora_r
    train_lines = [line for line in log if line["kind"] == "train"]
    assert len(train_lines) == 24 and all(line["peak_memory_mb"] > 0 and line["tokens_per_s"] > 0 for line in train_lines)
    # Checkpoints at 60 and 120 with the resolved config in each.
    checkpoints = list_checkpoints(result.out_dir)
    assert [c.name for c in checkpoints] == ["step-00000060", "step-00000120"]
    assert json.loads((checkpoints[-1] / "config.json").read_text())["max_steps"] == 120


def _interrupt_at(monkeypatch, step_to_stop: int):
    """Send ourselves SIGINT (Ctrl-C) while the loop fetches the batch of ``step_to_stop``."""
    original = train_module.next_batch
    calls = {"n": 0}

    def next_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "next_batch", next_batch)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tiny_bert, sentiment_csv, tmp_path, monkeypatch,
                                                                  precision):
    """Ctrl-C at step 7 saves a checkpoint and stops; --resume continues to step 12 with the same losses."""
    common = dict(max_steps=12, save_every=5, eval_every=100, lora_dropout=0.1, precision=precision)
    whole = _train(_config(tiny_bert, sentiment_csv, tmp_path / "whole", **common))

    _interrupt_at(monkeypatch, step_to_stop=7)
    first = _train(_config(tiny_bert, sentiment_csv, tmp_path / "split", **common))
    assert first.stopped == "interrupted" and first.steps == 7
    assert [c.name for c in list_checkpoints(first.out_dir)] == ["step-00000005", "step-00000007"]
    monkeypatch.undo()
    second = _train(_config(tiny_bert, sentiment_csv, tmp_path / "split", resume=True, **common))
    assert second.steps == 12
    assert first.losses + second.losses == whole.losses
    assert second.eval_after == whole.eval_after


def test_existing_checkpoints_need_resume(tiny_bert, sentiment_csv, tmp_path):
    config = _config(tiny_bert, sentiment_csv, tmp_path, max_steps=2, save_every=1)
    _train(config)
    with pytest.raises(ConfigError, match="--resume=true"):
        _train(config)


def test_keeps_the_last_checkpoints_and_ignores_an_unfinished_one(tiny_bert, sentiment_csv, tmp_path):
    config = _config(tiny_bert, sentiment_csv, tmp_path, max_steps=6, save_every=1, keep_last=2)
    result = _train(config)
    unfinished = result.out_dir / "checkpoints" / ".step-00000007.tmp-1"
    unfinished.mkdir()  # what a crash in the middle of a save leaves
    assert [c.name for c in list_checkpoints(result.out_dir)] == ["step-00000005", "step-00000006"]


def test_non_finite_losses_skip_steps_then_stop(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(patch_module, "_normalized", lambda loss_sum, count, items: loss_sum * float("nan"))
    with pytest.warns(UserWarning, match="step skipped"), pytest.raises(TrainingError, match="3 non-finite losses"):
        _train(_config(tiny_bert, sentiment_csv, tmp_path, max_bad_steps=3))


def test_early_stopping(tiny_bert, sentiment_csv, tmp_path):
    """With a learning rate too small to change anything, accuracy never improves: patience 1 stops at eval 2."""
    result = _train(_config(tiny_bert, sentiment_csv, tmp_path, lr=1e-12, eval_every=2,
                            early_stopping_metric="accuracy", early_stopping_patience=1))
    assert result.stopped == "early_stopping" and result.steps == 4


def test_one_interpreted_step(tiny_bert, sentiment_csv, tmp_path):
    """Two steps through ember's Triton kernels themselves (the interpreter, or the GPU)."""
    result = train_module.train(_config(tiny_bert, sentiment_csv, tmp_path, max_steps=2, eval_size=32,
                                        precision="bf16"))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_default_job_runs_on_the_real_assets(tmp_path):
    """The default job, shortened: all-MiniLM-L6-v2 and Rotten Tomatoes from their packages, through the CLI."""
    try:
        asset_path("all-minilm-l6-v2"), asset_path("rotten-tomatoes")
    except ConfigError as error:
        pytest.skip(str(error))
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the PyTorch path on the CPU: what a user's run takes
    command = [sys.executable, "-m", "ember.cli", "train", "--max_steps=3", "--eval_size=64",
               "--train_size=96", "--batch_size=8", "--progress=false", f"--out_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision: bf16 (auto:" in result.stdout or "precision: fp32 (auto: the CPU has no native bf16" in result.stdout
    assert "held-out after 3 steps: loss" in result.stdout and "macro avg" in result.stdout
    assert "fresh" in result.stdout and "rotten" in result.stdout


# ----------------------------------------------------------------------------
# Causal LM: packing, prompt masking, perplexity
# ----------------------------------------------------------------------------


def _lm_config(tiny_llama, story_txt, tmp_path, **overrides) -> TrainConfig:
    values = dict(task="causal-lm", model=str(tiny_llama), data=str(story_txt), out_dir=str(tmp_path / "lm"),
                  max_length=32, eval_size=12, batch_size=8, max_steps=60, warmup_steps=5, lr=1e-2, eval_every=30,
                  save_every=30, lora_r=0, progress=False, precision="fp32", pack=True)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_causal_lm_learns(tiny_llama, story_txt, tmp_path, pack):
    result = _train(_lm_config(tiny_llama, story_txt, tmp_path, pack=pack))
    assert result.report is None
    assert result.eval_after["perplexity"] < 0.5 * result.eval_before["perplexity"]
    assert result.eval_after["perplexity"] == pytest.approx(math.exp(result.eval_after["loss"]))


def test_packed_documents_do_not_see_each_other(tiny_llama, story_txt, tmp_path, device):
    """The same documents give the same summed loss packed in one row (varlen attention) and padded one per row."""
    from ember.engine.patch import patch
    from ember.engine.tasks import CausalLMTask

    config = _lm_config(tiny_llama, story_txt, tmp_path)
    tokenizer = train_module.load_tokenizer(tiny_llama)
    model = patch(train_module.load_model(config, tiny_llama, [])).to(device)
    packed_task = CausalLMTask(config, tokenizer, torch.device(device))
    padded_task = CausalLMTask(dataclasses.replace(config, pack=False), tokenizer, torch.device(device))
    documents = packed_task.train_examples[:5]
    packed, padded = packed_task.batch(documents), padded_task.batch(documents)
    assert packed["input_ids"].shape[0] == 1 and (packed["position_ids"] == 0).sum() == 5
    assert packed_task.targets(packed) == padded_task.targets(padded) == sum(len(ids) - 1 for ids, _ in documents)
    with torch.no_grad():
        packed_loss = packed_task.loss(model, packed, 1)
        padded_loss = padded_task.loss(model, padded, 1)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-4)


def test_smollm2_preset_runs_on_the_real_assets(tmp_path):
    """The smollm2-lora preset, shortened: SmolLM2-135M from its GGUF file and Hamlet, LoRA, packing, fused loss."""
    try:
        asset_path("smollm2-135m"), asset_path("hamlet")
    except ConfigError as error:
        pytest.skip(str(error))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "ember.cli", "train", "--preset=smollm2-lora", "--max_steps=2",
               "--eval_size=2", "--train_size=8", "--max_length=64", "--progress=false",
               f"--out_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out before: loss" in result.stdout and "perplexity" in result.stdout
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_config.json").is_file()


def test_checkpoints_hold_a_peft_adapter(tiny_bert, sentiment_csv, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    result = _train(_config(tiny_bert, sentiment_csv, tmp_path, max_steps=2, save_every=2))
    adapter = list_checkpoints(result.out_dir)[-1] / "adapter"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in name for name, _ in loaded.named_parameters())


def test_gradient_accumulation_normalizes_by_the_whole_batch(tiny_bert, sentiment_csv, tmp_path):
    """Two micro-batches of 8 give the same steps as one batch of 16 (the same 16 examples, in the same order)."""
    common = dict(max_steps=5, lora_dropout=0.0, eval_every=100, save_every=100)
    one = _train(_config(tiny_bert, sentiment_csv, tmp_path / "one", batch_size=16, **common))
    two = _train(_config(tiny_bert, sentiment_csv, tmp_path / "two", batch_size=8, grad_accum=2, **common))
    assert two.losses == pytest.approx(one.losses, rel=1e-4)


@pytest.mark.parametrize("offload", [False, True], ids=["checkpointing", "checkpointing+offload"])
def test_gradient_checkpointing_gives_the_same_steps(tiny_bert, sentiment_csv, tmp_path, offload):
    common = dict(max_steps=4, eval_every=100, save_every=100, lora_r=0)
    plain = _train(_config(tiny_bert, sentiment_csv, tmp_path / "plain", **common))
    checkpointed = _train(_config(tiny_bert, sentiment_csv, tmp_path / "ckpt", gradient_checkpointing=True,
                                  offload_activations=offload, **common))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_eval_command_reads_the_latest_checkpoint(tiny_bert, sentiment_csv, tmp_path, capsys):
    from ember.cli import main

    config = _config(tiny_bert, sentiment_csv, tmp_path, max_steps=40, save_every=40)
    result = _train(config)
    arguments = [f"--{key}={value}" for key, value in config.to_dict().items() if key not in ("betas", "report_to")]
    with forced_backend("torch"):
        assert main(["eval", *arguments]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {result.eval_after['accuracy']:.4f}" in out and "macro avg" in out


# ----------------------------------------------------------------------------
# Token classification (generated data: no real named-entity set ships in a package)
# ----------------------------------------------------------------------------


def test_token_classification_learns(tiny_bert, tmp_path, tagging_jsonl):
    result = _train(_config(tiny_bert, tagging_jsonl, tmp_path, task="token-classification", text_column="tokens",
                            label_column="tags", eval_size=50, max_steps=100, lr=1e-2))
    assert [c.name for c in result.report.classes] == ["O", "NEG", "POS"]  # conll.tag_names: O first
    assert result.eval_after["macro_f1"] >= 0.9 > result.eval_before["macro_f1"]


def test_qlora_run(tiny_bert, sentiment_csv, tmp_path, capsys):
    """qlora=true: the body's Linear weights in NF4 (bitsandbytes' layout), adapters and head trained."""
    result = _train(_config(tiny_bert, sentiment_csv, tmp_path, qlora=True, max_steps=120, eval_every=100,
                            save_every=100))
    assert result.eval_after["loss"] < result.eval_before["loss"]
    log = (result.out_dir / "log.jsonl").read_text()
    assert '"qlora": true' in log
    # The export records how the base was quantized (BitsAndBytesConfig's arguments); the head stayed dense.
    recorded = json.loads((result.out_dir / "final" / "adapter" / "base_quantization.json").read_text())
    assert (recorded["bnb_4bit_quant_type"], recorded["bnb_4bit_use_double_quant"], recorded["bnb_4bit_compute_dtype"],
            recorded["llm_int8_skip_modules"], recorded["blocksize"]) == ("nf4", True, "float32", ["classifier"], 64)
    report = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model:"))
    # NF4: half a byte per weight, plus absmax and, per tiny matrix here, bnb's 1 KiB code table; dense: 4.
    assert float(report.rsplit("(", 1)[1].split()[0]) < 1.5


def test_tensorboard_events(tiny_bert, sentiment_csv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _train(_config(tiny_bert, sentiment_csv, tmp_path, max_steps=10, eval_every=5, tensorboard=True))
    events = EventAccumulator(str(result.out_dir / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/accuracy", "eval/macro_f1"} <= set(scalars)
    assert [event.step for event in events.Scalars("train/loss")] == [5, 10]


