"""PEFT's other parameter-efficient methods in ember's loop: DoRA, AdaLoRA, prefix tuning, IA3.

    model = wrap(patch(model), config, head="classifier")   # a peft.PeftModel over the patched model
    hooks = step_hooks(model, config)       # what the loop calls after each optimizer step (AdaLoRA)
    write_adapter(model, "out/adapter")     # PEFT's own save_pretrained

``peft_method = "lora"`` (the default) is ember's fused LoRA (``ember.engine.lora``) and
never comes here. The others are PEFT's own implementations, built from ember's keys:

- ``dora``: ``LoraConfig(use_dora=True)`` with r = lora_r, lora_alpha, lora_dropout, target_modules = lora_targets.
- ``adalora``: ``AdaLoraConfig`` with target_r = lora_r (the average rank it ends at), init_r = 1.5 x lora_r
  (PEFT's default ratio, 12 -> 8), lora_alpha, lora_dropout, target_modules = lora_targets, and its budget
  schedule from the loop's: total_step = max_steps, tinit = warmup_steps (ranks are not pruned during the
  warmup), tfinal = max_steps // 10 (the last tenth trains at the final ranks). The loop calls
  ``update_and_allocate`` after every optimizer step; PEFT adds its orthogonality penalty (orth_reg_weight 0.5)
  to the training loss (once per micro-batch, so grad_accum k weighs it k times), and held-out losses leave
  it out.
- ``prefix``: ``PrefixTuningConfig`` with ``num_virtual_tokens``; the lora_* keys do not apply.
- ``ia3``: ``IA3Config``; lora_targets = "all-linear" (the default) means IA3's own targets, PEFT's list per
  architecture (keys, values and the feed-forward output, as in the IA3 paper); any other lora_targets is
  passed as target_modules, PEFT's per-architecture list choosing which of them scale their input (feed-forward).
  lora_r, lora_alpha and lora_dropout do not apply.

lora_r = 0 still means a full fine-tune, whatever the method: the other methods need lora_r > 0 (ia3 and
prefix ignore its value). A fresh classification head is trained whole (PEFT's ``modules_to_save``); a
causal LM's head stays frozen.

ember's kernels stay in the path: the model is patched before PEFT wraps it, so attention, the loss and the
norms run ember's kernels under every method. What does not combine is said in the run's "model:" line:
PEFT's DoRA, AdaLoRA and IA3 layers run their own matmuls, so ember's fused LoRA kernel is not used and
its fused MLP falls back to the stock composition where PEFT's layers replace the projections. Prefix
tuning puts ``num_virtual_tokens`` keys and values in front of every layer's own: ember's attention runs
them (a causal mask aligns to the bottom right, so every token sees the whole prefix), checked against
stock attention forward and backward.

Refused, each with a ConfigError naming the combination: prefix tuning for classification (PEFT 0.21
looks for a ``past_key_values`` argument in the model's forward, which transformers 5 renamed ``cache``),
with packed rows (every packed document would have to see the prefix) and with gradient checkpointing
(transformers drops the cache there, so the prefix would be lost); QLoRA with any of these methods
(ember's NF4 layers are not PEFT's); several processes (untested with PEFT's models here).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from .errors import ConfigError

PEFT_METHODS = ("lora", "dora", "adalora", "prefix", "ia3")
# ember's task -> PEFT's task type (which PeftModel subclass wraps the model, and how it saves the head)
_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "causal-lm": "CAUSAL_LM"}
ADALORA_INIT_RANK_RATIO = 1.5  # PEFT's defaults: init_r 12, target_r 8
ADALORA_ORTH_REG_WEIGHT = 0.5  # PEFT's default


def uses_peft(config) -> bool:
    """True when the run trains adapters through PEFT's own implementation rather than ember's LoRA."""
    return config.lora_r > 0 and config.peft_method != "lora"


def adalora_schedule(config) -> dict[str, int]:
    """AdaLoRA's budget schedule from the loop's: total_step, tinit (no pruning) and tfinal (final ranks)."""
    return dict(total_step=config.max_steps, tinit=config.warmup_steps, tfinal=config.max_steps // 10)


def check(config) -> None:
    """What peft_method (one of PEFT_METHODS, checked with the other choices) combines with, checked with the
    rest of the config: a ConfigError naming the combination."""
    method = config.peft_method
    if config.num_virtual_tokens < 1:
        raise ConfigError(f"num_virtual_tokens: expected a positive integer, got {config.num_virtual_tokens}")
    if method == "lora":
        return
    if config.lora_r == 0:
        raise ConfigError(f"peft_method {method!r} trains adapters, but lora_r = 0 means a full fine-tune: "
                          f"set lora_r > 0 (ia3 and prefix ignore its value) or peft_method = 'lora'")
    if config.qlora:
        raise ConfigError(f"qlora with peft_method {method!r} is not supported: ember's NF4 base layers are not "
                          f"PEFT's; use qlora with peft_method = 'lora', or qlora = false")
    if method == "prefix":
        if config.task != "causal-lm":
            raise ConfigError(f"peft_method 'prefix' with task {config.task!r} is not supported: PEFT's prefix "
                              f"tuning for classification needs a past_key_values argument in the model's forward, "
                              f"which transformers 5 calls cache; use it with task 'causal-lm', or another method")
        if config.pack:
            raise ConfigError("peft_method 'prefix' with pack = true is not supported: every packed document would "
                              "have to see the virtual tokens, which varlen attention cannot express; "
                              "set pack = false")
        if config.gradient_checkpointing:
            raise ConfigError("peft_method 'prefix' with gradient_checkpointing = true is not supported: "
                              "transformers drops the cache (the virtual tokens) under gradient checkpointing")
    if method == "adalora":
        schedule = adalora_schedule(config)
        if schedule["tinit"] >= schedule["total_step"] - schedule["tfinal"]:
            raise ConfigError(f"peft_method 'adalora': warmup_steps {config.warmup_steps} leaves no steps to "
                              f"allocate ranks in (max_steps {config.max_steps}, of which the last "
                              f"{schedule['tfinal']} keep the final ranks); lower warmup_steps or raise max_steps")


def _peft_config(config, head: str | None):
    """PEFT's config for ``config.peft_method``. The head is named in modules_to_save even where PEFT's model
    class adds "classifier" and "score" itself: only a module named there is kept out of "all-linear" (PEFT
    would otherwise wrap a token classifier's head in LoRA, then refuse to train it whole)."""
    import peft

    task_type = _TASK_TYPES[config.task]
    modules_to_save = [head] if head is not None else None
    method = config.peft_method
    if method == "dora":
        return peft.LoraConfig(task_type=task_type, r=config.lora_r, lora_alpha=config.lora_alpha,
                               lora_dropout=config.lora_dropout, target_modules=config.lora_targets, use_dora=True,
                               modules_to_save=modules_to_save)
    if method == "adalora":
        return peft.AdaLoraConfig(task_type=task_type, target_r=config.lora_r,
                                  init_r=math.ceil(ADALORA_INIT_RANK_RATIO * config.lora_r),
                                  lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=config.lora_targets, orth_reg_weight=ADALORA_ORTH_REG_WEIGHT,
                                  modules_to_save=modules_to_save, **adalora_schedule(config))
    if method == "ia3":
        targets = None if config.lora_targets == "all-linear" else config.lora_targets
        return peft.IA3Config(task_type=task_type, target_modules=targets, modules_to_save=modules_to_save)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
                                       modules_to_save=modules_to_save)
    raise AssertionError(f"unhandled peft_method {method!r}")  # config.check allows only PEFT_METHODS


