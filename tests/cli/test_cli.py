"""The `ember` command line: its commands, one-line errors and exit codes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

import ember.cli as cli
from ember.cli import main
from ember.engine.config import TrainConfig, load_config
from ember.engine.config_aliases import ALIASES


def test_demo_command(capsys):
    assert main(["demo", "--tokens", "16", "--hidden", "16", "--vocab", "300"]) == 0
    assert "losses agree" in capsys.readouterr().out


def test_bad_arguments_give_a_one_line_error():
    result = subprocess.run(["ember", "demo", "--tokens", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "ember: error: --tokens must be >= 1"


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run([sys.executable, "-m", "ember.cli", "bench", "report", "missing.json"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "ember: error: 'missing.json' does not exist"


@pytest.mark.parametrize(("argv", "handler", "suites"), [
    (["bench"], "_bench_run", []),
    (["bench", "--quick"], "_bench_run", []),
    (["bench", "lora", "optimizer"], "_bench_run", ["lora", "optimizer"]),
    (["bench", "run", "lora"], "_bench_run", ["lora"]),
    (["bench", "report", "run.json"], "_bench_report", None),
])
def test_bench_without_a_subcommand_runs_suites(monkeypatch, argv, handler, suites):
    called = {}
    monkeypatch.setattr(cli, handler, lambda args: called.setdefault("args", args) and 0)
    assert main(argv) == 0
    args = called["args"]
    assert getattr(args, "suites", None) == suites
    assert getattr(args, "quick", False) == ("--quick" in argv)


def test_options_of_other_commands_are_not_taken_as_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--lr=1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --lr=1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_lists_every_config_key_with_its_default(command, capsys, monkeypatch):
    """The list is generated from TrainConfig: each key appears once, and the default it shows, typed back on
    the command line, gives the default config (so the shown default is the real one, in a form one can type)."""
    monkeypatch.setenv("COLUMNS", "80")  # narrow: long meanings and defaults wrap onto following lines
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out.split("config keys:\n", 1)[1]
    entries = re.split(r"^  (?=--)", listing, flags=re.MULTILINE)[1:]  # one entry per key, wrapped lines joined
    entries = {entry.split()[0][2:]: " ".join(entry.split()) for entry in entries}
    assert list(entries) == [field.name for field in dataclasses.fields(TrainConfig)]
    for field in dataclasses.fields(TrainConfig):
        shown = re.search(r"\(default: (\S*?)[;)]", entries[field.name]).group(1)
        typed = "" if shown == "''" else shown
        assert load_config(None, [f"--{field.name}={typed}"]) == TrainConfig(), (field.name, shown)
        assert field.metadata["help"].split()[0] in entries[field.name]  # the meaning is there, not just the key
    for name, alias in ALIASES.items():  # and each TrainingArguments name, with the key it is an alias of
        assert re.search(rf"TrainingArguments: [a-z0-9_, ]*\b{name}\b", entries[alias.key]), (name, entries[alias.key])
