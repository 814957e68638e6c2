"""Benchmark suites: for each, the sizes to run and ``setup(provider, params, device) -> Setup``.

A setup builds the inputs once and returns the function to time (one call: a
forward, a backward, both, or one optimizer step) with its analytic FLOPs and
bytes. A provider that cannot run here is reported as skipped, never faked:
a missing library or a CUDA-only peer on a CPU is known from the ``Suite``
before anything is built; a provider that refuses the input (an SDPA backend
pinned on a shape it does not take) raises ``ProviderMissing`` from its setup.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F


class ProviderMissing(Exception):
    """The provider cannot run here: its library is not installed, it needs CUDA, or it refuses the input."""


@dataclasses.dataclass
class Setup:
    fn: Callable[[], object]
    flops: float = 0.0  # per call, from the suite's analytic model
    bytes: float = 0.0  # per call, minimum traffic to and from device memory
    extra: dict = dataclasses.field(default_factory=dict)  # suite-specific measurements (state bytes, ...)
    inputs: tuple = ()  # the tensors ``fn`` differentiates with respect to, e.g. (q, k, v): read by the tests


@dataclasses.dataclass(frozen=True)
class Suite:
    """The sizes to run, the setup of one case, and the providers with what each needs."""

    sizes: Callable[[bool, torch.device], list[dict]]
    setup: Callable[[str, dict, torch.device], Setup]
    providers: tuple[str, ...]
    needs: dict[str, str] = dataclasses.field(default_factory=dict)  # provider -> the module it imports
    cuda_only: frozenset[str] = frozenset()  # providers that have no CPU implementation

    def unavailable(self, provider: str, device: torch.device) -> str | None:
        """Why ``provider`` cannot run on ``device`` (reported as a skip), or None.

        Checked before a case is set up, so a missing peer costs no process.
        """
        module = self.needs.get(provider)
        if module is not None and importlib.util.find_spec(module) is None:
            return f"{provider}: {module} is not installed"
        if provider in self.cuda_only and device.type != "cuda":
            return f"{provider}: needs a CUDA device"
        return None


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------
# attention: the forward, the backward, or both, of one attention call.
# FLOPs (flash-attention's model): 4*B*H*Sq*Sk*D for the forward, 2.5x that
# for the backward, halved when causal; padded batches count real tokens only.
# ----------------------------------------------------------------------------

ATTENTION_PASSES = ("fwd", "bwd", "fwd_bwd")
_PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
# Elements of q (and of k) read or written per pass: fwd reads q, k, v and writes o; bwd reads q, k, v, o, do
# and writes dq, dk, dv.
_PASS_TRAFFIC = {"fwd": 2, "bwd": 4, "fwd_bwd": 6}


def _attention_case(pass_: str, seq: int, *, head_dim: int = 64, heads: int | None = None,
                    kv_heads: int | None = None, causal: bool = True, padded: bool = False,
                    batch: int | None = None) -> dict:
    # On a GPU: 16k tokens per batch and a model width of 2048 (flash-attention's benchmark), so that short
    # sequences still fill the card.
    heads = heads or 2048 // head_dim
    return {"pass": pass_, "batch": batch or max(1, 16384 // seq), "heads": heads, "kv_heads": kv_heads or heads,
            "seq": seq, "head_dim": head_dim, "causal": causal, "padded": padded}


def attention_sizes(quick: bool, device: torch.device) -> list[dict]:
    if device.type != "cuda":
        # The CPU measures memory and its growth with S (forward and backward together).
        cases = [_attention_case("fwd_bwd", s, heads=8, batch=1) for s in (512, 1024, 2048, 4096)]
        cases.append(_attention_case("fwd_bwd", 2048, heads=8, kv_heads=2, batch=1))  # GQA
        cases.append(_attention_case("fwd_bwd", 512, heads=12, batch=8, causal=False, padded=True))  # BERT-base
        return cases
    lengths = (512, 1024, 2048, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    shapes = [(64, True)] if quick else [(64, True), (64, False), (128, True), (128, False)]
    cases = [_attention_case(pass_, s, head_dim=d, causal=c) for pass_ in ATTENTION_PASSES for d, c in shapes
             for s in lengths]
    # Llama-3-8B's grouped-query attention: 32 query heads over 8 key/value heads.
    cases += [_attention_case(pass_, s, head_dim=128, heads=32, kv_heads=8, batch=max(1, 8192 // s))
              for pass_ in ATTENTION_PASSES for s in lengths[-2 if quick else 1:]]
    # BERT-base on a padded batch: real lengths from a quarter of S to S, no causal mask.
    cases += [_attention_case(pass_, s, heads=12, causal=False, padded=True, batch=32)
              for pass_ in ATTENTION_PASSES for s in ((512,) if quick else (128, 512))]
    return cases


def _padding_lengths(batch: int, seq: int) -> torch.Tensor:
    """Real lengths of a padded batch: the first row full, the others uniform in [seq/4, seq]; fixed by a seed."""
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=torch.Generator().manual_seed(0))
    lengths[0] = seq
    return lengths


def attention_setup(provider: str, p: dict, device: torch.device) -> Setup:
    dtype = _dtype(device)
    batch, heads, kv_heads, seq, head_dim, causal = (p[k] for k in ("batch", "heads", "kv_heads", "seq",
                                                                     "head_dim", "causal"))
    groups = heads // kv_heads
    lengths = _padding_lengths(batch, seq) if p["padded"] else torch.full((batch,), seq)
    keep = torch.arange(seq) < lengths[:, None]  # (B, S) True = a real token

    def leaf(*shape):
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    if provider == "flash_attn":
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if p["padded"]:
            # flash-attn's own way with padding: the real tokens only, packed, with cumulative lengths.
            total = int(lengths.sum())
            q, k, v = leaf(total, heads, head_dim), leaf(total, kv_heads, head_dim), leaf(total, kv_heads, head_dim)
            cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device, torch.int32)
            forward = lambda: flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, seq, seq,  # noqa: E731
                                                     causal=causal)
        else:
            q, k, v = leaf(batch, seq, heads, head_dim), leaf(batch, seq, kv_heads, head_dim), \
                leaf(batch, seq, kv_heads, head_dim)
            forward = lambda: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
    else:
        q, k, v = leaf(batch, heads, seq, head_dim), leaf(batch, kv_heads, seq, head_dim), \
            leaf(batch, kv_heads, seq, head_dim)
        key_padding_mask = keep.to(device) if p["padded"] else None  # (B, S)
        forward = _attention_forward(provider, q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                     groups=groups)

    fn = _timed_pass(p["pass"], forward, [q, k, v])
    real_pairs = float((lengths.double() ** 2).sum()) * (0.5 if causal else 1.0)  # (query, key) pairs computed
    flops = 4 * heads * head_dim * real_pairs * _PASS_FLOPS[p["pass"]]
    size = torch.finfo(dtype).bits // 8
    return Setup(fn, flops=flops, bytes=size * _PASS_TRAFFIC[p["pass"]] * (q.numel() + k.numel()),
                 inputs=(q, k, v))


def _attention_forward(provider: str, q, k, v, *, causal: bool, key_padding_mask, groups: int):
    """The forward of every provider that takes (B, H, S, D) inputs."""
    if provider == "ember":
        from ember.kernels import flash_attention

        return lambda: flash_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    if provider in ("torch", "torch_compile"):
        def eager():
            expand = (lambda t: t.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda t: t)
            scores = (q @ expand(k).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, S, S)
            if causal:
                seq = q.shape[-2]
                scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            if key_padding_mask is not None:
                scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
            return scores.softmax(-1) @ expand(v)
        return torch.compile(eager) if provider == "torch_compile" else eager
    if provider.startswith("sdpa_"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}[provider]
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, S)

        def forward():
            with sdpa_kernel(backend):  # pinned: no silent fallback to another backend
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                      enable_gqa=groups > 1)
        try:
            forward()
        except RuntimeError as error:  # the pinned backend does not take this input (a mask, a head dim, ...)
            raise ProviderMissing(f"{provider}: {str(error).splitlines()[0][:160]}") from None
        return forward
    raise ValueError(f"attention has no provider {provider!r}")


def _timed_pass(pass_: str, forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable:
    """The call to time for one pass. The forward runs with grad enabled, as in training (it saves for backward)."""
    upstream = torch.randn_like(leaves[0])  # every provider's output has the shape and layout of its q

    def clear():
        for leaf in leaves:
            leaf.grad = None

    if pass_ == "fwd":
        return forward
    if pass_ == "bwd":
        out = forward()  # once, outside the timing; the graph is kept for repeated backwards
        return lambda: (clear(), out.backward(upstream, retain_graph=True))
    return lambda: (clear(), forward().backward(upstream))


ATTENTION = Suite(
    attention_sizes, attention_setup,
    providers=("ember", "torch", "torch_compile", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math",
               "flash_attn"),
    needs={"flash_attn": "flash_attn"},
    cuda_only=frozenset({"sdpa_efficient", "sdpa_cudnn", "flash_attn"}))

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
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        loss_fn = lambda: liger(weight, hidden, target)  # noqa: E731
    elif provider == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy as cce

        loss_fn = lambda: cce(hidden, weight, target)  # noqa: E731
    else:
        raise ValueError(f"cross_entropy has no provider {provider!r}")

    def fn():
        hidden.grad = weight.grad = None
        loss_fn().backward()

    size = torch.finfo(dtype).bits // 8
    logits_bytes = p["tokens"] * p["vocab"] * 4
    return Setup(fn, flops=6 * p["tokens"] * p["hidden"] * p["vocab"],
                 bytes=size * 2 * (hidden.numel() + weight.numel()), extra={"fp32_logits_mb": logits_bytes / 2**20},
                 inputs=(hidden, weight))


CROSS_ENTROPY = Suite(
    cross_entropy_sizes, cross_entropy_setup,
    providers=("ember", "torch", "torch_compile", "liger", "cut_cross_entropy"),
    needs={"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"},
    # Both peers are Triton-only: without a GPU they fail inside Triton rather than run.
    cuda_only=frozenset({"liger", "cut_cross_entropy"}))

# ----------------------------------------------------------------------------
# lora: LoRA linear forward + backward at projection shapes; saved activations measured
# ----------------------------------------------------------------------------


def lora_sizes(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [dict(tokens=n, in_features=1024, out_features=1024, rank=16, base=b, dropout=0.05)
                for n, b in ((256, "dense"), (1024, "dense"), (1024, "nf4"))]
    return [dict(tokens=8192, in_features=i, out_features=o, rank=r, base=b, dropout=0.05)
            for i, o in ((4096, 4096), (4096, 14336), (14336, 4096)) for r in (16, 64) for b in ("dense", "nf4")]


def lora_setup(provider: str, p: dict, device: torch.device) -> Setup:
    """y = x W^T + scaling * dropout(x) A^T B^T: a frozen base (dense or NF4), trainable fp32 adapters."""
    dtype = _dtype(device)
    x = torch.randn(p["tokens"], p["in_features"], device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(p["out_features"], p["in_features"], device=device, dtype=dtype) * p["in_features"] ** -0.5
    lora_a = (torch.randn(p["rank"], p["in_features"], device=device) * 0.01).requires_grad_()
    lora_b = (torch.randn(p["out_features"], p["rank"], device=device) * 0.01).requires_grad_()
    upstream = torch.randn(p["tokens"], p["out_features"], device=device, dtype=dtype)
    scaling, dropout_p = 2.0, p["dropout"]
    if provider == "ember":
        from ember.kernels import lora_linear, quantize_nf4

        base = quantize_nf4(weight) if p["base"] == "nf4" else weight
        forward = lambda: lora_linear(x, base, lora_a, lora_b, scaling=scaling, dropout_p=dropout_p)  # noqa: E731
    elif provider in ("torch", "torch_compile"):
        if p["base"] == "nf4":
            raise ProviderMissing(f"{provider}: PyTorch has no NF4 matmul; PEFT over bitsandbytes is the baseline")

        def eager():  # what PEFT computes, without its module machinery
            low_rank = F.linear(F.linear(F.dropout(x, dropout_p).to(lora_a.dtype), lora_a), lora_b)
            return F.linear(x, weight) + (scaling * low_rank).to(x.dtype)
        forward = torch.compile(eager) if provider == "torch_compile" else eager
    elif provider == "peft":
        layer = _peft_lora_layer(p, weight, scaling, dropout_p, device, dtype)
        with torch.no_grad():  # the same adapters as every other provider
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        forward = lambda: layer(x)  # noqa: E731
    else:
        raise ValueError(f"lora has no provider {provider!r}")

    def fn():
        x.grad = lora_a.grad = lora_b.grad = None
        forward().backward(upstream)

    saved = _saved_bytes(forward)
    flops = 6 * p["tokens"] * p["in_features"] * p["out_features"] + 12 * p["tokens"] * p["rank"] * (
        p["in_features"] + p["out_features"])
    return Setup(fn, flops=flops, extra={"saved_activations_mb": saved / 2**20}, inputs=(x, lora_a, lora_b))


def _peft_lora_layer(p: dict, weight: torch.Tensor, scaling: float, dropout_p: float, device: torch.device,
                     dtype: torch.dtype) -> torch.nn.Module:
    """PEFT's LoRA layer over the same base: an nn.Linear, or bitsandbytes' Linear4bit for NF4 (QLoRA)."""
    import peft

    if p["base"] == "nf4":
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(p["in_features"], p["out_features"], bias=False, compute_dtype=dtype,
                                 quant_type="nf4", compress_statistics=True)
        base.load_state_dict({"weight": weight.cpu()})
        base = base.to(device)  # bitsandbytes quantizes on the move to a device
    else:
        base = torch.nn.Linear(p["in_features"], p["out_features"], bias=False, device=device, dtype=dtype)
        base.weight.data.copy_(weight)
    holder = torch.nn.Module()
    holder.layer = base
    config = peft.LoraConfig(r=p["rank"], lora_alpha=scaling * p["rank"], lora_dropout=dropout_p,
                             target_modules=["layer"])
    return peft.get_peft_model(holder, config).base_model.model.layer


def _saved_bytes(forward) -> int:
    """Bytes autograd keeps for the backward of one forward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


