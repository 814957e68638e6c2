"""``ember train``'s LoRA exports are complete PEFT artifacts: PEFT alone reproduces the run's held-out accuracy.

The default job (all-MiniLM-L6-v2 on Rotten Tomatoes, shortened) and a token
classification run are trained here; then a separate Python process that
imports only transformers and peft loads ``final/adapter`` with
``PeftModel.from_pretrained`` (the base built with the labels of
``final/config.json``) and with ``AutoPeftModelFor...``, and scores the same
held-out rows. Its accuracy must be ember's within 0.005.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ember.engine.train as train_module
from ember.engine.config import ConfigError, TrainConfig
from ember.engine.data import asset_path, model_folder
from ember.engine.tasks import TASKS
from ember.kernels.backend import forced_backend

# What a user without ember runs: plain transformers and peft, the labels from the export's config.json.
PEFT_ALONE = r"""
import json, sys
import peft, torch, transformers

request = json.loads(open(sys.argv[1]).read())
final, rows, token_level = request["final"], request["rows"], request["task"] == "token-classification"
adapter = final + "/adapter"
labels = transformers.AutoConfig.from_pretrained(final)  # final/config.json: num_labels, id2label, label2id
label_kwargs = dict(num_labels=labels.num_labels, id2label=labels.id2label, label2id=labels.label2id)
base_folder = peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path
model_class, auto_class = (
    (transformers.AutoModelForTokenClassification, peft.AutoPeftModelForTokenClassification) if token_level else
    (transformers.AutoModelForSequenceClassification, peft.AutoPeftModelForSequenceClassification))
tokenizer = transformers.AutoTokenizer.from_pretrained(final + "/tokenizer")
loaders = {
    "PeftModel": lambda: peft.PeftModel.from_pretrained(model_class.from_pretrained(base_folder, **label_kwargs),
                                                        adapter),
    # alone when the base's config already gives the head's size; else told the labels, as PEFT users do
    "AutoPeft": lambda: auto_class.from_pretrained(adapter, **({} if request["auto_alone"] else label_kwargs)),
}
results = {}
for name, load in loaders.items():
    model = load().eval()
    correct = total = 0
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        encoded = tokenizer([row["text"] for row in chunk], is_split_into_words=token_level, truncation=True,
                            max_length=request["max_length"], padding=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**encoded).logits.argmax(-1)
        for i, row in enumerate(chunk):
            if token_level:  # a word's tag is predicted at its first sub-word token
                firsts = {}
                for position, word in enumerate(encoded.word_ids(i)):
                    if word is not None:
                        firsts.setdefault(word, position)
                pairs = [(labels.id2label[int(predicted[i, p])], row["label"][w]) for w, p in firsts.items()]
            else:
                pairs = [(labels.id2label[int(predicted[i])], row["label"])]
            correct += sum(guess == gold for guess, gold in pairs)
            total += len(pairs)
    results[name] = {"accuracy": correct / total, "id2label": {str(k): v for k, v in model.config.id2label.items()}}
results["ember_imported"] = sorted(m for m in sys.modules if m == "ember" or m.startswith("ember."))
print(json.dumps(results))
"""


def _peft_alone(final, config: TrainConfig, auto_alone: bool, tmp_path) -> dict:
    """Score the held-out rows of ``config`` with ``final/adapter`` loaded by PEFT in a fresh process."""
    task = TASKS[config.task](config, train_module.load_tokenizer(model_folder(config.model)), torch.device("cpu"))
    rows = [{"text": text, "label": [task.class_names[i] for i in label] if isinstance(label, list)
             else task.class_names[label]} for text, label in task.eval_examples]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"final": str(final), "rows": rows, "task": config.task,
                                   "max_length": config.max_length, "auto_alone": auto_alone}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", PEFT_ALONE, str(request)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("ember_imported") == []
    return results


def _train(config: TrainConfig):
    # The export is under test, not the kernels: the PyTorch path (what a CPU user's run takes).
    with forced_backend("torch"):
        return train_module.train(config)


def test_peft_alone_reproduces_the_default_jobs_accuracy(tmp_path):
    """The default job, shortened: ``PeftModel.from_pretrained`` alone and ``AutoPeftModelForSequenceClassification``
    alone score the held-out rows as ember did (the head is the trained one, the labels are "fresh"/"rotten")."""
    try:
        asset_path("all-minilm-l6-v2"), asset_path("rotten-tomatoes")
    except ConfigError as error:
        pytest.skip(str(error))
    # Short, as test_default_job_runs_on_the_real_assets: a few steps move the head far from its fresh start.
    config = TrainConfig(max_steps=8, batch_size=8, train_size=64, eval_size=96, max_length=32, warmup_steps=2,
                         eval_every=1000, save_every=1000, precision="fp32", progress=False,
                         out_dir=str(tmp_path / "run"))
    result = _train(config)
    final = result.out_dir / "final"
    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["task_type"], adapter_config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    assert adapter_config["base_model_name_or_path"] == str(asset_path("all-minilm-l6-v2"))

    ours = result.eval_after["accuracy"]
    assert result.eval_after["loss"] < result.eval_before["loss"]
    peft_alone = _peft_alone(final, config, auto_alone=True, tmp_path=tmp_path)
    assert peft_alone["PeftModel"]["accuracy"] == pytest.approx(ours, abs=0.005)
    assert peft_alone["AutoPeft"]["accuracy"] == pytest.approx(ours, abs=0.005)
    assert peft_alone["PeftModel"]["id2label"] == {"0": "fresh", "1": "rotten"}


def test_peft_alone_reproduces_a_token_classification_runs_accuracy(tiny_bert, tagging_jsonl, tmp_path):
    """Three tags on a tiny BERT: PEFT builds the base with final/config.json's labels, then loads the adapter."""
    config = TrainConfig(task="token-classification", model=str(tiny_bert),
                         data=str(tagging_jsonl), text_column="tokens",
                         label_column="tags", max_length=16, eval_size=50, batch_size=16, max_steps=60,
                         warmup_steps=4, lr=1e-2, eval_every=1000, save_every=1000, lora_r=4, lora_alpha=8.0,
                         lora_dropout=0.0, precision="fp32", progress=False, out_dir=str(tmp_path / "run"))
    result = _train(config)
    final = result.out_dir / "final"
    adapter_config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["task_type"], adapter_config["modules_to_save"]) == ("TOKEN_CLS", ["classifier"])

    ours = result.eval_after["accuracy"]
    assert ours > 0.9 > result.eval_before["accuracy"]
    peft_alone = _peft_alone(final, config, auto_alone=False, tmp_path=tmp_path)
    assert peft_alone["PeftModel"]["accuracy"] == pytest.approx(ours, abs=0.005)
    assert peft_alone["AutoPeft"]["accuracy"] == pytest.approx(ours, abs=0.005)
    # The task's tag order (tag_names: "O" first), carried through final/config.json.
    assert peft_alone["AutoPeft"]["id2label"] == {"0": "O", "1": "NEG", "2": "POS"}
