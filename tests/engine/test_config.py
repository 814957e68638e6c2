"""Config: defaults, presets, TOML and --key=value overrides, every key checked against its type."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ember.cli import main
from ember.engine.config import PRESETS, ConfigError, TrainConfig, load_config


def test_sources_in_order(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('lr = 0.5\nbatch_size = 4\nbetas = [0.8, 0.9]\nmodel = "my/model"\n')
    config = load_config(path, ["--batch_size=8", "--pack=true", "--betas=0.7,0.95"])
    assert (config.lr, config.batch_size, config.pack, config.betas, config.model) == (0.5, 8, True, (0.7, 0.95),
                                                                                       "my/model")
    assert config.max_steps == TrainConfig().max_steps  # untouched keys keep their defaults


def test_presets(tmp_path):
    assert load_config(None, ["--preset=minilm-sentiment"]) == TrainConfig()
    smollm = load_config(None, ["--preset=smollm2-lora", "--max_steps=7"])
    assert (smollm.task, smollm.model, smollm.pack, smollm.max_steps) == ("causal-lm", "asset:smollm2-135m", True, 7)
    path = tmp_path / "job.toml"
    path.write_text('preset = "smollm2-lora"\nlr = 0.25\n')
    assert load_config(path).lr == 0.25 and load_config(path).task == "causal-lm"
    assert set(PRESETS) == {"minilm-sentiment", "smollm2-lora"}


@pytest.mark.parametrize(("overrides", "message"), [
    (["--nonsense=1"], "unknown key 'nonsense' in the command line"),
    (["--max_steps=abc"], "max_steps: expected int, got 'abc'"),
    (["--lr=fast"], "lr: expected float, got 'fast'"),
    (["--pack=maybe"], "pack: expected bool, got 'maybe'"),
    (["--betas=0.9"], "betas: expected 2 comma-separated numbers, got '0.9'"),
    (["--precision=fp8"], "precision: expected one of auto, bf16, fp16, bf16-pure, fp32, got 'fp8'"),
    (["--batch_size=0"], "batch_size: expected a positive integer, got 0"),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["lr=1"], "expected --key=value, got 'lr=1'"),
    (["--qlora=true", "--lora_r=0"], "qlora: needs lora_r > 0"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    typed = tmp_path / "typed.toml"
    typed.write_text('max_steps = "ten"')
    with pytest.raises(ConfigError, match="max_steps: expected int, got 'ten'"):
        load_config(typed)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--nonsense=1"], "ember: error: unknown key 'nonsense' in the command line"),
    (["--model=/no/such/folder"], "ember: error: model folder '/no/such/folder' does not exist"),
    (["--max_length=1000"], "ember: error: max_length 1000 is longer than the model allows (40 positions)"),
    pytest.param(["--device=cuda"], "ember: error: device: cuda was asked for but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_cli_errors_are_one_line(arguments, message, capsys, tiny_bert, sentiment_csv, tmp_path):
    code = main(["train", f"--model={tiny_bert}", f"--data={sentiment_csv}", f"--out_dir={tmp_path}", "--eval_size=100",
                 "--progress=false", *arguments])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_bad_data_is_reported(capsys, tiny_bert, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    negative = tmp_path / "negative.jsonl"
    negative.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": -3}\n')
    for data, message in ((empty, "is empty"), (negative, "label -3 out of range"),
                          (tmp_path / "none.csv", "does not exist")):
        code = main(["train", f"--model={tiny_bert}", f"--data={data}", f"--out_dir={tmp_path}", "--progress=false"])
        assert code == 2
        assert message in capsys.readouterr().err


def test_no_traceback_from_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--max_steps=-1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "ember: error: max_steps: expected a positive integer, got -1"