LORA = Suite(lora_sizes, lora_setup, providers=("ember", "torch", "torch_compile", "peft"),
            needs={"peft": "peft"})

# ----------------------------------------------------------------------------
# optimizer: one AdamW step; state bytes per parameter measured
# ----------------------------------------------------------------------------


def optimizer_sizes(quick: bool, device: torch.device) -> list[dict]:
    counts = (1, 4, 16) if quick else (100, 300, 1000)
    return [dict(million_params=m) for m in counts]


def optimizer_setup(provider: str, p: dict, device: torch.device) -> Setup:
    from ember.engine.optim import build, state_bytes_per_param

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


OPTIMIZER = Suite(optimizer_sizes, optimizer_setup,
                  providers=("adamw", "adamw8bit", "bnb_adamw8bit", "bnb_paged_adamw8bit"),
                  needs={"bnb_adamw8bit": "bitsandbytes", "bnb_paged_adamw8bit": "bitsandbytes"})

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
    """ember: the patched model (ember's attention and fused loss), ember's LoRA / QLoRA layers, 8-bit AdamW.
    torch: stock transformers (SDPA attention, logits then cross-entropy), PEFT over nn.Linear or over
    bitsandbytes' Linear4bit (QLoRA), torch's fused AdamW."""
    import transformers

    from ember.engine.optim import build

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_LLAMA_SHAPES[p["model"]], max_position_embeddings=max(p["tokens"], 2048))
    dtype = _dtype(device)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if provider == "ember":
        model, optimizer_name = _ember_train_model(model, p["mode"]), "adamw8bit"
    elif provider == "torch":
        model, optimizer_name = _stock_train_model(model, p["mode"], device, dtype), "adamw"
    else:
        raise ValueError(f"train_step has no provider {provider!r}")
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = build(optimizer_name, trainable, lr=1e-5)
    input_ids = torch.randint(0, config.vocab_size, (1, p["tokens"]), device=device)

    def fn():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = (6 if p["mode"] == "full" else 4) * p["tokens"] * matmul_params
    return Setup(fn, flops=flops, extra={"trainable_params": sum(q.numel() for q in trainable)})


