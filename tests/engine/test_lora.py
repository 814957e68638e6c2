"""ember's LoRA layers against PEFT on small random Llama and BERT models.

PEFT is the reference twice over: its layers for the numbers (the tolerance rule
against PEFT run in float64, stock PEFT in the test dtype), and its files and
loaders for the format (ember's adapter loads in PEFT and PEFT's in ember).
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

from ember.engine.lora import LoRAConfig, LoRALinear, apply_lora, lora_report
from ember.engine.peft_format import from_peft, load_adapter, save_adapter
from ember.kernels.nf4 import quantize_nf4

_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
FAMILIES = {
    "llama": dict(
        build=lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SIZES, num_key_value_heads=2)),
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
    "bert": dict(
        build=lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            **_SIZES, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)),
        targets=("query", "key", "value", "dense"),
    ),
}


def _base_model(family: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights for every copy
    return FAMILIES[family]["build"]().to(dtype).eval()


def _randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
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


def _peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _ember_layers(model) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _copy_adapters(peft_model, model) -> None:
    ember = _ember_layers(model)
    peft_layers = _peft_layers(peft_model)
    assert sorted(ember) == sorted(peft_layers)
    with torch.no_grad():  # copy_ keeps ember's fp32 adapters fp32
        for name, layer in peft_layers.items():
            ember[name].lora_A.copy_(layer.lora_A["default"].weight)
            ember[name].lora_B.copy_(layer.lora_B["default"].weight)


def _inputs(model, dtype, batch=2, seq=7):
    """Input embeddings (B, S, hidden) of random tokens, in ``dtype``."""
    embedding = model.get_input_embeddings()
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return embedding(ids.to(embedding.weight.device)).to(dtype)


def _run(model, embeds):
    """logits and d(sum(logits * w))/d(embeds) for a fixed random w."""
    embeds = embeds.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(logits.device)
    (logits.double() * w).sum().backward()
    return logits.detach(), embeds.grad


def _three_models(family, dtype, config, device="cpu"):
    """ember, stock PEFT in ``dtype`` and PEFT in float64, with the same random adapters.

    Stock PEFT runs wholly in ``dtype``, adapters included (PEFT would keep them
    in fp32 over a bf16 base and run the low-rank path in fp32): that is stock
    PyTorch computing the same thing in the same dtype, as the tolerance rule
    asks. ember keeps fp32 adapters holding the same (bf16-exact) values.
    """
    model = _base_model(family, dtype).to(device)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config.to_peft(), autocast_adapter_dtype=False)
    _randomize_adapters(peft_model)
    reference = copy.deepcopy(peft_model).double()
    apply_lora(model, config)
    _copy_adapters(peft_model, model)
    return model, peft_model, reference


# ----------------------------------------------------------------------------
# Numbers: ember == PEFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_and_gradients_match_peft(family, dtype, device, assert_within_tolerance):
    """On every backend (the ``device`` fixture): the interpreter, the PyTorch path, CUDA."""
    config = LoRAConfig(r=8, alpha=16, target_modules=FAMILIES[family]["targets"])
    model, stock, reference = _three_models(family, dtype, config, device)
    embeds = _inputs(model, dtype)

    ours, ours_dx = _run(model, embeds)
    theirs, theirs_dx = _run(stock, embeds)
    ref, ref_dx = _run(reference, embeds.double())
    assert ours.dtype == dtype
    assert_within_tolerance("logits", ours, ref, theirs, dtype)
    assert_within_tolerance("d inputs_embeds", ours_dx, ref_dx, theirs_dx, dtype)

    # The adapter gradients as one tensor, the model's gradient: per layer, a bf16
    # error that entered upstream can be a few times stock's in a layer whose
    # gradient is tiny next to the others (errors of two rounding orders, not of
    # the kernel, which the kernel tests bound per call). In fp32, per layer too.
    ember, stock_layers, ref_layers = _ember_layers(model), _peft_layers(stock), _peft_layers(reference)
    grads = {"ours": [], "stock": [], "ref": []}
    for name, layer in ember.items():
        for which in ("A", "B"):
            grad = getattr(layer, f"lora_{which}").grad
            assert grad.dtype == torch.float32  # fp32 adapters over a bf16 base, as PEFT keeps them
            stock_grad = getattr(stock_layers[name], f"lora_{which}")["default"].weight.grad
            ref_grad = getattr(ref_layers[name], f"lora_{which}")["default"].weight.grad
            if dtype == torch.float32:
                assert_within_tolerance(f"{name}.lora_{which}.grad", grad, ref_grad, stock_grad, dtype)
            for key, value in zip(grads, (grad, stock_grad, ref_grad)):
                grads[key].append(value.flatten())
    ours, theirs, ref = (torch.cat(grads[key]) for key in grads)
    assert_within_tolerance("adapter gradients", ours, ref, theirs, dtype)
    # nothing but the adapters trains, as in PEFT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{which}" for name in ember for which in "AB"}
    assert len(trainable) == sum(p.requires_grad for p in stock.parameters())


def test_rslora_all_linear_and_a_model_without_transformers(assert_within_tolerance):
    """rsLoRA's alpha / sqrt(r), "all-linear" (not the LM head), and a plain nn.Module."""
    config = LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear")
    model, stock, reference = _three_models("llama", torch.float32, config)
    layers = _ember_layers(model)
    assert "lm_head" not in layers and len(layers) == 2 * 7
    assert all(layer.scaling == 4.0 == stock_layer.scaling["default"]
               for layer, stock_layer in zip(layers.values(), _peft_layers(stock).values()))
    embeds = _inputs(model, torch.float32)
    assert_within_tolerance("logits", _run(model, embeds)[0], _run(reference, embeds.double())[0],
                            _run(stock, embeds)[0], torch.float32)

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    stock = peft.get_peft_model(copy.deepcopy(plain), LoRAConfig(r=2, target_modules=("0", "2")).to_peft())
    _randomize_adapters(stock)
    apply_lora(plain, LoRAConfig(r=2, target_modules=("0", "2")))
    _copy_adapters(stock, plain)
    x = torch.randn(5, 16)
    torch.testing.assert_close(plain(x), stock(x), rtol=1e-5, atol=1e-6)


