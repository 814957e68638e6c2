"""ember's LoRA layers against PEFT on small random Llama and BERT models.

PEFT's layers are the reference for the numbers: the tolerance rule against PEFT
run in float64, with stock PEFT in the test dtype. PEFT's files and models:
test_peft_format.py.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from ember.engine.lora import LoRAConfig, LoRALinear, apply_lora, lora_report
from ember.engine.peft_format import from_peft, save_adapter
from ember.kernels.nf4 import quantize_nf4

FAMILIES = ("llama", "bert")  # the tiny models of the lora_models fixture (conftest.py)


# ----------------------------------------------------------------------------
# Numbers: ember == PEFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_gradients_match_peft(lora_models, family, dtype, device, assert_within_tolerance):
    """On every backend (the ``device`` fixture): the interpreter, the PyTorch path, CUDA."""
    config = LoRAConfig(r=8, alpha=16, target_modules=lora_models.targets(family))
    model, stock, reference = lora_models.three_models(family, dtype, config, device)
    embeds = lora_models.inputs(model, dtype)

    ours, ours_dx = lora_models.run(model, embeds)
    theirs, theirs_dx = lora_models.run(stock, embeds)
    ref, ref_dx = lora_models.run(reference, embeds.double())
    assert ours.dtype == dtype
    assert_within_tolerance("logits", ours, ref, theirs, dtype)
    assert_within_tolerance("d inputs_embeds", ours_dx, ref_dx, theirs_dx, dtype)

    # The adapter gradients as one tensor, the model's gradient: per layer, a bf16
    # error that entered upstream can be a few times stock's in a layer whose
    # gradient is tiny next to the others (errors of two rounding orders, not of
    # the kernel, which the kernel tests bound per call). In fp32, per layer too.
    ember, stock_layers, ref_layers = lora_models.ember_layers(model), lora_models.peft_layers(stock), lora_models.peft_layers(reference)
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


def test_rslora_all_linear_and_a_model_without_transformers(lora_models, assert_within_tolerance):
    """rsLoRA's alpha / sqrt(r), "all-linear" (not the LM head), and a plain nn.Module."""
    config = LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear")
    model, stock, reference = lora_models.three_models("llama", torch.float32, config)
    layers = lora_models.ember_layers(model)
    assert "lm_head" not in layers and len(layers) == 2 * 7
    assert all(layer.scaling == 4.0 == stock_layer.scaling["default"]
               for layer, stock_layer in zip(layers.values(), lora_models.peft_layers(stock).values()))
    embeds = lora_models.inputs(model, torch.float32)
    assert_within_tolerance("logits", lora_models.run(model, embeds)[0], lora_models.run(reference, embeds.double())[0],
                            lora_models.run(stock, embeds)[0], torch.float32)

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    stock = peft.get_peft_model(copy.deepcopy(plain), LoRAConfig(r=2, target_modules=("0", "2")).to_peft())
    lora_models.randomize_adapters(stock)
    apply_lora(plain, LoRAConfig(r=2, target_modules=("0", "2")))
    lora_models.copy_adapters(stock, plain)
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


def test_nf4_base_equals_peft_over_the_dequantized_weight(lora_models, assert_within_tolerance):
    config = LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), quantize_base="nf4")
    model = lora_models.base_model("llama")
    stock = peft.get_peft_model(copy.deepcopy(model), config.to_peft())
    lora_models.randomize_adapters(stock)
    apply_lora(model, config)
    lora_models.copy_adapters(stock, model)
    layers = lora_models.ember_layers(model)
    with torch.no_grad():  # PEFT's base becomes exactly what ember's NF4 base dequantizes to
        for name, layer in lora_models.peft_layers(stock).items():
            assert layers[name].quantized and layers[name].base_weight.double_quantized
            layer.get_base_layer().weight.copy_(layers[name].base_weight.dequantize())
    reference = copy.deepcopy(stock).double()
    embeds = lora_models.inputs(model, torch.float32)
    (ours, ours_dx), (theirs, theirs_dx) = lora_models.run(model, embeds), lora_models.run(stock, embeds)
    ref, ref_dx = lora_models.run(reference, embeds.double())
    assert_within_tolerance("logits", ours, ref, theirs, torch.float32)
    assert_within_tolerance("d inputs_embeds", ours_dx, ref_dx, theirs_dx, torch.float32)
    ref_layers, stock_layers = lora_models.peft_layers(reference), lora_models.peft_layers(stock)
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


def test_bitsandbytes_linear4bit_is_adopted_without_a_copy(lora_models):
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
    lora_models.randomize_adapters(model)
    x = torch.randn(5, 64)
    dequantized = bnb.functional.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    expected = x @ dequantized.t() + quantized.bias + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)

    # and PEFT's LoRA over a Linear4bit, taken over by from_peft, is the same layer
    stock = peft.get_peft_model(torch.nn.Sequential(quantized), peft.LoraConfig(r=4, target_modules=["0"]))
    lora_models.randomize_adapters(stock)
    expected = stock(x)
    taken = from_peft(stock)[0]
    assert taken.quantized and taken.weight_packed.data_ptr() == quantized.weight.data_ptr()
    torch.testing.assert_close(taken(x), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Merging, the report, bad input
# ----------------------------------------------------------------------------


def test_merge_and_unmerge(lora_models):
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    layer = LoRALinear(weight.clone(), torch.randn(24), r=4, alpha=8)
    lora_models.randomize_adapters(layer)
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


def test_report_counts_and_bytes_per_base_parameter(lora_models):
    model = apply_lora(lora_models.base_model("llama", torch.bfloat16), LoRAConfig(r=8, target_modules=("q_proj", "v_proj")))
    report = lora_report(model)
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 KV heads of 16), 2 layers; r x (in + out) each
    assert report.trainable_params == 2 * 8 * ((64 + 64) + (64 + 32))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.base_params == 2 * (64 * 64 + 32 * 64)
    assert report.bytes_per_base_param == 2.0
    assert str(report).startswith(f"trainable params: {report.trainable_params:,d} || all params: ")

    quantized = apply_lora(lora_models.base_model("llama", torch.bfloat16),
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


def test_bad_input_errors_name_the_argument(lora_models):
    with pytest.raises(ValueError, match=r"target_modules: 'q_prj' matches no Linear .*'q_proj'"):
        apply_lora(lora_models.base_model("llama"), LoRAConfig(target_modules=("q_proj", "q_prj")))
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


def test_autocast_runs_in_the_autocast_dtype(lora_models):
    torch.manual_seed(0)
    layer = LoRALinear(torch.randn(24, 16), r=4, alpha=8)
    lora_models.randomize_adapters(layer)
    x = torch.randn(5, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
