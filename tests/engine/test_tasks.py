"""What each task makes of its data: labels on the right tokens, prompts out of the loss."""

from __future__ import annotations

import json

import pytest
import torch

from ember.engine.config import TrainConfig
from ember.engine.errors import ConfigError
from ember.engine.train import load_tokenizer


def test_prompts_are_masked_from_the_loss(tiny_llama, tmp_path):
    from ember.engine.tasks import CausalLMTask

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"the film was {w}", "response": "good and warm"})
                              for w in ("good", "bad", "dull", "fine")))
    config = TrainConfig(task="causal-lm", model=str(tiny_llama), data=str(data), prompt_column="prompt",
                         text_column="response", eval_size=1, max_length=32)
    task = CausalLMTask(config, load_tokenizer(tiny_llama), torch.device("cpu"))
    ids, labels = task.train_examples[0]
    assert len(ids) == 4 + 3 + 1  # prompt, response, [SEP]
    assert labels[:4] == [-100] * 4 and labels[4:] == ids[4:]
    assert task.targets(task.batch([task.train_examples[0]])) == 4


def test_a_words_tag_goes_to_its_first_sub_word(tmp_path):
    import transformers

    from ember.engine.tasks import TokenClassificationTask

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "film", "##s", "the"]
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    data = tmp_path / "tags.jsonl"
    data.write_text(json.dumps({"tokens": ["the", "films", "good"], "tags": ["O", "X", "Y"]}) + "\n"
                    + json.dumps({"tokens": "good the", "tags": "Y O"}) + "\n")
    config = TrainConfig(task="token-classification", data=str(data), text_column="tokens", label_column="tags",
                         eval_size=0, max_length=16)
    task = TokenClassificationTask(config, tokenizer, torch.device("cpu"))
    assert task.class_names == ["O", "X", "Y"]
    batch = task.batch([(["the", "films", "good"], [0, 1, 2])])
    # [CLS] the film ##s good [SEP]: "films" is scored once, at "film".
    assert batch["input_ids"].tolist() == [[2, 8, 6, 7, 5, 3]]
    assert batch["labels"].tolist() == [[-100, 0, 1, -100, 2, -100]]
    assert task.targets(batch) == 3 and len(task.train_examples) == 2

    data.write_text(json.dumps({"tokens": ["the", "film"], "tags": ["O"]}) + "\n")
    with pytest.raises(ConfigError, match="row 0: 2 words but 1 tags"):
        TokenClassificationTask(config, tokenizer, torch.device("cpu"))
