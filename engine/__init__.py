"""ember.engine: the training loop around ember's kernels, and the pieces it is made of, each usable alone.

    from ember.engine import LoRAConfig, apply_lora, build_optimizer, patch_model, save_adapter
    model = patch_model(AutoModelForCausalLM.from_pretrained(path))   # ember's attention and losses
    model = apply_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear", quantize_base="nf4"))
    optimizer = build_optimizer("adamw8bit", [p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ...                                                                 # your loop, Trainer, TRL
    save_adapter(model, "out/adapter")                                  # PEFT's format

    model = from_pretrained("org/name", lora=LoRAConfig(r=16, target_modules="all-linear"), load_in_4bit=True)
                                                                        # the same in one line, NF4 while loading

    from ember.engine import load_config, run_training
    result = run_training(load_config("job.toml", ["--max_steps=200"]))  # ember's own loop: `ember train`

Modules, in the order a run uses them:

- ``config``: ``TrainConfig``, one frozen dataclass with the defaults (the
  default job), presets, TOML files and ``--key=value`` overrides, checked;
- ``device``, ``precision``: where it runs and the mixed-precision policy,
  each decided once;
- ``data``, ``tasks``: offline assets, files, splits, batches in a resumable
  order; what each task trains on and how it is evaluated (``metrics``);
- ``loading``: ``from_pretrained``, a model in its dtype on its device(s), NF4 bases quantized while the
  checkpoint streams in, hub ids from the local cache;
- ``patch``, ``hf_attention``, ``layers``: Hugging Face models through ember's kernels (attention, losses,
  norms, rotary embeddings, the recomputing MLP);
- ``trainers``: ``EmberSFTTrainer``, TRL's SFTTrainer training on the patched model's own loss (imports trl,
  so it is never imported from here);
- ``lora``, ``peft_format``: LoRA/QLoRA layers over the fused kernel, and
  PEFT's adapter files and models;
- ``optim``, ``schedule``: 8-bit AdamW and its peers; the learning-rate schedule;
- ``checkpoint``, ``atomic``: checkpoints written so a crash leaves the last
  good one; ``errors``: the two errors the command line reports on one line;
- ``train``: the loop itself; ``distributed``: the same loop on several
  processes under torchrun (DDP, FSDP2).

The engine imports ``ember.kernels`` and never ``ember.bench`` or the command line.
No export takes the name of a module (``train``, ``patch``): ``import
ember.engine.train as train_module`` must give the module.
"""

from .config import TrainConfig, load_config
from .errors import ConfigError, TrainingError
from .hf_attention import register_attention
from .loading import from_pretrained
from .lora import LoRAConfig, LoRALinear, apply_lora, lora_report
from .optim import AdamW8bit
from .optim import build as build_optimizer
from .patch import patch as patch_model
from .peft_format import from_peft, load_adapter, save_adapter
from .precision import decide as decide_precision
from .train import TrainResult, evaluate_checkpoint
from .train import train as run_training

__all__ = [
    "AdamW8bit",
    "ConfigError",
    "LoRAConfig",
    "LoRALinear",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "apply_lora",
    "build_optimizer",
    "decide_precision",
    "evaluate_checkpoint",
    "from_peft",
    "from_pretrained",
    "load_adapter",
    "load_config",
    "lora_report",
    "patch_model",
    "register_attention",
    "run_training",
    "save_adapter",
]
