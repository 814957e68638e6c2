"""PEFT's adapter files both ways, and PEFT models taken over, on small random Llama and BERT models.

ember's adapter loads in PEFT (``PeftModel.from_pretrained``) and gives PEFT's
logits; PEFT's ``save_pretrained`` loads in ember; ``from_peft`` shares the
very tensors of a PEFT model's layers. A trained classification head goes
into the adapter as PEFT's ``modules_to_save``, so PEFT alone (and its
``AutoPeftModelFor...`` classes) loads it; an NF4 base is recorded.
"""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ember.engine.lora import LoRAConfig, LoRALinear, apply_lora
from ember.engine.peft_format import from_peft, load_adapter, save_adapter
from ember.kernels.backend import forced_backend

FAMILIES = ("llama", "bert")  # the tiny models of the lora_models fixture (conftest.py)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_adapter_loads_in_peft(lora_models, family, tmp_path):
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=lora_models.targets(family))
    model = apply_lora(lora_models.base_model(family), config)
    lora_models.randomize_adapters(model)
    save_adapter(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["bias"]) == (4, 8, 0.1, "none")
    assert sorted(saved["target_modules"]) == sorted(config.target_modules)
    name, layer = next(iter(lora_models.ember_layers(model).items()))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.detach())

    loaded = peft.PeftModel.from_pretrained(lora_models.base_model(family), tmp_path).eval()
    embeds = lora_models.inputs(model, torch.float32)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, loaded(inputs_embeds=embeds).logits,
                               rtol=1e-4, atol=1e-5)


def test_adapter_trained_with_ember_gives_the_same_logits_in_peft(lora_models, tmp_path):
    # A few optimizer steps through ember's kernels (dropout on), then PEFT's loader.
    model = apply_lora(lora_models.base_model("llama").train(), LoRAConfig(r=4, alpha=8, dropout=0.1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(layer.lora_B.abs().max() > 0 for layer in lora_models.ember_layers(model).values())
    save_adapter(model, tmp_path)

    model.eval()
    loaded = peft.PeftModel.from_pretrained(lora_models.base_model("llama"), tmp_path).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_save_adapter_writes_full_names_when_leaf_names_would_match_more(lora_models, tmp_path):
    """Only layer 1's attention: "q_proj" alone would also select layer 0's in PEFT."""
    model = apply_lora(lora_models.base_model("llama"), LoRAConfig(r=2, target_modules=r"model\.layers\.1\.self_attn\.[qv]_proj"))
    lora_models.randomize_adapters(model)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    loaded = peft.PeftModel.from_pretrained(lora_models.base_model("llama"), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 5))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_reads_peft_save_pretrained(lora_models, family, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, use_rslora=True,
                                  target_modules=list(lora_models.targets(family)[:2]))
    stock = peft.get_peft_model(lora_models.base_model(family), peft_config)
    lora_models.randomize_adapters(stock)
    stock.save_pretrained(tmp_path)

    model = load_adapter(lora_models.base_model(family), tmp_path)
    layers = lora_models.ember_layers(model)
    assert sorted(layers) == sorted(lora_models.peft_layers(stock))
    assert all(layer.r == 4 and layer.scaling == 8.0 and layer.dropout == 0.05 for layer in layers.values())
    embeds = lora_models.inputs(model, torch.float32)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, stock.eval()(inputs_embeds=embeds).logits,
                               rtol=1e-4, atol=1e-5)

    quantized = lora_models.ember_layers(load_adapter(lora_models.base_model(family), tmp_path, quantize_base="nf4"))
    assert all(layer.quantized and torch.equal(layer.lora_B, layers[name].lora_B) for name, layer in quantized.items())


