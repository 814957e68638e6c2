"""Data: checked columns, a seeded held-out split, and batches in an order a resumed run repeats."""

from __future__ import annotations

import json

import pytest

from ember.engine.config import TrainConfig
from ember.engine.data import (
    DataPosition,
    classes_of,
    load_classification,
    next_batch,
    read_labelled_rows,
    split_held_out,
)
from ember.engine.errors import ConfigError


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


def test_split_is_seeded_disjoint_and_cut_to_train_size():
    config = TrainConfig(eval_size=3, train_size=4, seed=7)
    train, held_out = split_held_out(range(10), config)
    assert len(held_out) == 3 and len(train) == 4 and not set(train) & set(held_out)
    assert (train, held_out) == split_held_out(range(10), config)
    assert split_held_out(range(10), TrainConfig(eval_size=3, seed=8)) != (train, held_out)
    with pytest.raises(ConfigError, match="eval_size 10 leaves no training data"):
        split_held_out(range(10), TrainConfig(eval_size=10))


def test_rows_need_their_columns(tmp_path):
    config = TrainConfig(data=_jsonl(tmp_path / "rows.jsonl", [{"text": "good", "stars": 1}]))
    with pytest.raises(ConfigError, match="has no column 'label'; it has text, stars"):
        read_labelled_rows(config)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        read_labelled_rows(TrainConfig(data=str(empty)))


def test_classification_labels_become_classes(tmp_path):
    rows = [{"text": f"text {i}", "label": ["neg", "pos"][i % 2]} for i in range(8)]
    data = load_classification(TrainConfig(data=_jsonl(tmp_path / "rows.jsonl", rows), eval_size=2))
    assert data.class_names == ["neg", "pos"] and len(data.train) == 6 and len(data.eval) == 2
    assert all(label == int(text.split()[1]) % 2 for text, label in data.train + data.eval)


def test_batches_follow_an_order_that_depends_only_on_seed_and_epoch():
    examples = list(range(10))
    position = DataPosition()
    whole = [next_batch(examples, 4, seed=3, position=position) for _ in range(5)]
    assert position.epoch == 2 and sorted(whole[0] + whole[1]) != examples  # full batches only: 2 per epoch
    resumed_at = DataPosition(epoch=1, batch=0)
    assert [next_batch(examples, 4, seed=3, position=resumed_at) for _ in range(3)] == whole[2:]
    with pytest.raises(ConfigError, match="batch_size 11 is larger than the training set"):
        next_batch(examples, 11, seed=3, position=DataPosition())


def test_classes_are_the_distinct_labels():
    """A stray large label is one class, not a head of a billion; gaps make no empty classes."""
    config = TrainConfig()
    assert classes_of([0, 1, 10**9, 1], config) == (["0", "1", "1000000000"], [0, 1, 2, 1])
    assert classes_of([9, 0, 1], config) == (["0", "1", "9"], [2, 0, 1])
    assert classes_of(["rotten", "fresh"], config) == (["fresh", "rotten"], [1, 0])
    for labels, message in (([0, "1"], "all integers or all strings"), ([0, None], "row 1: 'label' is missing"),
                            ([True, False], "neither an integer nor a string"), ([3, 3], "at least 2 classes")):
        with pytest.raises(ConfigError, match=message):
            classes_of(labels, config)
