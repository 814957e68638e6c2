"""patch()'s norm, rope and mlp parts (ember.engine.layers): every family's loss and gradients equal stock under
the tolerance rule, with and without gradient checkpointing, LoRA (ember's, PEFT's) included; what is kept for the
backward; models ember does not recognise left as they are. On the PyTorch path (the kernels' own tests prove the
interpreter path; test_patch runs a patched Llama through the interpreter)."""

from __future__ import annotations

import copy
import logging

import peft
import pytest
import torch
import transformers

from ember.engine.layers import patch_layers, unpatch_module
from ember.engine.lora import LoRAConfig, LoRALinear, apply_lora
from ember.engine.patch import patch
from ember.kernels import NF4Weight, dequantize_nf4
from ember.kernels.backend import forced_backend

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),  # q_norm / k_norm over the head dim
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),  # (1 + weight), gelu tanh
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=8,
                                                final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
    # Phi-3: one gate_up projection, one qkv projection, partial rotary (16 of 16 * 0.5 dims rotate)
    "phi3": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5, pad_token_id=0),
}
ENCODERS = {
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=64, num_labels=3,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": lambda: transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=64, num_labels=3, pad_token_id=1,
                                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
# What patch() swaps in each family: norms per layer (+1 final), and whether rope and the MLP are recognised.
NORMS_PER_LAYER = {"qwen3": 4, "gemma2": 4}


def _model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family in ENCODERS:
        return transformers.AutoModelForSequenceClassification.from_config(ENCODERS[family]()).to(dtype).train()
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).to(dtype).train()


def _loss_and_grads(model, batch, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable()
    with forced_backend("torch"):
        loss = model(**batch).loss
        loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _batch(family="llama"):
    input_ids = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    if family in ENCODERS:
        mask = torch.ones_like(input_ids)
        mask[1, 13:] = 0  # a padded row
        return dict(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([2, 0]))
    labels = input_ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=input_ids, labels=labels)


def _assert_all_within(ours, reference, stock, dtype, assert_within_tolerance):
    assert_within_tolerance("loss", ours[0].reshape(1), reference[0].reshape(1), stock[0].reshape(1), dtype)
    assert reference[1] and set(ours[1]) == set(reference[1])
    scale = max(g.abs().max().item() for g in reference[1].values())
    for name, grad in reference[1].items():
        assert ours[1][name] is not None, name
        assert_within_tolerance(name, ours[1][name], grad, stock[1][name], dtype, scale=scale)


