"""Fixtures for engine tests: tiny model folders with their own tokenizer, generated data sets, and the tiny
random models the LoRA and PEFT-format tests share."""

from __future__ import annotations

import copy
import csv
import json
import random

import peft
import pytest
import torch
import transformers

from ember.engine.lora import LoRALinear, apply_lora

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
def tagging_jsonl(tmp_path_factory):
    """400 generated sentences of 3..10 words, each word tagged POS, NEG or O by its kind (JSON lines: tokens, tags)."""
    path = tmp_path_factory.mktemp("data") / "tags.jsonl"
    rng = random.Random(2)
    with open(path, "w") as f:
        for _ in range(400):
            words = rng.choices(POSITIVE + NEGATIVE + NEUTRAL, k=rng.randint(3, 10))
            tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
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


class LoRATestModels:
    """Tiny random Llama and BERT models with LoRA adapters, shared by the LoRA layer and PEFT-format tests."""

    SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    FAMILIES = {
        "llama": dict(
            build=lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LoRATestModels.SIZES,
                                                                                 num_key_value_heads=2)),
            targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        "bert": dict(
            build=lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
                **LoRATestModels.SIZES, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)),
            targets=("query", "key", "value", "dense"),
        ),
    }

    @staticmethod
    def base_model(family: str, dtype=torch.float32) -> torch.nn.Module:
        torch.manual_seed(0)  # the same base weights for every copy
        return LoRATestModels.FAMILIES[family]["build"]().to(dtype).eval()

    @staticmethod
    def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
        """Non-zero B (PEFT initializes it to 0), so that the low-rank path shows in every output."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    weights = (module.lora_A["default"].weight, module.lora_B["default"].weight)
                elif isinstance(module, LoRALinear):
                    weights = (module.lora_A, module.lora_B)
                else:
                    continue
                for weight, std in zip(weights, (0.1, 0.05)):
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)

    @staticmethod
    def peft_layers(peft_model) -> dict[str, torch.nn.Module]:
        base = peft_model.get_base_model()
        return {name: m for name, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}

    @staticmethod
    def ember_layers(model) -> dict[str, LoRALinear]:
        return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}

    @staticmethod
    def copy_adapters(peft_model, model) -> None:
        ember = LoRATestModels.ember_layers(model)
        peft_layers = LoRATestModels.peft_layers(peft_model)
        assert sorted(ember) == sorted(peft_layers)
        with torch.no_grad():  # copy_ keeps ember's fp32 adapters fp32
            for name, layer in peft_layers.items():
                ember[name].lora_A.copy_(layer.lora_A["default"].weight)
                ember[name].lora_B.copy_(layer.lora_B["default"].weight)

    @staticmethod
    def inputs(model, dtype, batch=2, seq=7):
        """Input embeddings (B, S, hidden) of random tokens, in ``dtype``."""
        embedding = model.get_input_embeddings()
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            return embedding(ids.to(embedding.weight.device)).to(dtype)

    @staticmethod
    def run(model, embeds):
        """logits and d(sum(logits * w))/d(embeds) for a fixed random w."""
        embeds = embeds.detach().clone().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(logits.device)
        (logits.double() * w).sum().backward()
        return logits.detach(), embeds.grad

    @staticmethod
    def three_models(family, dtype, config, device="cpu"):
        """ember, stock PEFT in ``dtype`` and PEFT in float64, with the same random adapters.

        Stock PEFT runs wholly in ``dtype``, adapters included (PEFT would keep them
        in fp32 over a bf16 base and run the low-rank path in fp32): that is stock
        PyTorch computing the same thing in the same dtype, as the tolerance rule
        asks. ember keeps fp32 adapters holding the same (bf16-exact) values.
        """
        model = LoRATestModels.base_model(family, dtype).to(device)
        peft_model = peft.get_peft_model(copy.deepcopy(model), config.to_peft(), autocast_adapter_dtype=False)
        LoRATestModels.randomize_adapters(peft_model)
        reference = copy.deepcopy(peft_model).double()
        apply_lora(model, config)
        LoRATestModels.copy_adapters(peft_model, model)
        return model, peft_model, reference

    @staticmethod
    def targets(family: str) -> tuple[str, ...]:
        return LoRATestModels.FAMILIES[family]["targets"]


@pytest.fixture(scope="session")
def lora_models():
    return LoRATestModels
