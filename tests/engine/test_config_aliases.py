"""TrainingArguments names as aliases of ember's keys: each sets exactly what the ember key sets, in a TOML
file, a YAML file and on the command line; an alias beside its own key, or a name ember cannot honour, is a
one-line error."""

from __future__ import annotations

import re

import pytest

from ember.engine.config import ConfigError, TrainConfig, load_command_line, load_config
from ember.engine.config_aliases import ALIASES

RENAMES = [name for name, alias in ALIASES.items() if alias.values is None and alias.type is not bool]
# A value each renamed key accepts, different from its default.
VALUES = {int: ("7", 7), float: ("0.25", 0.25), str: ("runs/elsewhere", "runs/elsewhere")}


def _file(tmp_path, kind: str, keys: dict) -> str:
    """A config file of ``keys`` (values already typed as text in that format)."""
    path = tmp_path / f"job.{kind}"
    separator = " = " if kind == "toml" else ": "
    path.write_text("".join(f"{key}{separator}{value}\n" for key, value in keys.items()))
    return str(path)


@pytest.mark.parametrize("name", RENAMES)
def test_each_renamed_key(name, tmp_path):
    alias = ALIASES[name]
    text, value = VALUES[alias.type]
    expected = load_config(None, [f"--{alias.key}={text}"])
    assert getattr(expected, alias.key) == value
    assert load_command_line([f"--{name}", text]) == expected
    assert load_command_line([f"--{name.replace('_', '-')}={text}"]) == expected  # --learning-rate, as argparse
    in_file = f'"{text}"' if alias.type is str else text
    assert load_config(_file(tmp_path, "toml", {name: in_file})) == expected
    assert load_config(_file(tmp_path, "yaml", {name: in_file})) == expected


def test_learning_rate_in_a_yaml_file_as_hugging_face_users_write_it(tmp_path):
    """3e-4 without a dot: PyYAML (YAML 1.1) would read it as text; ember reads it as YAML 1.2 and TOML do."""
    config = load_config(_file(tmp_path, "yaml", {"learning_rate": "3e-4", "per_device_train_batch_size": 8,
                                                  "output_dir": "runs/hf", "report_to": "none"}))
    assert (config.lr, config.batch_size, config.out_dir, config.report_to) == (3e-4, 8, "runs/hf", ())
    with pytest.raises(ConfigError, match="learning_rate: expected float, got '3e-4'"):  # quoted: text
        load_config(_file(tmp_path, "yaml", {"learning_rate": '"3e-4"'}))


@pytest.mark.parametrize(("value", "schedule", "min_lr_ratio", "warmup_steps"), [
    ("linear", "linear", 0.0, 10),  # Hugging Face's linear and cosine decay to 0
    ("cosine", "cosine", 0.0, 10),
    ("cosine_with_min_lr", "cosine", 0.1, 10),  # the floor stays ember's min_lr_ratio
    ("constant_with_warmup", "constant", 0.1, 10),
    ("constant", "constant", 0.1, 0),  # Hugging Face's constant has no warm-up
])
def test_lr_scheduler_type(value, schedule, min_lr_ratio, warmup_steps):
    config = load_command_line(["--lr_scheduler_type", value])
    assert (config.schedule, config.min_lr_ratio, config.warmup_steps) == (schedule, min_lr_ratio, warmup_steps)
    # A key the value implies gives way to the same key written beside it.
    written = load_command_line(["--lr_scheduler_type", value, "--min_lr_ratio", "0.2", "--warmup_steps", "3"])
    assert (written.schedule, written.min_lr_ratio, written.warmup_steps) == (schedule, 0.2, 3)


@pytest.mark.parametrize(("arguments", "precision"), [
    (["--bf16"], "bf16"), (["--fp16", "true"], "fp16"), (["--bf16=false"], "fp32"),
    (["--bf16", "false", "--fp16", "true"], "fp16"), (["--bf16", "no", "--fp16", "no"], "fp32"),
])
def test_bf16_and_fp16_are_read_together(arguments, precision):
    assert load_command_line(arguments).precision == precision


def test_optim_and_use_cpu():
    assert load_command_line(["--optim", "adamw_torch"]).optimizer == "adamw"
    assert load_command_line(["--optim", "paged_adamw_8bit"]).optimizer == "bnb_paged_adamw8bit"
    assert load_command_line(["--use_cpu"]).device == "cpu"
    assert load_command_line(["--use_cpu", "false"]).device == TrainConfig().device


def test_a_bool_alias_alone_before_the_config_file(tmp_path):
    job = _file(tmp_path, "yml", {"max_steps": 7})
    config = load_command_line(["--bf16", job, "--gradient_checkpointing"])
    assert (config.precision, config.max_steps, config.gradient_checkpointing) == ("bf16", 7, True)


def test_a_later_source_wins_over_an_alias_in_an_earlier_one(tmp_path):
    job = _file(tmp_path, "toml", {"learning_rate": 0.5, "bf16": "true"})
    config = load_command_line([job, "--lr", "0.25", "--precision", "fp32"])
    assert (config.lr, config.precision) == (0.25, "fp32")


@pytest.mark.parametrize(("arguments", "message"), [
    (["--learning_rate", "1e-3", "--lr", "2e-3"],
     "learning_rate and lr in the command line are one key (learning_rate is TrainingArguments' name for lr): "
     "give one of them"),
    (["--lr_scheduler_type", "cosine", "--schedule", "linear"], "lr_scheduler_type and schedule in the command line"),
    (["--bf16", "--precision", "fp32"], "bf16 and precision in the command line are one key"),
    (["--bf16", "--fp16"], "bf16 and fp16 in the command line: at most one can be true"),
    (["--lr_scheduler_type", "polynomial"],
     "lr_scheduler_type: expected one of linear, cosine, cosine_with_min_lr, constant_with_warmup, constant, "
     "got 'polynomial'"),
    (["--optim", "adafactor"], "optim: expected one of adamw_torch, adamw_torch_fused"),
    (["--learning_rate", "fast"], "learning_rate: expected float, got 'fast'"),
    (["--save_total_limit", "0"], "keep_last: expected a positive integer, got 0"),
    (["--num_train_epochs", "3"], "num_train_epochs in the command line is a TrainingArguments name ember does not "
                                  "take: ember counts optimizer steps, not epochs: set max_steps"),
    (["--warmup_ratio", "0.1"], "warmup_ratio in the command line is a TrainingArguments name ember does not take"),
])
def test_bad_aliases(arguments, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_command_line(arguments)


def test_an_alias_beside_its_key_in_a_file(tmp_path):
    job = _file(tmp_path, "yaml", {"output_dir": "a", "out_dir": "b"})
    with pytest.raises(ConfigError, match=re.escape(f"output_dir and out_dir in {job} are one key")):
        load_config(job)