_KERNELS_IN_THE_PATH = {
    method: "ember's attention, loss and norm kernels run; PEFT's adapter layers run their own matmuls, so "
            "ember's fused LoRA kernel does not apply and its fused MLP runs the stock composition where they "
            "replace the projections" for method in ("dora", "adalora", "ia3")}
_KERNELS_IN_THE_PATH["prefix"] = ("ember's attention runs the virtual tokens' keys and values (bottom-right "
                                  "causal mask), and its loss, norm, rotary and MLP kernels run as without them")


def wrap(model: nn.Module, config, head: str | None) -> nn.Module:
    """``model`` (patched or not) wrapped by PEFT for ``config.peft_method``; ``head``: a fresh classification
    head to train whole, None for a causal LM."""
    import peft

    peft_config = _peft_config(config, head)
    try:
        wrapped = peft.get_peft_model(model, peft_config)
    except ValueError as error:  # targets that match nothing, an architecture PEFT has no IA3 defaults for, ...
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"peft_method {config.peft_method!r} (lora_targets {config.lora_targets!r}): "
                          f"{reason}") from None
    if config.peft_method == "adalora":
        _leave_orth_penalty_out_of_held_out_losses(wrapped.base_model)
    return wrapped


def _leave_orth_penalty_out_of_held_out_losses(tuner: nn.Module) -> None:
    """AdaLoRA adds its orthogonality penalty to every loss the model returns, in eval mode too; a held-out
    loss (a causal LM's perplexity) must be the task's alone. The weight is zero for a forward in eval mode
    and restored after it, so the saved config keeps PEFT's value."""
    adapter = tuner.trainable_adapter_name

    def before(module, args, kwargs):
        if not module.training:
            module.peft_config[adapter].orth_reg_weight = 0.0

    def after(module, args, kwargs, output):
        module.peft_config[adapter].orth_reg_weight = ADALORA_ORTH_REG_WEIGHT

    tuner.register_forward_pre_hook(before, with_kwargs=True)
    tuner.register_forward_hook(after, with_kwargs=True, always_call=True)