def test_load_adapter_names_missing_and_unexpected_keys(lora_models, tmp_path):
    stock = peft.get_peft_model(lora_models.base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    stock.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors["base_model.model.model.layers.0.mlp.foo.lora_A.weight"] = tensors.pop(key)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \[.*q_proj\.lora_B\.weight.*unexpected keys \[.*mlp\.foo"):
        load_adapter(lora_models.base_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        load_adapter(lora_models.base_model("llama"), tmp_path / "nowhere")

    dora = tmp_path / "dora"
    peft.get_peft_model(lora_models.base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(dora)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(lora_models.base_model("llama"), dora)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_peft_shares_parameters_and_matches(lora_models, family):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora_models.targets(family)))
    stock = peft.get_peft_model(lora_models.base_model(family), config)
    lora_models.randomize_adapters(stock)
    twin = copy.deepcopy(stock)
    expected_params = {name: (layer.get_base_layer().weight, layer.lora_A["default"].weight,
                              layer.lora_B["default"].weight) for name, layer in lora_models.peft_layers(stock).items()}

    model = from_peft(stock)
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    for name, layer in lora_models.ember_layers(model).items():
        weight, lora_a, lora_b = expected_params[name]
        assert layer.weight is weight and layer.lora_A is lora_a and layer.lora_B is lora_b  # no copies

    embeds = lora_models.inputs(model, torch.float32)
    ours, ours_dx = lora_models.run(model, embeds)
    theirs, theirs_dx = lora_models.run(twin, embeds)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_dx, theirs_dx, rtol=1e-4, atol=1e-5)
    twin_layers = lora_models.peft_layers(twin)
    for name, layer in lora_models.ember_layers(model).items():
        torch.testing.assert_close(layer.lora_B.grad, twin_layers[name].lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Complete artifacts: a trained head as PEFT's modules_to_save, the task type, an NF4 base's record
# ----------------------------------------------------------------------------

@pytest.fixture
def torch_kernels():
    """The file format is under test below, not the kernels (tests/kernels proves them): the PyTorch path is fast."""
    with forced_backend("torch"):
        yield


HEADS = {  # task type -> the transformers class of a BERT with a fresh head; and PEFT's auto class for it
    "SEQ_CLS": (transformers.BertForSequenceClassification, peft.AutoPeftModelForSequenceClassification),
    "TOKEN_CLS": (transformers.BertForTokenClassification, peft.AutoPeftModelForTokenClassification),
}


def _head_model(lora_models, task_type, folder, quantize_base=None):
    """A tiny 3-label BERT saved to ``folder`` and reloaded from it (so its name_or_path is that folder), with
    random adapters and a head changed as training would (PEFT's loader must take it from the adapter)."""
    model_class, _ = HEADS[task_type]
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.BertConfig(**lora_models.SIZES, max_position_embeddings=32, num_labels=3,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model_class(config).save_pretrained(folder)
    lora = LoRAConfig(r=4, alpha=8, target_modules=lora_models.targets("bert"), quantize_base=quantize_base)
    model = apply_lora(model_class.from_pretrained(folder).eval(), lora)
    lora_models.randomize_adapters(model)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    return model


@pytest.mark.usefixtures("torch_kernels")
@pytest.mark.parametrize("task_type", sorted(HEADS))
def test_a_trained_head_is_saved_as_peft_modules_to_save(lora_models, task_type, tmp_path):
    """PeftModel.from_pretrained and the AutoPeftModelFor... class alone give ember's logits, trained head and all."""
    base_folder, adapter = tmp_path / "base", tmp_path / "adapter"
    model = _head_model(lora_models, task_type, base_folder)
    save_adapter(model, adapter, task_type=task_type, modules_to_save=["classifier"])

    # The keys are the ones PEFT itself writes for the same adapters and head.
    model_class, auto_class = HEADS[task_type]
    stock = peft.get_peft_model(model_class.from_pretrained(base_folder),
                                peft.LoraConfig(r=4, target_modules=list(lora_models.targets("bert")),
                                                task_type=task_type))
    stock.save_pretrained(tmp_path / "stock")
    assert sorted(load_file(adapter / "adapter_model.safetensors")) == \
        sorted(load_file(tmp_path / "stock" / "adapter_model.safetensors"))
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["task_type"], saved["modules_to_save"]) == (task_type, ["classifier"])
    assert saved["base_model_name_or_path"] == str(base_folder.resolve())

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        untrained_head = model_class.from_pretrained(base_folder).eval()(input_ids=ids).logits
        for loaded in (peft.PeftModel.from_pretrained(model_class.from_pretrained(base_folder), adapter),
                       auto_class.from_pretrained(adapter)):
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        reloaded = load_adapter(model_class.from_pretrained(base_folder), adapter).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untrained_head, expected, atol=1e-2)  # the head really is the trained one


@pytest.mark.usefixtures("torch_kernels")
def test_load_adapter_reads_a_peft_classifier_adapter(lora_models, tmp_path):
    """PEFT's SEQ_CLS adapter lists modules_to_save ["classifier", "score"]: BERT has no "score", as PEFT skips it."""
    stock = peft.get_peft_model(lora_models.base_model("bert"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(lora_models.targets("bert")), task_type="SEQ_CLS"))
    lora_models.randomize_adapters(stock)
    with torch.no_grad():
        stock.base_model.model.classifier.modules_to_save["default"].weight.mul_(-3.0)
    stock.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]

    model = load_adapter(lora_models.base_model("bert"), tmp_path)
    embeds = lora_models.inputs(model, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, stock.eval()(inputs_embeds=embeds).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("torch_kernels")
def test_load_adapter_reads_an_older_export_with_its_head_beside_the_adapter(lora_models, tmp_path):
    """ember's exports before modules_to_save: final/adapter without the head, final/head.safetensors beside it."""
    model = _head_model(lora_models, "SEQ_CLS", tmp_path / "base")
    save_adapter(model, tmp_path / "final" / "adapter")
    save_file({f"classifier.{name}": p.detach().contiguous() for name, p in model.classifier.named_parameters()},
              tmp_path / "final" / "head.safetensors")
    reloaded = load_adapter(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base"),
                            tmp_path / "final" / "adapter").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("torch_kernels")
def test_load_adapter_refuses_a_head_for_other_labels(lora_models, tmp_path):
    model = _head_model(lora_models, "SEQ_CLS", tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", task_type="SEQ_CLS", modules_to_save=["classifier"])
    two_labels = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2,
                                                                            ignore_mismatched_sizes=True)
    with pytest.raises(ValueError, match=r"classifier\.weight has shape \(3, 64\).*\(2, 64\).*number of labels"):
        load_adapter(two_labels, tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in two_labels.modules())  # refused before any change


@pytest.mark.usefixtures("torch_kernels")
def test_save_adapter_checks_modules_to_save_and_task_type(lora_models, tmp_path):
    model = _head_model(lora_models, "SEQ_CLS", tmp_path / "base")
    with pytest.raises(ValueError, match="modules_to_save: 'head' is not a module of BertForSequenceClassification"):
        save_adapter(model, tmp_path / "a", modules_to_save=["head"])
    with pytest.raises(ValueError, match="modules_to_save: 'bert.encoder' holds LoRA layers"):
        save_adapter(model, tmp_path / "a", modules_to_save=["bert.encoder"])
    nested = torch.nn.Module()  # "head" would also select "body.head": PEFT matches modules_to_save by suffix
    nested.head, nested.body = torch.nn.Linear(4, 2), torch.nn.Module()
    nested.body.head, nested.body.proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    apply_lora(nested, LoRAConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"PEFT would select \['body.head'\] as well as 'head'"):
        save_adapter(nested, tmp_path / "a", modules_to_save=["head"])
    with pytest.raises(TypeError, match="a list of module names"):
        save_adapter(model, tmp_path / "a", modules_to_save="classifier")
    with pytest.raises(ValueError, match="task_type must be None or one of PEFT's task types"):
        save_adapter(model, tmp_path / "a", task_type="CLASSIFICATION")
    assert not (tmp_path / "a").exists()  # checked before anything is written


@pytest.mark.usefixtures("torch_kernels")
def test_an_nf4_adapter_records_how_its_base_was_quantized(lora_models, tmp_path):
    """base_quantization.json holds BitsAndBytesConfig's arguments; with them bitsandbytes quantizes the base as
    ember did (the same layers, the head left dense), and PEFT over that base gives ember's QLoRA logits."""
    model = _head_model(lora_models, "SEQ_CLS", tmp_path / "base", quantize_base="nf4")
    save_adapter(model, tmp_path / "adapter", task_type="SEQ_CLS", modules_to_save=["classifier"])
    recorded = json.loads((tmp_path / "adapter" / "base_quantization.json").read_text())
    assert recorded == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                        "llm_int8_skip_modules": ["classifier"], "blocksize": 64}

    base = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=transformers.BitsAndBytesConfig(**recorded), device_map="cpu")
    assert sorted(name for name, m in base.named_modules() if type(m).__name__ == "Linear4bit") == \
        sorted(lora_models.ember_layers(model))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    # The run's compute dtype is recorded as given; re-saving a dense model drops the stale record.
    save_adapter(model, tmp_path / "adapter", compute_dtype=torch.bfloat16)
    bnb = transformers.BitsAndBytesConfig(**json.loads((tmp_path / "adapter" / "base_quantization.json").read_text()))
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    save_adapter(_head_model(lora_models, "SEQ_CLS", tmp_path / "base"), tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