def _patched_parts(model) -> dict[str, int]:
    names = [type(m).__name__ for m in model.modules()]
    return {"norm": sum(n.startswith("Ember") and n.endswith("Norm") for n in names),
            "mlp": sum(n.startswith("Ember") and n.endswith("MLP") for n in names)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_family_matches_stock_full_finetuning(family, checkpointing, assert_within_tolerance):
    """Every weight trains (the norms' weights and the MLP's dense projections included): fp32 against float64."""
    model = _model(family)
    reference = _loss_and_grads(copy.deepcopy(model).double(), _batch(), checkpointing)
    stock = _loss_and_grads(copy.deepcopy(model), _batch(), checkpointing)
    patched = patch(copy.deepcopy(model), attention=False, loss=False)
    layers = COMMON["num_hidden_layers"]
    assert _patched_parts(patched) == {"norm": NORMS_PER_LAYER.get(family, 2) * layers + 1, "mlp": layers}
    ours = _loss_and_grads(patched, _batch(), checkpointing)
    _assert_all_within(ours, reference, stock, torch.float32, assert_within_tolerance)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_matches_stock_full_finetuning(family, checkpointing, assert_within_tolerance):
    """BERT and RoBERTa: every LayerNorm (embeddings' included) and the recomputing MLP, a padded batch."""
    model = _model(family)
    batch = _batch(family)
    reference = _loss_and_grads(copy.deepcopy(model).double(), batch, checkpointing)
    stock = _loss_and_grads(copy.deepcopy(model), batch, checkpointing)
    patched = patch(copy.deepcopy(model), attention=False, loss=False)
    names = [type(m).__name__ for m in patched.modules()]
    layer = "EmberBertLayer" if family == "bert" else "EmberRobertaLayer"
    assert names.count("EmberLayerNorm") == 5 and names.count(layer) == 2
    ours = _loss_and_grads(patched, batch, checkpointing)
    _assert_all_within(ours, reference, stock, torch.float32, assert_within_tolerance)


def test_whole_patch_with_ember_lora_matches_peft(lora_models, assert_within_tolerance):
    """apply_lora on every linear, then patch (attention, loss, norm, rope, mlp): logits and the gradients of the
    adapters and inputs against PEFT in float64 (the gated MLP runs LoRA's halves itself)."""
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    ours, stock, reference = lora_models.three_models("llama", torch.float32, config)
    lora_models.randomize_adapters(ours)
    lora_models.randomize_adapters(stock)
    lora_models.randomize_adapters(reference)
    patch(ours)
    assert _patched_parts(ours)["mlp"] == 2
    embeds = lora_models.inputs(ours, torch.float32)
    with forced_backend("torch"):
        results = {name: lora_models.run(m, embeds) for name, m in
                   (("ours", ours), ("stock", stock), ("reference", reference))}
    for i, what in enumerate(("logits", "d embeds")):
        assert_within_tolerance(what, results["ours"][i], results["reference"][i], results["stock"][i],
                                torch.float32)
    ours_layers, peft_layers = lora_models.ember_layers(ours), lora_models.peft_layers(reference)
    stock_layers = lora_models.peft_layers(stock)
    for name, layer in ours_layers.items():
        for mine, theirs in ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")):
            assert_within_tolerance(f"{name}.{theirs}", mine.grad, getattr(peft_layers[name], theirs)["default"]
                                    .weight.grad, getattr(stock_layers[name], theirs)["default"].weight.grad,
                                    torch.float32)


def _adapter_grads(model, lora_models) -> dict[str, torch.Tensor]:
    """{layer.lora_A / layer.lora_B: gradient} of ember's or PEFT's LoRA layers, named alike."""
    if isinstance(model, peft.PeftModel):
        layers = {name: (m.lora_A["default"].weight, m.lora_B["default"].weight)
                  for name, m in lora_models.peft_layers(model).items()}
    else:
        layers = {name: (m.lora_A, m.lora_B) for name, m in lora_models.ember_layers(model).items()}
    return {f"{name}.{which}": w.grad for name, pair in layers.items() for which, w in zip(("lora_A", "lora_B"), pair)}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", ["phi3", "bert"])
def test_bf16_autocast_with_lora_matches_stock(family, checkpointing, lora_models, assert_within_tolerance):
    """fp32 weights under bf16 autocast (ember's "bf16" policy), LoRA on every linear of Phi-3 (one gate_up and
    one qkv projection, partial rotary) and of BERT: the loss and every adapter's gradient against PEFT in
    float64 and PEFT under the same autocast."""
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    model = _model(family)
    stock = peft.get_peft_model(copy.deepcopy(model), config.to_peft(), autocast_adapter_dtype=False)
    lora_models.randomize_adapters(stock)
    reference = copy.deepcopy(stock).double()
    ours = apply_lora(model, config)
    lora_models.copy_adapters(stock, ours)
    patch(ours, attention=False, loss=False)

    def run(m, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = _loss_and_grads(m, _batch(family), checkpointing)
        return loss, _adapter_grads(m, lora_models)

    results = [run(ours, True), run(reference, False), run(stock, True)]
    _assert_all_within(*results, torch.bfloat16, assert_within_tolerance)


def test_gated_mlp_keeps_gate_and_up_not_the_product():
    """Under autocast, what the MLP keeps for its backward: x once (bf16), gate and up, the adapters' (M, r) x A^T.
    No (M, I) product and no 16-bit copy of a base weight."""
    model = apply_lora(_model("llama"), LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    patch(model, attention=False, loss=False)
    mlp = model.model.layers[0].mlp
    tokens, hidden, inter = 37, COMMON["hidden_size"], COMMON["intermediate_size"]
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with forced_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    kept = sorted(shape for ptr, (shape, dtype) in saved.items() if ptr not in params)
    assert kept == sorted([(tokens, hidden), (tokens, inter), (tokens, inter), (tokens, 4), (tokens, 4), (tokens, 4)])
    y.sum().backward()
    assert x.grad is not None and mlp.down_proj.lora_A.grad is not None


def test_peft_wrapped_mlp_runs_unfused_and_says_so(caplog, assert_within_tolerance):
    """PEFT's LoRA layers are not the gated Function's: the MLP keeps the stock composition (with the fused
    activation) and the log line names the projections' type; results equal PEFT's own."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    stock = peft.get_peft_model(_model("llama"), config)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(stock).double()
    with caplog.at_level(logging.INFO, logger="ember.patch"):
        ours = patch(copy.deepcopy(stock), attention=False, loss=False)
    assert "peft.tuners.lora.layer.Linear" in caplog.text and "run unfused" in caplog.text
    results = [_loss_and_grads(m, _batch()) for m in (ours, reference, stock)]
    _assert_all_within(*results, torch.float32, assert_within_tolerance)


def _patch_log(caplog):
    """ember's own log lines: caplog also holds whatever transformers logs (config warnings, which
    depend on its version and on whether an earlier test turned its propagation on)."""
    return [record.getMessage() for record in caplog.records if record.name == "ember.patch"]


def test_unknown_model_is_left_as_it_is(caplog):
    """GPT-2 (its own attention, Conv1D MLP, nn.LayerNorm) and a user's look-alike RMSNorm: nothing is swapped."""
    class LlamaRMSNorm(torch.nn.Module):  # a user's module of the same name, not transformers'
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    model.extra = LlamaRMSNorm()
    classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="ember.patch"):
        patch(model, attention=False, loss=False)
    assert [type(m) for m in model.modules()] == classes
    assert _patch_log(caplog) == ["patch: GPT2LMHeadModel: norm: none recognised; rope: none recognised; "
                               "mlp: none recognised"]


def test_log_line_and_unpatch(caplog):
    model = _model("llama")
    stock_classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="ember.patch"):
        patch(model)
    assert _patch_log(caplog) == ["patch: LlamaForCausalLM: attention: ember; loss: causal-lm; norm: 5 modules; "
                               "rope: 2 attention modules; mlp: 2 modules; input cast: once per 2 attention modules"]
    assert isinstance(model.model.layers[0].mlp, transformers.models.llama.modeling_llama.LlamaMLP)
    patch(model)  # twice: nothing more
    assert _patched_parts(model) == {"norm": 5, "mlp": 2}
    unpatch_module(model)
    assert [type(m) for m in model.modules()] == stock_classes


