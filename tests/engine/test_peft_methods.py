"""PEFT's DoRA, AdaLoRA, IA3 and prefix tuning through ember's loop (``peft_method``), with ember's kernels on:
they train, resume exactly, export adapters PEFT loads back to the same logits, and refuse what does not combine."""

from __future__ import annotations

import shutil

import pytest
import torch

import ember.engine.train as train_module
from ember.engine.checkpoint import list_checkpoints, load_state, load_trainable
from ember.engine.config import ConfigError, TrainConfig, load_config
from ember.kernels.backend import forced_backend

peft = pytest.importorskip("peft")

# Prefix tuning trains causal LMs only (PEFT's classification path does not reach transformers 5's models).
METHOD_TASKS = {"dora": "sequence-classification", "adalora": "sequence-classification",
                "ia3": "sequence-classification", "prefix": "causal-lm"}


@pytest.fixture
def method_config(tiny_bert, sentiment_csv, tiny_llama, story_txt, tmp_path):
    def make(method: str, out_dir, **overrides) -> TrainConfig:
        values = dict(peft_method=method, task=METHOD_TASKS[method], out_dir=str(out_dir), max_steps=3,
                      warmup_steps=0, batch_size=8, eval_size=16, lora_r=4, lora_alpha=8.0, lora_dropout=0.0,
                      lr=1e-2, save_every=2, eval_every=100, progress=False, precision="fp32", num_virtual_tokens=3)
        if method == "prefix":
            values.update(model=str(tiny_llama), data=str(story_txt), max_length=32)
        else:
            values.update(model=str(tiny_bert), data=str(sentiment_csv), max_length=16)
        values.update(overrides)
        return TrainConfig(**values)

    return make


def _train(config):
    # ember's kernels are on (the model is patched); their CPU path, the kernels themselves are proven elsewhere.
    with forced_backend("torch"):
        return train_module.train(config)


def _trained_model(config):
    """The model of the run's latest checkpoint, built as ``ember eval`` builds it."""
    precision = train_module.decide(config.precision, torch.device("cpu"))
    task, model = train_module._task_and_model(config, precision, torch.device("cpu"))
    folder = list_checkpoints(config.out_dir)[-1]
    train_module.copy_parameters(load_trainable(folder), train_module.trainable_parameters(model), folder)
    return task, model.eval()


def _stock_base(config):
    import transformers

    if config.task == "causal-lm":
        return transformers.AutoModelForCausalLM.from_pretrained(config.model)
    return transformers.AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2)


@pytest.mark.parametrize("method", list(METHOD_TASKS))
def test_trains_resumes_and_exports(method, method_config, tmp_path, monkeypatch, capsys):
    """3 steps with every trainable tensor changed; a resume from step 2 gives step 3's loss, tensors and AdaLoRA
    allocator state exactly; final/adapter, loaded by PEFT into a stock model, gives the trained model's logits."""
    initial = {}
    start = train_module.start

    def start_and_remember(config):
        run = start(config)
        initial.update({name: p.detach().clone() for name, p in run.trainable.items()})
        return run

    monkeypatch.setattr(train_module, "start", start_and_remember)
    config = method_config(method, tmp_path / "whole")
    whole = _train(config)
    assert whole.steps == 3 and all(torch.isfinite(torch.tensor(whole.losses)))
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model:"))
    assert f"{method} (PEFT {peft.__version__})" in model_line  # and, in the same line, which kernels run
    assert ("ember's attention runs the virtual tokens" if method == "prefix"
            else "PEFT's adapter layers run their own matmuls") in model_line
    final = load_trainable(list_checkpoints(config.out_dir)[-1])
    assert initial and final.keys() == initial.keys()
    if config.task != "causal-lm":  # the fresh head is trained whole (PEFT's modules_to_save)
        assert {"classifier.modules_to_save.default.weight", "classifier.modules_to_save.default.bias"} <= {
            name.removeprefix("base_model.model.") for name in initial}
    assert [name for name in initial if torch.equal(final[name], initial[name])] == []

    # Resume from the step-2 checkpoint of a copy.
    split = tmp_path / "split"
    shutil.copytree(config.out_dir, split)
    shutil.rmtree(split / "final")
    shutil.rmtree(list_checkpoints(split)[-1])
    resumed = _train(method_config(method, split, resume=True))
    assert resumed.losses == whole.losses[2:]
    resumed_final = list_checkpoints(split)[-1]
    assert all(torch.equal(tensor, final[name]) for name, tensor in load_trainable(resumed_final).items())
    allocator, resumed_allocator = (load_state(list_checkpoints(out)[-1])["peft_method"]
                                    for out in (config.out_dir, split))
    if method == "adalora":  # importance scores and the rank pattern: masking goes on as it would have
        assert allocator["exp_avg_ipt"] and isinstance(allocator["rank_pattern"], dict)
        assert allocator["rank_pattern"] == resumed_allocator["rank_pattern"]
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            assert all(torch.equal(t, resumed_allocator[name][key]) for key, t in allocator[name].items())
    else:
        assert allocator == resumed_allocator == {}

    # The export in PEFT's format, read by PEFT itself into a stock (unpatched) model.
    exported = peft.PeftModel.from_pretrained(_stock_base(config), config.out_dir + "/final/adapter").eval()
    assert exported.peft_config["default"].peft_type == {"dora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
                                                         "prefix": "PREFIX_TUNING"}[method]
    task, trained = _trained_model(config)
    batch = {k: v for k, v in task.batch(task.eval_examples[:4]).items() if k != "labels"}
    with torch.no_grad(), forced_backend("torch"):
        torch.testing.assert_close(trained(**batch).logits, exported(**batch).logits, rtol=1e-4, atol=1e-5)
    with forced_backend("torch"):  # ember eval reads the checkpoint into the same model
        metrics, _ = train_module.evaluate_checkpoint(config)
    assert metrics == pytest.approx(whole.eval_after, rel=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["--peft_method=lokr"], "peft_method: expected one of lora, dora, adalora, prefix, ia3, got 'lokr'"),
    (["--peft_method=dora", "--qlora=true"], "qlora with peft_method 'dora' is not supported"),
    (["--peft_method=ia3", "--lora_r=0"], "peft_method 'ia3' trains adapters, but lora_r = 0"),
    (["--peft_method=prefix"], "peft_method 'prefix' with task 'sequence-classification' is not supported"),
    (["--peft_method=prefix", "--preset=smollm2-lora"], "peft_method 'prefix' with pack = true"),
    (["--peft_method=prefix", "--task=causal-lm", "--gradient_checkpointing=true"],
     "peft_method 'prefix' with gradient_checkpointing = true"),
    (["--num_virtual_tokens=0"], "num_virtual_tokens: expected a positive integer, got 0"),
    (["--peft_method=adalora", "--max_steps=10", "--warmup_steps=9"], "warmup_steps 9 leaves no steps"),
], ids=["unknown", "qlora", "full-fine-tune", "prefix-classification", "prefix-packed", "prefix-checkpointing",
        "virtual-tokens", "adalora-schedule"])
