"""Fixtures for engine tests: a tiny BERT folder with its own tokenizer, and a generated sentiment data set."""

from __future__ import annotations

import csv
import random

import pytest
import torch
import transformers

POSITIVE = ["good", "great", "fine", "moving", "clever", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "clumsy", "cold"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "acting", "is", "was", "and"]


@pytest.fixture(scope="session")
def vocabulary():
    """The words the tiny models' tokenizer knows: (positive, negative, neutral)."""
    return POSITIVE, NEGATIVE, NEUTRAL


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (hidden 32) saved as a Hugging Face folder with a WordPiece tokenizer for the words above."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
    transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                     # No dropout in the body: tests that compare runs control randomness
                                     # through LoRA's dropout instead.
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory):
    """600 generated snippets labelled "pos" or "neg" by which kind of adjective they hold; lengths 3..12 words."""
    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(600):
            label = "pos" if i % 2 else "neg"
            words = rng.choices(NEUTRAL, k=rng.randint(2, 10)) + rng.choices(POSITIVE if label == "pos" else NEGATIVE,
                                                                              k=rng.randint(1, 2))
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_bert):
    """A 2-layer Llama (hidden 64, GQA 4/2 heads of 16) with the same word-level tokenizer ([SEP] ends documents)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def story_txt(tmp_path_factory):
    """Paragraphs (documents, split at blank lines) of a repetitive grammar a tiny LM learns fast."""
    path = tmp_path_factory.mktemp("text") / "story.txt"
    rng = random.Random(1)
    paragraphs = []
    for _ in range(120):
        sentences = [f"the {rng.choice(NEUTRAL[2:6])} was {rng.choice(POSITIVE + NEGATIVE)}"
                     for _ in range(rng.randint(1, 4))]
        paragraphs.append(" and ".join(sentences))
    path.write_text("\n\n".join(paragraphs))
    return path
