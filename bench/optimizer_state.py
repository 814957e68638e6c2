"""Optimizer state bytes per parameter, measured on a real model's shapes.

    python -m ember.bench.optimizer_state [--model smollm2-135m|minilm-l6] [--device cpu|cuda]

Builds the model from its config with random weights (nothing is downloaded),
takes one step with each optimizer of ``ember.engine.optim.build`` and counts
the bytes of every state tensor it keeps (``state_bytes_per_param``). Also
prints weight + state bytes per trainable parameter for each precision policy.
Memory counts are meaningful on the CPU; no timings are taken.
"""

from __future__ import annotations

import argparse

import torch

# Shapes from the models' published configs (SmolLM2-135M: Llama, 30 layers,
# GQA 9/3 heads, tied embeddings; all-MiniLM-L6-v2: BERT, 6 layers).
MODELS = {
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)),
    "minilm-l6": ("BertConfig", dict(
        vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)),
}


def build_model(name: str) -> torch.nn.Module:
    import transformers

    config_class, kwargs = MODELS[name]
    config = getattr(transformers, config_class)(**kwargs)
    model_class = transformers.LlamaForCausalLM if config_class == "LlamaConfig" else transformers.BertModel
    torch.manual_seed(0)
    return model_class(config)


def measure(model: torch.nn.Module, name: str, **options) -> float:
    from ember.engine.optim import build, state_bytes_per_param

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build(name, params, lr=1e-5, **options)
    optimizer.step()
    measured = state_bytes_per_param(optimizer)
    del optimizer
    for p in params:
        p.grad = None
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import bitsandbytes  # noqa: F401  (fail early: the table compares against it)

    from ember.engine.optim import OPTIMIZERS
    from ember.kernels.backend import forced_backend

    model = build_model(args.model).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, on {args.device}")
    print("| optimizer | state bytes / parameter |")
    print("|---|---|")
    state = {}
    with forced_backend("torch") if args.device == "cpu" else _nullcontext():
        for name in OPTIMIZERS:
            state[name] = measure(model, name)
            print(f"| {name} | {state[name]:.4f} |")
    print()
    print("| policy + optimizer | weight bytes | state bytes | total / trainable parameter |")
    print("|---|---|---|---|")
    rows = [("fp32 or bf16 (fp32 weights) + adamw", 4, state["adamw"]),
            ("fp32 or bf16 (fp32 weights) + adamw8bit", 4, state["adamw8bit"]),
            ("bf16-pure + adamw8bit (stochastic rounding)", 2, state["adamw8bit"])]
    for label, weight_bytes, state_bytes in rows:
        print(f"| {label} | {weight_bytes} | {state_bytes:.4f} | {weight_bytes + state_bytes:.4f} |")
    return 0


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    raise SystemExit(main())