def test_rotary_dispatch_leaves_unpatched_models_stock():
    """transformers' apply_rotary_pos_emb runs ember's kernel only inside a patched attention module."""
    from transformers.models.llama import modeling_llama

    from ember.engine.layers import rotary_enabled

    patch(_model("llama"), attention=False, loss=False)
    q, k = torch.randn(1, 4, 5, 16, requires_grad=True), torch.randn(1, 2, 5, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    stock, _ = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert stock.grad_fn.name() == "AddBackward0"
    with rotary_enabled(), forced_backend("torch"):
        ours, _ = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert ours.grad_fn.name() == "RotaryFunctionBackward"
    torch.testing.assert_close(ours, stock)


def _mlp_reference(x, mlp, dtype):
    """down(silu(gate(x)) * up(x)) with every LoRA projection written out densely, in ``dtype``."""
    def project(t, layer):
        base = layer.base_weight
        weight = dequantize_nf4(base) if isinstance(base, NF4Weight) else base
        low = (t @ layer.lora_A.to(dtype).t()) @ layer.lora_B.to(dtype).t()
        return t @ weight.to(dtype).t() + layer.scaling * low

    x = x.to(dtype)
    return project(torch.nn.functional.silu(project(x, mlp.gate_proj)) * project(x, mlp.up_proj), mlp.down_proj)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_gated_mlp_with_lora_on_every_backend(device, base, assert_within_tolerance):
    """The gated Function over three LoRA projections (dense or NF4 bases) on the interpreter, the PyTorch path and
    CUDA: output and the gradients of x and every adapter against float64."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=8)
    holder = torch.nn.Module()
    holder.mlp = transformers.models.llama.modeling_llama.LlamaMLP(config)
    apply_lora(holder, LoRAConfig(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                  quantize_base="nf4" if base == "nf4" else None))
    with torch.no_grad():
        for layer in holder.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.1)
    patch_layers(holder)
    holder.to(device)
    x = torch.randn(2, 17, 32, device=device)
    upstream = torch.randn(2, 17, 32, device=device)
    adapters = [p for p in holder.parameters() if p.requires_grad]

    def run(fn, dtype):
        leaf = x.to(dtype).requires_grad_(True)
        out = fn(leaf)
        grads = torch.autograd.grad(out, [leaf, *adapters], upstream.to(out.dtype))
        return [out, *grads]

    ours = run(holder.mlp, torch.float32)
    reference = run(lambda t: _mlp_reference(t, holder.mlp, torch.float64), torch.float64)
    stock = run(lambda t: _mlp_reference(t, holder.mlp, torch.float32), torch.float32)
    for i, (a, r, s) in enumerate(zip(ours, reference, stock)):
        assert_within_tolerance(f"output/grad {i}", a, r, s, torch.float32)


def test_gated_mlp_lora_dropout_draws_as_the_unfused_layers(device):
    """With LoRA dropout in training, the gated Function draws each projection's mask as LoRALinear would (same
    seeds, same order), so it equals the unfused MLP of ember's LoRA layers exactly."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=8)
    holder = torch.nn.Module()
    holder.mlp = transformers.models.llama.modeling_llama.LlamaMLP(config)
    apply_lora(holder, LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["gate_proj", "up_proj", "down_proj"]))
    holder.train().to(device)
    with torch.no_grad():
        for layer in holder.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 17, 32, device=device)
    adapters = [p for p in holder.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(1)
        leaf = x.clone().requires_grad_(True)
        out = holder.mlp(leaf)
        return [out, *torch.autograd.grad(out.square().sum(), [leaf, *adapters])]

    unfused = run()
    patch_layers(holder)
    fused = run()
    assert type(holder.mlp).__name__ == "EmberLlamaMLP"
    for a, b in zip(fused, unfused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [*CONFIGS, *ENCODERS])
def test_family_matches_stock_in_bf16_through_the_kernels(family, assert_within_tolerance):
    """Every family through the layer kernels themselves (the Triton kernels under the interpreter on a CPU, or
    on CUDA), every weight trained under bf16 autocast: loss and gradients against float64 by the tolerance rule,
    stock transformers under the same autocast being the yardstick."""
    model = _model(family)
    batch = _batch(family)

    def run(m, autocast, backend):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), forced_backend(backend):
            loss = m(**batch).loss
            loss.backward()
        return loss, {name: p.grad for name, p in m.named_parameters() if p.requires_grad}

    reference = run(copy.deepcopy(model).double(), False, "torch")
    stock = run(copy.deepcopy(model), True, "torch")
    ours = run(patch(copy.deepcopy(model), attention=False, loss=False), True, "triton")
    _assert_all_within(ours, reference, stock, torch.bfloat16, assert_within_tolerance)