def describe(model: nn.Module, config) -> str:
    """The "model:" line's account of a PEFT-wrapped model: what trains, and which of ember's kernels run."""
    import peft

    trainable, total = model.get_nb_trainable_parameters()
    kernels = _KERNELS_IN_THE_PATH[config.peft_method] if config.ember_kernels else "ember's kernels off"
    return (f"{config.peft_method} (PEFT {peft.__version__}): {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / total:.2f}%); {kernels}")


def write_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """The adapter in PEFT's format, by PEFT itself: adapter_config.json, adapter_model.safetensors (with a
    trained head, PEFT's modules_to_save) and PEFT's model card."""
    model.save_pretrained(folder)


# ----------------------------------------------------------------------------
# The loop's hooks
# ----------------------------------------------------------------------------


class StepHooks:
    """What the loop calls after each optimizer step, and the state a checkpoint keeps for it. Nothing, for
    every method but AdaLoRA."""

    def after_optimizer_step(self, step: int) -> None:
        """``step``: the index of the step just taken, from 0; the gradients are still there."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdaLoRAHooks(StepHooks):
    """AdaLoRA's rank allocation after each optimizer step, and its allocator's state in checkpoints.

    The allocator keeps smoothed importance scores per adapter tensor and, once the ranks are final, the
    rank pattern; both go into the checkpoint (plain tensors and lists), so a resumed run masks exactly as
    the uninterrupted one would."""

    def __init__(self, peft_model: nn.Module):
        self.tuner = peft_model.base_model  # peft's AdaLoraModel

    @property
    def _config(self):
        return self.tuner.peft_config[self.tuner.trainable_adapter_name]

    def after_optimizer_step(self, step: int) -> None:
        # fp16's loss scaler skips a step whose gradients overflowed; their importance scores would be inf for
        # good, so the allocation skips it too.
        grads = [p.grad for name, p in self.tuner.named_parameters() if "lora_" in name and p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.abs().amax() for g in grads])).all():
            return
        self.tuner.update_and_allocate(step)

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        on_cpu = lambda scores: {name: t.detach().cpu() for name, t in scores.items()}
        return {"ipt": on_cpu(allocator.ipt), "exp_avg_ipt": on_cpu(allocator.exp_avg_ipt),
                "exp_avg_unc": on_cpu(allocator.exp_avg_unc), "rank_pattern": self._config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        allocator = self.tuner.rankallocator
        device = next(self.tuner.parameters()).device
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, name, {key: tensor.to(device) for key, tensor in state[name].items()})
        self._config.rank_pattern = state["rank_pattern"]


def step_hooks(model: nn.Module, config) -> StepHooks:
    return AdaLoRAHooks(model) if uses_peft(config) and config.peft_method == "adalora" else StepHooks()