_LORA_TARGETS = "all-linear"  # every Linear of the body, not the LM head (PEFT's meaning)


def _ember_train_model(model, mode: str):
    from ember.engine.lora import LoRAConfig, apply_lora
    from ember.engine.patch import patch

    patch(model)
    if mode == "full":
        return model
    return apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=_LORA_TARGETS,
                                        quantize_base="nf4" if mode == "qlora" else None))


def _stock_train_model(model, mode: str, device: torch.device, dtype: torch.dtype):
    if mode == "full":
        return model
    import peft

    if mode == "qlora":
        _quantize_body_with_bitsandbytes(model, device, dtype)
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=_LORA_TARGETS))


def _quantize_body_with_bitsandbytes(model, device: torch.device, dtype: torch.dtype) -> None:
    """Every Linear of the body becomes a bitsandbytes NF4 Linear4bit with double quantization, as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` builds it."""
    import bitsandbytes as bnb

    body = model.get_decoder()
    for name, module in list(body.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        quantized.load_state_dict({k: v.cpu() for k, v in module.state_dict().items()})
        parent, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, child, quantized.to(device))


TRAIN_STEP = Suite(train_step_sizes, train_step_setup, providers=("ember", "torch"))

# ----------------------------------------------------------------------------
# layer: one transformer layer, or the whole small model, forward + backward, LoRA r=16 on every linear,
# fp32 weights under autocast (ember's "bf16" policy). Measured: the activation bytes held for the backward
# per token per layer (ember.bench.memory.HeldActivations), besides the harness's peak memory and time.
# FLOPs: 6*N*P for the LoRA-adapted matmuls (forward, input and adapter gradients: the frozen bases get none,
# so 4*N*P of it is the bases) plus attention's 4*S^2*d_model (forward) and 2.5x that (backward), causal halved.
# ----------------------------------------------------------------------------

