"""Config: defaults, presets, TOML and --key=value overrides, every key checked against its type."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

from ember.cli import main
from ember.engine.config import PRESETS, ConfigError, TrainConfig, load_command_line, load_config


def test_sources_in_order(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('lr = 0.5\nbatch_size = 4\nbetas = [0.8, 0.9]\nmodel = "my/model"\n')
    config = load_config(path, ["--batch_size=8", "--pack=true", "--betas=0.7,0.95"])
    assert (config.lr, config.batch_size, config.pack, config.betas, config.model) == (0.5, 8, True, (0.7, 0.95),
                                                                                       "my/model")
    assert config.max_steps == TrainConfig().max_steps  # untouched keys keep their defaults


def test_yaml_files_as_toml_files(tmp_path):
    """The same keys and types as TOML (.yaml and .yml); a YAML number needs no dot (3e-4, as YAML 1.2 reads)."""
    for name in ("job.yaml", "job.yml"):
        path = tmp_path / name
        path.write_text("lr: 3e-4\nbatch_size: 4\nbetas: [0.8, 0.9]\nmodel: my/model\npack: true\n"
                        "report_to: [tensorboard]\n# a comment\n")
        config = load_config(path, ["--batch_size", "8"])
        assert (config.lr, config.batch_size, config.betas, config.model, config.pack, config.report_to) == (
            3e-4, 8, (0.8, 0.9), "my/model", True, ("tensorboard",))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == TrainConfig()
    preset = tmp_path / "preset.yaml"
    preset.write_text("preset: smollm2-lora\nmax_steps: 3\n")
    assert (load_config(preset).task, load_config(preset).max_steps) == ("causal-lm", 3)


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
    (["lr=1"], "expected --key=value or --key value, got 'lr=1'"),
    (["--lr"], "lr: expected a value: --lr=VALUE or --lr VALUE"),
    (["--qlora=true", "--lora_r=0"], "qlora: needs lora_r > 0"),
    # Well typed, but they would train the wrong way or crash later: refused by range.
    (["--grad_clip=-1"], "grad_clip: expected a finite number >= 0, got -1.0"),
    (["--min_lr_ratio=-1"], "min_lr_ratio: expected a number in [0, 1], got -1.0"),
    (["--min_lr_ratio=5"], "min_lr_ratio: expected a number in [0, 1], got 5.0"),
    (["--betas=0.9,1.5"], "betas: expected two numbers in [0, 1), got (0.9, 1.5)"),
    (["--weight_decay=-0.1"], "weight_decay: expected a finite number >= 0, got -0.1"),
    (["--lr=inf"], "lr: expected a finite number > 0, got inf"),
    (["--lr=nan"], "lr: expected a finite number > 0, got nan"),
    (["--lora_r=257"], "lora_r: expected an integer from 0 (full fine-tune) to 256, got 257"),
    (["--lora_alpha=nan"], "lora_alpha: expected a finite number > 0, got nan"),
    (["--lora_dropout=1"], "lora_dropout: expected a number in [0, 1), got 1.0"),
    (["--eval_size=0"], "eval_size: expected a positive integer, got 0"),
    (["--early_stopping_metric=acc"],
     "early_stopping_metric: expected one of loss, accuracy, macro_f1 (task sequence-classification), got 'acc'"),
    (["--task=causal-lm", "--early_stopping_metric=accuracy"], "expected one of loss, perplexity (task causal-lm)"),
])
def test_bad_overrides(overrides, message, capsys, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)
    # The command line: exit status 2, one line on stderr, nothing written.
    out_dir = tmp_path / "run"
    assert main(["train", *overrides, f"--out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ember: error: ") and not out_dir.exists(), err


def test_keys_as_argparse_users_type_them(tmp_path):
    """--key value (a space), a bool flag alone, and the config file anywhere among them."""
    job = tmp_path / "job.toml"
    job.write_text("max_steps = 7\n")
    config = load_command_line(["--lr", "3e-4", "--resume", str(job), "--progress", "false", "--seed=3"])
    assert (config.lr, config.resume, config.max_steps, config.progress, config.seed) == (3e-4, True, 7, False, 3)
    assert load_command_line(["--resume"]).resume is True
    with pytest.raises(ConfigError, match="expected one config file and --key=value options, got 'b.toml'"):
        load_command_line(["a.toml", "b.toml"])


def test_a_value_after_a_space_is_a_value_not_the_config_file(tmp_path, capsys, monkeypatch):
    """The issue's 'ember train --lr 3e-4' (config file '3e-4' does not exist): a negative number, a value that
    looks like a path or like a config file, all belong to the key before them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text("max_steps = 7\n")
    config = load_command_line(["--lr", "3e-4", "--data", "/data/train.csv", "--out_dir", "runs/x.toml", "job.toml",
                                "--warmup_steps", "0"])
    assert (config.lr, config.data, config.out_dir, config.max_steps, config.warmup_steps) == (
        3e-4, "/data/train.csv", "runs/x.toml", 7, 0)
    with pytest.raises(ConfigError, match=r"weight_decay: expected a finite number >= 0, got -1.0"):
        load_command_line(["--weight_decay", "-1"])
    assert main(["train", "--lr", "3e-4", "--max_steps", "-5"]) == 2  # through the command: the key's own error
    assert capsys.readouterr().err.strip() == "ember: error: max_steps: expected a positive integer, got -5"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("model = 'caf\xe9'".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(latin1)
    typed = tmp_path / "typed.toml"
    typed.write_text('max_steps = "ten"')
    with pytest.raises(ConfigError, match="max_steps: expected int, got 'ten'"):
        load_config(typed)


@pytest.mark.parametrize(("contents", "message"), [
    ("lr: [1, 2", "is not valid YAML: while parsing a flow sequence"),
    ("- lr\n- 0.1\n", "expected a mapping of keys to values, got list"),
    ("max_steps: ten\n", "max_steps: expected int, got 'ten'"),  # the same checks and words as TOML
    ("betas: 0.9\n", "betas: expected 2 comma-separated numbers, got 0.9"),
    ("nonsense: 1\n", "unknown key 'nonsense' in"),
    ("preset: [1]\n", "unknown preset [1]"),
    ("model: caf\xe9\n".encode("latin-1"), "is not valid YAML"),
])
def test_bad_yaml_files(contents, message, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    assert main(["train", str(path), f"--out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ember: error: ") and message in err[0], err


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


BAD_DATA = {  # file name: (contents, what the one-line error says)
    "empty.csv": ("text,label\n", "is empty"),
    "negative.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad", "label": -3}\n', "label -3 out of range"),
    "latin1.csv": ("text,label\ncaf\xe9 good,pos\n".encode("latin-1"), "is not UTF-8 text"),
    "broken.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad", \n', "line 2: not JSON"),
    "list.jsonl": ('{"text": "good", "label": 1}\n["bad", 0]\n', "line 2: expected a JSON object, got list"),
    "null_label.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad", "label": null}\n',
                         "row 1: 'label' is missing"),
    "no_label.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad"}\n', "row 1: 'label' is missing"),
    "null_text.jsonl": ('{"text": "good", "label": 1}\n{"text": null, "label": 0}\n', "row 1: 'text' is missing"),
    "mixed.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad", "label": "0"}\n',
                    "labels must be all integers or all strings"),
    "one_class.jsonl": ('{"text": "good", "label": 1}\n{"text": "bad", "label": 1}\n',
                        "classification needs at least 2 classes"),
    "float_label.jsonl": ('{"text": "good", "label": 1.5}\n{"text": "bad", "label": 0}\n',
                          "row 0: label 1.5 is neither an integer nor a string"),
    "missing.csv": (None, "does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_leaves_no_output(name, capsys, tiny_bert, tmp_path):
    contents, message = BAD_DATA[name]
    data = tmp_path / name
    if isinstance(contents, bytes):
        data.write_bytes(contents)
    elif contents is not None:
        data.write_text(contents)
    out_dir = tmp_path / "run"
    code = main(["train", f"--model={tiny_bert}", f"--data={data}", f"--out_dir={out_dir}", "--eval_size=1",
                 "--progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ember: error: ") and message in err[0], err
    assert not out_dir.exists()


def test_no_traceback_from_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ember.cli", "train", "--max_steps=-1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "ember: error: max_steps: expected a positive integer, got -1"




@pytest.mark.parametrize("damage", ["garbage config", "truncated weights", "zeroed weights", "no weights",
                                    "targets matching nothing"])
def test_bad_model_folders_and_targets_are_one_line_errors(damage, capsys, tiny_bert, sentiment_csv, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    weights = model / "model.safetensors"
    extra = []
    if damage == "garbage config":
        (model / "config.json").write_text("{not json")
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "zeroed weights":
        weights.write_bytes(bytes(weights.stat().st_size))
    elif damage == "no weights":
        weights.unlink()
    else:
        extra = ["--lora_targets=q_prj"]
    out_dir = tmp_path / "run"
    code = main(["train", f"--model={model}", f"--data={sentiment_csv}", f"--out_dir={out_dir}", "--eval_size=10",
                 "--max_length=16", "--progress=false", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    expected = "lora_targets 'q_prj': target_modules" if extra else f"model folder '{model}': cannot load its"
    assert code == 2 and len(err) == 1 and err[0].startswith(f"ember: error: {expected}"), err
    assert not out_dir.exists()
