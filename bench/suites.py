"""Benchmark suites: for each, the sizes to run and ``setup(provider, params, device) -> Setup``.

A setup builds the inputs once and returns the function to time (one call:
forward and backward, or one optimizer step) with its analytic FLOPs and bytes.
A provider whose library is missing raises ``ProviderMissing`` and is reported
as skipped, never faked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F


class ProviderMissing(Exception):
    """The provider's library is not installed (or cannot run on this device)."""


@dataclasses.dataclass
class Setup:
    fn: Callable[[], object]
    flops: float = 0.0  # per call, from the suite's analytic model
    bytes: float = 0.0  # per call, minimum traffic to and from device memory
    extra: dict = dataclasses.field(default_factory=dict)  # suite-specific measurements (state bytes, ...)


def _need(module: str, provider: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ProviderMissing(f"{provider}: {module} is not installed")


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------
# attention: forward + backward, 4*B*H*Sq*Sk*D forward FLOPs, x3.5 with the backward, halved when causal
# ----------------------------------------------------------------------------


def attention_sizes(quick: bool, device: torch.device) -> list[dict]:
    lengths = [512, 1024, 2048, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    sizes = [dict(batch=1, heads=8, kv_heads=8, seq=s, head_dim=64, causal=True) for s in lengths]
    if not quick:
        sizes += [dict(batch=1, heads=32, kv_heads=8, seq=s, head_dim=128, causal=c)
                  for s in lengths for c in (True, False)]
    return sizes


def attention_setup(provider: str, p: dict, device: torch.device) -> Setup:
    from ember.kernels import flash_attention

    dtype = _dtype(device)
    shape_q = (p["batch"], p["heads"], p["seq"], p["head_dim"])
    shape_kv = (p["batch"], p["kv_heads"], p["seq"], p["head_dim"])
    q = torch.randn(shape_q, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(shape_q, device=device, dtype=dtype)
    groups = p["heads"] // p["kv_heads"]

    def expand(t):
        return t.repeat_interleave(groups, dim=1) if groups > 1 else t

    if provider == "ember":
        forward = lambda: flash_attention(q, k, v, causal=p["causal"])  # noqa: E731
    elif provider == "torch":
        def forward():
            scores = (q @ expand(k).transpose(-1, -2)) * p["head_dim"] ** -0.5
            if p["causal"]:
                scores = scores.masked_fill(torch.ones(p["seq"], p["seq"], dtype=torch.bool, device=device)
                                            .triu(1), float("-inf"))
            return scores.softmax(-1) @ expand(v)
    elif provider.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa": None, "sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient":
                   SDPBackend.EFFICIENT_ATTENTION, "sdpa_math": SDPBackend.MATH, "sdpa_cudnn":
                   SDPBackend.CUDNN_ATTENTION}[provider]

        def forward():
            context = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
            with context:
                return F.scaled_dot_product_attention(q, k, v, is_causal=p["causal"], enable_gqa=groups > 1)
    elif provider == "flash_attn":
        _need("flash_attn", provider)
        from flash_attn import flash_attn_func

        forward = lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # noqa: E731
                                          causal=p["causal"]).transpose(1, 2)
    else:
        raise ProviderMissing(f"attention has no provider {provider!r}")

    def fn():
        q.grad = k.grad = v.grad = None
        forward().backward(upstream)

    flops = 4 * p["batch"] * p["heads"] * p["seq"] ** 2 * p["head_dim"] * 3.5 * (0.5 if p["causal"] else 1.0)
    size = torch.finfo(dtype).bits // 8
    return Setup(fn, flops=flops, bytes=size * (4 * q.numel() + 4 * k.numel()))


ATTENTION_PROVIDERS = ["ember", "torch", "sdpa", "flash_attn"]

# ----------------------------------------------------------------------------
# cross_entropy: linear cross-entropy (LM head + loss), forward + backward: 6*N*H*V FLOPs
# ----------------------------------------------------------------------------


def cross_entropy_sizes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [dict(tokens=n, hidden=256, vocab=32000) for n in (512, 1024, 2048)]
    return ([dict(tokens=8192, hidden=4096, vocab=v) for v in (32000, 128256, 151936)]
            + [dict(tokens=8192, hidden=2304, vocab=256000)])


def cross_entropy_setup(provider: str, p: dict, device: torch.device) -> Setup:
    from ember.kernels import linear_cross_entropy

    dtype = _dtype(device)
    hidden = torch.randn(p["tokens"], p["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(p["vocab"], p["hidden"], device=device, dtype=dtype) * p["hidden"] ** -0.5).requires_grad_()
    target = torch.randint(0, p["vocab"], (p["tokens"],), device=device)

    if provider == "ember":
        loss_fn = lambda: linear_cross_entropy(hidden, weight, target)  # noqa: E731
    elif provider in ("torch", "torch_compile"):
        def eager():
            return F.cross_entropy((hidden @ weight.T).float(), target)
        loss_fn = torch.compile(eager) if provider == "torch_compile" else eager
    elif provider == "liger":
        _need("liger_kernel", provider)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        loss_fn = lambda: liger(weight, hidden, target)  # noqa: E731
    elif provider == "cut_cross_entropy":
        _need("cut_cross_entropy", provider)
        from cut_cross_entropy import linear_cross_entropy as cce

        loss_fn = lambda: cce(hidden, weight, target)  # noqa: E731
    else:
        raise ProviderMissing(f"cross_entropy has no provider {provider!r}")

    def fn():
        hidden.grad = weight.grad = None
        loss_fn().backward()

    size = torch.finfo(dtype).bits // 8
    logits_bytes = p["tokens"] * p["vocab"] * 4
    return Setup(fn, flops=6 * p["tokens"] * p["hidden"] * p["vocab"],
                 bytes=size * 2 * (hidden.numel() + weight.numel()), extra={"fp32_logits_mb": logits_bytes / 2**20})


CROSS_ENTROPY_PROVIDERS = ["ember", "torch", "torch_compile", "liger", "cut_cross_entropy"]

# ----------------------------------------------------------------------------
# lora: LoRA linear forward + backward at projection shapes; saved activations measured
# ----------------------------------------------------------------------------


def lora_sizes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [dict(tokens=n, in_features=1024, out_features=1024, rank=16, base="dense") for n in (256, 1024)]
    return [dict(tokens=8192, in_features=i, out_features=o, rank=r, base=b)
            for i, o in ((4096, 4096), (4096, 14336), (14336, 4096)) for r in (16, 64) for b in ("dense", "nf4")]


def lora_setup(provider: str, p: dict, device: torch.device) -> Setup:
    dtype = _dtype(device)
    x = torch.randn(p["tokens"], p["in_features"], device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(p["out_features"], p["in_features"], device=device, dtype=dtype) * p["in_features"] ** -0.5
    lora_a = (torch.randn(p["rank"], p["in_features"], device=device) * 0.01).requires_grad_()
    lora_b = (torch.randn(p["out_features"], p["rank"], device=device) * 0.01).requires_grad_()
    upstream = torch.randn(p["tokens"], p["out_features"], device=device, dtype=dtype)
    scaling = 2.0
    if provider == "ember":
        from ember.kernels import lora_linear, quantize_nf4

        base = quantize_nf4(weight) if p["base"] == "nf4" else weight
        forward = lambda: lora_linear(x, base, lora_a, lora_b, scaling=scaling, dropout_p=0.05)  # noqa: E731
    elif provider == "peft":
        _need("peft", provider)
        import peft

        layer = torch.nn.Linear(p["in_features"], p["out_features"], bias=False, device=device, dtype=dtype)
        layer.weight.data.copy_(weight)
        if p["base"] == "nf4":
            raise ProviderMissing("peft: an NF4 base needs bitsandbytes' CUDA Linear4bit; dense only here")
        config = peft.LoraConfig(r=p["rank"], lora_alpha=scaling * p["rank"], lora_dropout=0.05,
                                 target_modules=["layer"])
        holder = torch.nn.Module()
        holder.layer = layer
        peft_layer = peft.get_peft_model(holder, config).base_model.model.layer
        forward = lambda: peft_layer(x)  # noqa: E731
    else:
        raise ProviderMissing(f"lora has no provider {provider!r}")

    def fn():
        x.grad = lora_a.grad = lora_b.grad = None
        forward().backward(upstream)

    saved = _saved_bytes(forward)
    flops = 6 * p["tokens"] * p["in_features"] * p["out_features"] + 12 * p["tokens"] * p["rank"] * (
        p["in_features"] + p["out_features"])
    return Setup(fn, flops=flops, extra={"saved_activations_mb": saved / 2**20})


def _saved_bytes(forward) -> int:
    """Bytes autograd keeps for the backward of one forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


LORA_PROVIDERS = ["ember", "peft"]

# ----------------------------------------------------------------------------
# optimizer: one AdamW step; state bytes per parameter measured
# ----------------------------------------------------------------------------


def optimizer_sizes(quick: bool, device: torch.device) -> list[dict]:
    counts = (1, 4, 16) if quick else (100, 300, 1000)
    return [dict(million_params=m) for m in counts]


def optimizer_setup(provider: str, p: dict, device: torch.device) -> Setup:
    from ember.engine.optim import build, state_bytes_per_param

    if provider.startswith("bnb"):
        _need("bitsandbytes", provider)
    side = 4096
    rows = max(1, p["million_params"] * 1_000_000 // side)
    params = [torch.nn.Parameter(torch.randn(rows, side, device=device) * 0.02)]
    params[0].grad = torch.randn_like(params[0]) * 1e-3
    optimizer = build(provider, params, lr=1e-4)
    optimizer.step()  # the state exists from here on
    n = params[0].numel()
    state = state_bytes_per_param(optimizer)
    # Traffic of one step: read grad and param, write param, read + write the state.
    return Setup(optimizer.step, bytes=n * (4 + 4 + 4) + 2 * state * n,
                 extra={"state_bytes_per_param": state})


OPTIMIZER_PROVIDERS = ["adamw", "adamw8bit", "bnb_adamw8bit", "bnb_paged_adamw8bit"]

# ----------------------------------------------------------------------------
# train_step: one forward + backward + optimizer step of a Llama-style model.
# FLOPs: 2*N*P forward and 2*N*P for the input gradients, plus 2*N*P weight
# gradients when every weight trains (N tokens, P parameters in matmuls).
# ----------------------------------------------------------------------------

_LLAMA_SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # Two of Llama-3-8B's 32 layers, with its embeddings and head.
    "llama3-8b-2-layers": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # --quick on a CPU: SmolLM2's layer and vocabulary shapes, 4 of its 30 layers.
    "smollm2-135m-4-layers": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    # The harness's own tests.
    "llama-tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def train_step_sizes(quick: bool, device: torch.device) -> list[dict]:
    shapes = ["smollm2-135m-4-layers"] if quick else ["smollm2-135m", "llama3-8b-2-layers"]
    tokens = 256 if quick else 4096
    return [dict(model=m, mode=mode, tokens=tokens) for m in shapes for mode in ("lora", "qlora", "full")]


def train_step_setup(provider: str, p: dict, device: torch.device) -> Setup:
    import transformers

    from ember.engine.lora import LoRAConfig, apply_lora
    from ember.engine.optim import build
    from ember.engine.patch import patch

    if provider == "torch" and p["mode"] == "qlora":
        raise ProviderMissing("torch: the QLoRA baseline (PEFT over bitsandbytes Linear4bit) is not built yet")
    if provider not in ("ember", "torch"):
        raise ProviderMissing(f"train_step has no provider {provider!r}")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_LLAMA_SHAPES[p["model"]], max_position_embeddings=max(p["tokens"], 2048))
    dtype = _dtype(device)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    targets = "all-linear"
    if provider == "ember":
        patch(model)
        if p["mode"] != "full":
            model = apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=targets,
                                                 quantize_base="nf4" if p["mode"] == "qlora" else None))
        optimizer = build("adamw8bit", [q for q in model.parameters() if q.requires_grad], lr=1e-5)
    else:
        if p["mode"] == "lora":
            _need("peft", provider)
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        optimizer = build("adamw", [q for q in model.parameters() if q.requires_grad], lr=1e-5)
    input_ids = torch.randint(0, config.vocab_size, (1, p["tokens"]), device=device)

    def fn():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = (6 if p["mode"] == "full" else 4) * p["tokens"] * matmul_params
    return Setup(fn, flops=flops)


TRAIN_STEP_PROVIDERS = ["ember", "torch"]

SUITES = {
    "attention": (attention_sizes, attention_setup, ATTENTION_PROVIDERS),
    "cross_entropy": (cross_entropy_sizes, cross_entropy_setup, CROSS_ENTROPY_PROVIDERS),
    "lora": (lora_sizes, lora_setup, LORA_PROVIDERS),
    "optimizer": (optimizer_sizes, optimizer_setup, OPTIMIZER_PROVIDERS),
    "train_step": (train_step_sizes, train_step_setup, TRAIN_STEP_PROVIDERS),
}