def test_config_refuses_what_does_not_combine(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_targets_that_match_nothing_are_named(method_config, tmp_path):
    with pytest.raises(ConfigError, match="peft_method 'dora' \\(lora_targets 'nothing_here'\\)"):
        _train(method_config("dora", tmp_path / "run", lora_targets="nothing_here"))
    assert not (tmp_path / "run").exists()


def test_adalora_penalty_and_allocation(tiny_bert):
    """PEFT's orthogonality penalty is in the training loss, not in a held-out one (and its weight is back after);
    a step whose gradients overflowed (fp16's scaler skipped it) leaves the rank allocator's scores alone."""
    import transformers

    from ember.engine import peft_methods

    config = TrainConfig(peft_method="adalora", lora_r=4, lora_dropout=0.0, max_steps=10, warmup_steps=0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = peft_methods.wrap(base, config, head="classifier")
    batch = transformers.AutoTokenizer.from_pretrained(tiny_bert)(["good film", "a dull plot"], padding=True,
                                                                    return_tensors="pt")
    labels = torch.tensor([1, 0])
    training_loss = model.train()(**batch, labels=labels).loss
    output = model.eval()(**batch, labels=labels)
    assert output.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(output.logits, labels).item(),
                                               rel=1e-6)
    assert training_loss.item() > output.loss.item() + 0.1
    assert model.peft_config["default"].orth_reg_weight == peft_methods.ADALORA_ORTH_REG_WEIGHT

    hooks = peft_methods.step_hooks(model, config)
    training_loss.backward()
    next(p for name, p in model.named_parameters() if "lora_A" in name).grad[0, 0] = float("inf")
    hooks.after_optimizer_step(1)
    assert hooks.state_dict()["ipt"] == {}
    for p in model.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(posinf=1.0)
    hooks.after_optimizer_step(1)
    scores = hooks.state_dict()
    assert scores["ipt"] and all(torch.isfinite(t).all() for t in scores["exp_avg_ipt"].values())


def test_prefix_through_embers_attention_kernel_matches_stock(tiny_llama, device):
    """The virtual tokens' keys and values through ember's attention (the Triton kernels themselves: the
    interpreter here, CUDA there), its fused loss and layers, against stock transformers: loss and the prefix's
    gradient, padded rows included."""
    import copy

    import transformers

    from ember.engine.patch import patch

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    batch = tokenizer(["good film", "the movie was awful and dull"], padding=True, return_tensors="pt").to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).to(device)
    results = []
    for model in (copy.deepcopy(base), patch(base)):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.prompt_encoder.default.embedding.weight.grad))
    (stock_loss, stock_grad), (ember_loss, ember_grad) = results
    torch.testing.assert_close(ember_loss, stock_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ember_grad, stock_grad, rtol=1e-4, atol=1e-6)
    assert stock_grad.abs().amax() > 0


def test_token_classification_trains_the_head_whole(method_config, tmp_path, vocabulary):
    """A token classifier's head is no LoRA target under "all-linear": it is trained whole, as modules_to_save."""
    import json

    positive, negative, neutral = vocabulary
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps({"tokens": words, "tags": ["POS" if w in positive else "NEG" if w in negative
                                                                   else "O" for w in words]}) + "\n"
                            for words in ([positive[i % 6], neutral[i % 9], negative[i % 6]] for i in range(60))))
    config = method_config("dora", tmp_path / "run", task="token-classification", data=str(data),
                           text_column="tokens", label_column="tags", max_steps=2)
    result = _train(config)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    trained = load_trainable(list_checkpoints(result.out_dir)[-1])
    assert {name for name in trained if ".classifier." in name} == {
        f"base_model.model.classifier.modules_to_save.default.{p}" for p in ("weight", "bias")}
    saved = json.loads((result.out_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "TOKEN_CLS" and "classifier" in saved["modules_to_save"]