def test_dropout_only_on_the_low_rank_input_and_unbiased():
    """Compared by statistics (the fixed-mask comparison is the kernel tests' job)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.randn(24, 16) * 0.2, torch.randn(24) * 0.1, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(24, 4))
    x = torch.randn(1, 16).expand(4096, 16)  # one row, 4096 independent masks
    expected = layer.eval()(x[:1])
    samples = layer.train()(x)
    assert not torch.equal(samples[0], samples[1])  # a fresh mask per row
    assert not torch.equal(layer(x[:8]), layer(x[:8]))  # and per call
    # E[dropout(x)] = x: the mean over masks approaches the no-dropout output
    spread = samples.std(0) / 4096 ** 0.5
    assert ((samples.mean(0) - expected[0]).abs() <= 5 * spread + 1e-5).all()
    # with B = 0 the output is the base's: dropout never touches the base path
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x[:8]), layer.eval()(x[:8]))


# ----------------------------------------------------------------------------
# NF4 bases (QLoRA)
# ----------------------------------------------------------------------------


def test_nf4_base_equals_peft_over_the_dequantized_weight(assert_within_tolerance):
    config = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), quantize_base="nf4")
    model = _base_model("llama")
    stock = peft.get_peft_model(copy.deepcopy(model), config.to_peft())
    _randomize_adapters(stock)
    apply_lora(model, config)
    _copy_adapters(stock, model)
    layers = _ember_layers(model)
    with torch.no_grad():  # PEFT's base becomes exactly what ember's NF4 base dequantizes to
        for name, layer in _peft_layers(stock).items():
            assert layers[name].quantized and layers[name].base_weight.double_quantized
            layer.get_base_layer().weight.copy_(layers[name].base_weight.dequantize())
    reference = copy.deepcopy(stock).double()
    embeds = _inputs(model, torch.float32)
    (ours, ours_dx), (theirs, theirs_dx) = _run(model, embeds), _run(stock, embeds)
    ref, ref_dx = _run(reference, embeds.double())
    assert_within_tolerance("logits", ours, ref, theirs, torch.float32)
    assert_within_tolerance("d inputs_embeds", ours_dx, ref_dx, theirs_dx, torch.float32)
    ref_layers, stock_layers = _peft_layers(reference), _peft_layers(stock)
    for name, layer in layers.items():
        assert_within_tolerance(f"{name}.lora_A.grad", layer.lora_A.grad,
                                ref_layers[name].lora_A["default"].weight.grad,
                                stock_layers[name].lora_A["default"].weight.grad, torch.float32)


def test_nf4_storage_is_buffers_that_keep_their_dtypes():
    torch.manual_seed(0)
    nf4 = quantize_nf4(torch.randn(32, 64), blocksize=64, double_quant=True)
    layer = LoRALinear(nf4, r=4, alpha=8)
    state = layer.state_dict()
    assert {"weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset", "lora_A"} <= set(state)
    assert state["weight_packed"].data_ptr() == nf4.packed.data_ptr()  # adopted, not copied
    # model.to(bf16) must not round the fp32 scales: it changes the compute dtype instead
    layer.to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.base_weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    # and a state_dict moves between layers
    other = LoRALinear(quantize_nf4(torch.randn(32, 64)), r=4, alpha=8).to(torch.bfloat16)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(other(x), layer(x))


def test_bitsandbytes_linear4bit_is_adopted_without_a_copy():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32)
    quantized = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    quantized.load_state_dict(dense.state_dict())
    quantized = quantized.to("cpu")  # bitsandbytes quantizes on the move to a device
    model = torch.nn.Sequential(quantized)
    apply_lora(model, LoRAConfig(r=4, target_modules=("0",)))
    layer = model[0]
    assert isinstance(layer, LoRALinear) and layer.quantized
    assert layer.weight_packed.data_ptr() == quantized.weight.data_ptr()
    assert layer.bias is quantized.bias
    _randomize_adapters(model)
    x = torch.randn(5, 64)
    dequantized = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    expected = x @ dequantized.t() + quantized.bias + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)

    # and PEFT's LoRA over a Linear4bit, taken over by from_peft, is the same layer
    stock = peft.get_peft_model(torch.nn.Sequential(quantized), peft.LoraConfig(r=4, target_modules=["0"]))
    _randomize_adapters(stock)
    expected = stock(x)
    taken = from_peft(stock)[0]
    assert taken.quantized and taken.weight_packed.data_ptr() == quantized.weight.data_ptr()
    torch.testing.assert_close(taken(x), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# PEFT's files, both ways, and taking over a PEFT model
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_adapter_loads_in_peft(family, tmp_path):
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=FAMILIES[family]["targets"])
    model = apply_lora(_base_model(family), config)
    _randomize_adapters(model)
    save_adapter(model, tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["bias"]) == (4, 8, 0.1, "none")
    assert sorted(saved["target_modules"]) == sorted(config.target_modules)
    name, layer = next(iter(_ember_layers(model).items()))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    torch.testing.assert_close(tensors[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.detach())

    loaded = peft.PeftModel.from_pretrained(_base_model(family), tmp_path).eval()
    embeds = _inputs(model, torch.float32)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, loaded(inputs_embeds=embeds).logits,
                               rtol=1e-4, atol=1e-5)


def test_adapter_trained_with_ember_gives_the_same_logits_in_peft(tmp_path):
    # A few optimizer steps through ember's kernels (dropout on), then PEFT's loader.
    model = apply_lora(_base_model("llama").train(), LoRAConfig(r=4, alpha=8, dropout=0.1))
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
    assert all(layer.lora_B.abs().max() > 0 for layer in _ember_layers(model).values())
    save_adapter(model, tmp_path)

    model.eval()
    loaded = peft.PeftModel.from_pretrained(_base_model("llama"), tmp_path).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_save_adapter_writes_full_names_when_leaf_names_would_match_more(tmp_path):
    """Only layer 1's attention: "q_proj" alone would also select layer 0's in PEFT."""
    model = apply_lora(_base_model("llama"), LoRAConfig(r=2, target_modules=r"model\.layers\.1\.self_attn\.[qv]_proj"))
    _randomize_adapters(model)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    loaded = peft.PeftModel.from_pretrained(_base_model("llama"), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 5))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_adapter_reads_peft_save_pretrained(family, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, use_rslora=True,
                                  target_modules=list(FAMILIES[family]["targets"][:2]))
    stock = peft.get_peft_model(_base_model(family), peft_config)
    _randomize_adapters(stock)
    stock.save_pretrained(tmp_path)

    model = load_adapter(_base_model(family), tmp_path)
    layers = _ember_layers(model)
    assert sorted(layers) == sorted(_peft_layers(stock))
    assert all(layer.r == 4 and layer.scaling == 8.0 and layer.dropout == 0.05 for layer in layers.values())
    embeds = _inputs(model, torch.float32)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, stock.eval()(inputs_embeds=embeds).logits,
                               rtol=1e-4, atol=1e-5)

    quantized = _ember_layers(load_adapter(_base_model(family), tmp_path, quantize_base="nf4"))
    assert all(layer.quantized and torch.equal(layer.lora_B, layers[name].lora_B) for name, layer in quantized.items())


def test_load_adapter_names_missing_and_unexpected_keys(tmp_path):
    stock = peft.get_peft_model(_base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    stock.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors["base_model.model.model.layers.0.mlp.foo.lora_A.weight"] = tensors.pop(key)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \[.*q_proj\.lora_B\.weight.*unexpected keys \[.*mlp\.foo"):
        load_adapter(_base_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        load_adapter(_base_model("llama"), tmp_path / "nowhere")

    dora = tmp_path / "dora"
    peft.get_peft_model(_base_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(dora)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(_base_model("llama"), dora)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_peft_shares_parameters_and_matches(family):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(FAMILIES[family]["targets"]))
    stock = peft.get_peft_model(_base_model(family), config)
    _randomize_adapters(stock)
    twin = copy.deepcopy(stock)
    expected_params = {name: (layer.get_base_layer().weight, layer.lora_A["default"].weight,
                              layer.lora_B["default"].weight) for name, layer in _peft_layers(stock).items()}

    model = from_peft(stock)
    assert not any(type(m).__module__.startswith("peft.") for m in model.modules())
    for name, layer in _ember_layers(model).items():
        weight, lora_a, lora_b = expected_params[name]
        assert layer.weight is weight and layer.lora_A is lora_a and layer.lora_B is lora_b  # no copies

    embeds = _inputs(model, torch.float32)
    ours, ours_dx = _run(model, embeds)
    theirs, theirs_dx = _run(twin, embeds)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_dx, theirs_dx, rtol=1e-4, atol=1e-5)
    twin_layers = _peft_layers(twin)
    for name, layer in _ember_layers(model).items():
        torch.testing.assert_close(layer.lora_B.grad, twin_layers[name].lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Merging, the report, bad input
# ----------------------------------------------------------------------------


def test_merge_and_unmerge():
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    layer = LoRALinear(weight.clone(), torch.randn(24), r=4, alpha=8)
    _randomize_adapters(layer)
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)  # counted once, not twice
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged)

    nf4 = LoRALinear(quantize_nf4(weight), r=4, alpha=8)
    with pytest.raises(ValueError, match="NF4"):
        nf4.merge()


def test_report_counts_and_bytes_per_base_parameter():
    model = apply_lora(_base_model("llama", torch.bfloat16), LoRAConfig(r=8, target_modules=("q_proj", "v_proj")))
    report = lora_report(model)
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 KV heads of 16), 2 layers; r x (in + out) each
    assert report.trainable_params == 2 * 8 * ((64 + 64) + (64 + 32))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.base_params == 2 * (64 * 64 + 32 * 64)
    assert report.bytes_per_base_param == 2.0
    assert str(report).startswith(f"trainable params: {report.trainable_params:,d} || all params: ")

    quantized = apply_lora(_base_model("llama", torch.bfloat16),
                           LoRAConfig(r=8, target_modules=("q_proj", "v_proj"), quantize_base="nf4"))
    nf4 = lora_report(quantized)  # an NF4 weight counts at its logical size, as PEFT counts bnb's
    assert (nf4.total_params, nf4.trainable_params, nf4.base_params) == \
        (report.total_params, report.trainable_params, report.base_params)

    # Per layer: 4 bits per weight, a 1-byte absmax per 64, 4 bytes per 256 blocks, and a
    # 1 KiB code table plus the offset, which only a layer of realistic size amortizes.
    layer = torch.nn.Sequential(torch.nn.Linear(512, 512, dtype=torch.bfloat16))
    apply_lora(layer, LoRAConfig(target_modules=("0",), quantize_base="nf4"))
    expected = 0.5 + 1 / 64 + 4 / (64 * 256) + (1024 + 4) / 512**2
    assert lora_report(layer).bytes_per_base_param == pytest.approx(expected)
    assert f"({expected:.3f} bytes/param)" in str(lora_report(layer))


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 257), ("r", 2.0), ("alpha", 0), ("alpha", float("nan")), ("dropout", 1.0),
    ("dropout", -0.1), ("quantize_base", "int8"), ("target_modules", ()), ("target_modules", ""),
])
def test_config_rejects_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
        LoRAConfig(**{field: value})


def test_bad_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"target_modules: 'q_prj' matches no Linear .*'q_proj'"):
        apply_lora(_base_model("llama"), LoRAConfig(target_modules=("q_proj", "q_prj")))
    with pytest.raises(ValueError, match="^r must be"):
        LoRALinear(torch.randn(8, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(2, 4\)"):
        LoRALinear(torch.randn(8, 4), r=2, alpha=1, lora_A=torch.nn.Parameter(torch.randn(2, 5)))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        LoRALinear(torch.randn(8, 4), torch.randn(4), r=2, alpha=1)
    with pytest.raises(ValueError, match="x must have 4 features"):
        LoRALinear(torch.randn(8, 4), r=2, alpha=1)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="model: has no LoRA layers"):
        save_adapter(torch.nn.Linear(2, 2), "unused")


def test_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = LoRALinear(torch.randn(24, 16), r=4, alpha=8)
    _randomize_adapters(layer)
    x = torch.randn(5, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