_LAYER_MODELS = {
    # issue 17's configuration: a Llama-3-style body, 8 query / 2 key-value heads
    "llama": dict(family="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=32000),
    "bert-base": dict(family="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                      num_attention_heads=12, vocab_size=30522),
    "llama3-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def layer_sizes(quick: bool, device: torch.device) -> list[dict]:
    cases = [dict(model=m, scope=scope, tokens=512) for m in ("llama", "bert-base") for scope in ("layer", "model")]
    if device.type == "cuda" and not quick:
        cases += [dict(model="llama3-8b", scope=scope, tokens=4096) for scope in ("layer", "model")]
    return cases


def _layer_model(p: dict, device: torch.device):
    import transformers

    shape = dict(_LAYER_MODELS[p["model"]])
    family = shape.pop("family")
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**shape, max_position_embeddings=max(p["tokens"], 2048))
        return transformers.LlamaForCausalLM(config).to(device), "model.layers"
    # BERT's attention dropout off: with it, stock SDPA on a CPU falls back to the math kernel and keeps the
    # (S, S) probabilities, which would measure that fallback rather than the layer.
    config = transformers.BertConfig(**shape, max_position_embeddings=max(p["tokens"], 512), num_labels=2,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(device), "bert.encoder.layer"


def _layer_lora_targets(model) -> list[str] | str:
    # PEFT's "all-linear" for a causal LM; BERT's linears by name (the classifier head stays dense and trains)
    return "all-linear" if hasattr(model, "lm_head") else ["query", "key", "value", "dense"]


def layer_setup(provider: str, p: dict, device: torch.device) -> Setup:
    """ember: apply_lora + patch (attention, loss, norms, rotary, gated MLP). torch: stock transformers with SDPA
    attention + PEFT. liger: Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused loss + PEFT (Llama only)."""
    from .memory import HeldActivations

    model, layers_name = _layer_model(p, device)
    targets = _layer_lora_targets(model)
    adapted = sum(m.weight.numel() for m in model.get_submodule(layers_name)[1].modules()
                  if isinstance(m, torch.nn.Linear))  # weights of one layer's matmuls, all adapted
    if provider == "ember":
        from ember.engine.lora import LoRAConfig, apply_lora
        from ember.engine.patch import patch

        apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules=targets))
        patch(model)
        body = model
    elif provider in ("torch", "liger"):
        import peft

        if provider == "liger":
            if not hasattr(model, "lm_head"):
                raise ProviderMissing("liger: Liger-Kernel has no BERT layers")
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(model=model)
        model.set_attn_implementation("sdpa")
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        body = model.get_base_model()
    else:
        raise ValueError(f"layer has no provider {provider!r}")
    model.train()
    layers = body.get_submodule(layers_name)
    tokens = p["tokens"]
    input_ids = torch.randint(1, body.config.vocab_size, (1, tokens), device=device)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)

    if p["scope"] == "model":
        labels = input_ids if hasattr(body, "lm_head") else torch.tensor([1], device=device)

        def forward():
            with autocast():
                return model(input_ids=input_ids, labels=labels).loss

        layer_names = [f"{layers_name}.{i}" for i in range(1, len(layers))]  # layer 0 reads frozen embeddings
    else:
        layer = layers[1]
        hidden = (torch.randn(1, tokens, body.config.hidden_size, device=device) * 0.5).requires_grad_()
        kwargs = {}
        rotary = getattr(getattr(body, "model", None), "rotary_emb", None)
        if rotary is not None:  # made once per forward by the model and shared by its layers: not counted here
            kwargs["position_embeddings"] = rotary(hidden, torch.arange(tokens, device=device)[None])

        def forward():
            with autocast():
                out = layer(hidden, **kwargs)
            return (out[0] if isinstance(out, tuple) else out).float().square().mean()

        layer_names = [f"{layers_name}.1"]

    with HeldActivations(body) as held:
        forward()
    per_layer = held.per_layer(layer_names)

    def fn():
        model.zero_grad(set_to_none=True)
        forward().backward()

    config = body.config
    layer_count = len(layers) if p["scope"] == "model" else 1
    causal = 0.5 if hasattr(body, "lm_head") else 1.0
    flops = layer_count * (6 * tokens * adapted + 3.5 * 4 * tokens**2 * config.hidden_size * causal)
    return Setup(fn, flops=flops, extra={
        "held_bytes_per_token_per_layer": per_layer / tokens,
        "held_per_layer_x_hidden": per_layer / tokens / config.hidden_size,
        "held_total_mb": held.total_bytes / 2**20,
    })


LAYER = Suite(layer_sizes, layer_setup, providers=("ember", "torch", "liger"),
              needs={"liger": "liger_kernel", "torch": "peft", "ember": "transformers"},
              cuda_only=frozenset({"liger"}))

SUITES = {"attention": ATTENTION, "cross_entropy": CROSS_ENTROPY, "lora": LORA, "optimizer": OPTIMIZER,
          "train_step": TRAIN_STEP, "layer": LAYER}
