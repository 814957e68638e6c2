"""PEFT's adapter files both ways, and PEFT models taken over, on small random Llama and BERT models.

ember's adapter loads in PEFT (``PeftModel.from_pretrained``) and gives PEFT's
logits; PEFT's ``save_pretrained`` loads in ember; ``from_peft`` shares the
very tensors of a PEFT model's layers.
"""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.engine.lora import LoRAConfig, apply_lora
from ember.engine.peft_format import from_peft, load_adapter, save_adapter

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
