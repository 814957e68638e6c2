"""The suites compare like with like: every provider computes the same function from the same inputs, and the
analytic models count what they say. In this process, on the PyTorch path, at tiny sizes."""

from __future__ import annotations

import pytest
import torch

from ember.bench.suites import SUITES, _attention_case, _padding_lengths
from ember.kernels.backend import forced_backend

CPU = torch.device("cpu")
ATTENTION = SUITES["attention"]
# torch_compile is left out: compiling takes ~20 s per shape on two cores, and it compiles torch's own function.
CPU_ATTENTION = [p for p in ATTENTION.providers if ATTENTION.unavailable(p, CPU) is None and p != "torch_compile"]


def _setup(suite: str, provider: str, params: dict):
    torch.manual_seed(0)  # every provider draws the same inputs
    with forced_backend("torch"):
        return SUITES[suite].setup(provider, params, CPU)


def _run(suite: str, provider: str, params: dict):
    """The setup and what one timed call returns."""
    setup = _setup(suite, provider, params)
    with forced_backend("torch"):
        return setup, setup.fn()


ATTENTION_CASES = {
    "causal": _attention_case("fwd", 37, heads=4, batch=2, head_dim=32),
    "gqa": _attention_case("fwd", 29, heads=6, kv_heads=2, batch=2, head_dim=16),
    "padded": _attention_case("fwd", 40, heads=3, batch=4, head_dim=16, causal=False, padded=True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_providers_agree_forward_and_backward(case):
    assert {"ember", "torch", "sdpa_flash", "sdpa_math"} <= set(CPU_ATTENTION)
    params = ATTENTION_CASES[case]
    results = {}
    for provider in CPU_ATTENTION:
        _, out = _run("attention", provider, params)
        setup, _ = _run("attention", provider, dict(params, **{"pass": "bwd"}))  # the forward is in the setup
        setup.fn()
        results[provider] = [out.detach()] + [t.grad for t in setup.inputs]
    if params["padded"]:  # padded keys are left out: a query's output is that of its real keys alone
        lengths, (q, k, v) = _padding_lengths(params["batch"], params["seq"]), setup.inputs
        row = int(lengths.argmin())
        length = int(lengths[row])
        assert length < params["seq"]
        alone = torch.nn.functional.scaled_dot_product_attention(q[row], k[row, :, :length], v[row, :, :length])
        torch.testing.assert_close(results["torch"][0][row], alone.detach(), rtol=1e-5, atol=1e-5)
        assert all(torch.all(grad[row, :, length:] == 0) for grad in results["torch"][2:])  # dk, dv
    for provider, tensors in results.items():
        for name, ours, reference in zip(("out", "dq", "dk", "dv"), tensors, results["torch"]):
            assert ours is not None, (provider, name)
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5, msg=f"{provider} {name}")


def test_attention_passes_time_what_they_say():
    params = _attention_case("fwd", 33, heads=2, batch=1, head_dim=16)
    setup, out = _run("attention", "ember", params)
    assert out.shape == (1, 2, 33, 16) and all(t.grad is None for t in setup.inputs)  # no backward in "fwd"
    setup = _setup("attention", "ember", dict(params, **{"pass": "bwd"}))
    assert all(t.grad is None for t in setup.inputs)  # the setup's forward computes no gradient
    with forced_backend("torch"):
        setup.fn()
        first = [t.grad.clone() for t in setup.inputs]
        setup.fn()  # repeated backwards over the kept graph replace the gradients, never add to them
    assert all(torch.equal(a, t.grad) for a, t in zip(first, setup.inputs))
    setup, _ = _run("attention", "ember", dict(params, **{"pass": "fwd_bwd"}))
    assert all(torch.equal(a, t.grad) for a, t in zip(first, setup.inputs))


def test_attention_flops_model():
    """4*B*H*S^2*D for the forward, 2.5x for the backward, halved when causal; padded rows count real tokens."""
    def flops(**kwargs):
        with forced_backend("torch"):
            return ATTENTION.setup("torch", _attention_case(**kwargs), CPU).flops

    full = 4 * 2 * 3 * 64**2 * 16
    assert flops(pass_="fwd", seq=64, heads=3, batch=2, head_dim=16, causal=False) == full
    assert flops(pass_="fwd", seq=64, heads=3, batch=2, head_dim=16) == full / 2
    assert flops(pass_="bwd", seq=64, heads=3, batch=2, head_dim=16, causal=False) == 2.5 * full
    assert flops(pass_="fwd_bwd", seq=64, heads=3, batch=2, head_dim=16, causal=False) == 3.5 * full
    lengths = _padding_lengths(5, 64)
    assert lengths[0] == 64 and lengths.min() >= 16 and len(set(lengths.tolist())) > 1
    assert flops(pass_="fwd", seq=64, heads=3, batch=5, head_dim=16, causal=False, padded=True) == \
        4 * 3 * 16 * float((lengths.double() ** 2).sum())


def test_attention_sizes_cover_the_issue():
    gpu = ATTENTION.sizes(False, torch.device("cuda"))
    assert {p["pass"] for p in gpu} == {"fwd", "bwd", "fwd_bwd"}
    assert {p["head_dim"] for p in gpu} == {64, 128} and {p["causal"] for p in gpu} == {True, False}
    assert sorted({p["seq"] for p in gpu if not p["padded"]}) == [512, 1024, 2048, 4096, 8192, 16384]
    assert any(p["kv_heads"] < p["heads"] for p in gpu) and any(p["padded"] for p in gpu)
    cpu = ATTENTION.sizes(True, CPU)
    assert [p["seq"] for p in cpu if p["heads"] == p["kv_heads"] and not p["padded"]] == [512, 1024, 2048, 4096]


def test_cross_entropy_providers_agree():
    params = dict(tokens=45, hidden=32, vocab=301)
    results = {}
    for provider in ("ember", "torch"):
        setup, _ = _run("cross_entropy", provider, params)
        results[provider] = [t.grad for t in setup.inputs]
    for ours, reference in zip(results["ember"], results["torch"]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_lora_providers_agree_without_dropout(base):
    """The same base and adapters in every provider: with dropout off, the same output and gradients."""
    params = dict(tokens=24, in_features=128, out_features=40, rank=4, base=base, dropout=0.0)
    providers = ["ember", "peft"] + (["torch"] if base == "dense" else [])  # torch has no NF4 base
    results = {}
    for provider in providers:
        setup, _ = _run("lora", provider, params)
        results[provider] = [t.grad for t in setup.inputs]
    for provider in providers[1:]:
        for name, ours, reference in zip(("dx", "dA", "dB"), results["ember"], results[provider]):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5, msg=f"{provider} {name}")


def test_stock_qlora_is_peft_over_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    import peft
    import transformers

    from ember.bench.suites import _LLAMA_SHAPES, _stock_train_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_SHAPES["llama-tiny"]))
    model = _stock_train_model(model, "qlora", CPU, torch.float32)
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in lora_layers)
    assert all(m.get_base_layer().weight.quant_state.nested for m in lora_layers)  # double quantization
    trainable = {name for name, q in model.named_parameters() if q.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_train_step_providers_train_the_same_parameters(mode):
    trainable = {}
    for provider in ("ember", "torch"):
        setup, _ = _run("train_step", provider, dict(model="llama-tiny", mode=mode, tokens=16))
        trainable[provider] = setup.extra["trainable_params"]
    assert trainable["ember"] == trainable["torch"] > 0


def test_held_activations_counts_what_the_backward_keeps():
    """One storage counted once, under the module that saved it; parameters left out, a weight's cast copy in."""
    from ember.bench.memory import HeldActivations

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8, requires_grad=True)
    with HeldActivations(model) as held:
        model(x).sum()
    # Linear 0 keeps x (5x8), tanh its output (5x16), which Linear 2 keeps too: the same storage, counted once
    assert held.total_bytes == 4 * (5 * 8 + 5 * 16)
    assert held.inside("0") == {"(itself)": 4 * 5 * 8} and held.inside("1") == {"(itself)": 4 * 5 * 16}
    assert held.per_layer(["0", "1"]) == 4 * (5 * 8 + 5 * 16) / 2
    with HeldActivations(model) as held, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    # bf16 copies of the input and of both weights (frozen or not, autocast keeps a cast for the backward)
    assert held.inside("2")["(itself)"] >= 2 * 4 * 16


def test_layer_suite_measures_held_bytes_for_both_providers():
    """A tiny Llama and BERT through the layer suite's setups: ember holds less per token and layer than stock
    transformers + PEFT, and the timed call runs forward and backward."""
    from ember.bench import suites

    shapes = {"llama-test": dict(family="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=500),
              "bert-test": dict(family="bert", hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                num_attention_heads=4, vocab_size=500)}
    suites._LAYER_MODELS.update(shapes)
    try:
        for model, scope in (("llama-test", "model"), ("bert-test", "layer")):  # each scope once: ~5 s a setup
            held = {}
            for provider in ("ember", "torch"):
                setup, _ = _run("layer", provider, dict(model=model, scope=scope, tokens=64))
                held[provider] = setup.extra["held_bytes_per_token_per_layer"]
                assert setup.flops > 0
            assert held["ember"] < 0.75 * held["torch"], (model, held)
    finally:
        for model in shapes:
            del suites._LAYER_MODELS[model]
    assert [case["model"] for case in SUITES["layer"].sizes(True, CPU)] == ["llama"] * 2 + ["bert-base"] * 2
