"""TRL's SFTTrainer with ember's fused loss: ``EmberSFTTrainer``.

    from ember.engine import patch_model
    from ember.engine.trainers import EmberSFTTrainer

    model = patch_model(AutoModelForCausalLM.from_pretrained(path))
    trainer = EmberSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

``transformers.Trainer`` needs nothing from this module: it calls
``model(**batch, labels=..., num_items_in_batch=...)`` and trains on the
returned loss, which a patched model computes with ``linear_cross_entropy``.

TRL's ``SFTTrainer`` (1.16) does not: at construction it wraps
``model.forward`` with a chunked LM head of its own (``add_fused_lm_head``) and
its ``compute_loss`` calls ``model(..., fused_lm_head=True)``, which runs the
backbone directly and projects through ``lm_head.weight`` itself, so ember's
patched forward, and its loss kernel, never runs. TRL has no switch for that
head; for a different loss it asks users to subclass ``SFTTrainer`` and
override ``compute_loss``. ``EmberSFTTrainer`` does exactly that: its
``compute_loss`` is ``transformers.Trainer``'s, the model's own loss. TRL's
wrapper, called without ``fused_lm_head``, hands the call on to ember's forward
unchanged.

What this gives up: TRL's ``entropy`` and ``mean_token_accuracy`` training
metrics. Both need the whole next-token distribution of every token (an
entropy and an argmax over the vocabulary), which ember's loss kernel does not
compute; TRL gets them from its own LM head, which would project every token
through the vocabulary a second time. They are not logged; ``num_tokens`` is.
TRL's options that replace the negative log-likelihood (``loss_type="dft"``,
``label_smoothing_factor``, ``compute_loss_func``) are refused rather than
silently ignored. A mixture-of-experts model's router loss is what the patched
model's own loss includes (``patch`` decides, per family), not SFTTrainer's.

This module imports TRL (``pip install 'ember-train[trl]'``); ``ember.engine`` does not import it.
"""

from __future__ import annotations

import torch.nn as nn

try:
    import trl
except ImportError as error:  # pragma: no cover - the test extra installs trl
    raise ImportError("ember.engine.trainers needs TRL: pip install 'ember-train[trl]'") from error

from peft import PeftModel

from .patch import _PATCHED


def _has_ember_loss(model: nn.Module) -> bool:
    """Whether ``patch`` replaced the loss of ``model``, or of the model inside a PEFT wrapper."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(model, _PATCHED, False) or getattr(base, _PATCHED, False)


class EmberSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the patched model's own: ember's ``linear_cross_entropy``.

    Takes the same arguments as ``SFTTrainer``. ``model`` must be a model
    already passed through ``ember.engine.patch_model`` (with its loss), or a
    ``PeftModel`` around one; a ``peft_config`` wraps it after the patch, the
    order ``patch`` supports. Raises ValueError for a model id or an unpatched
    model (either would train through TRL's or transformers' stock loss), and for
    TRL options that replace the loss ember computes. The ``entropy`` and
    ``mean_token_accuracy`` metrics are not logged (see the module docstring).
    """

    def __init__(self, model, args=None, *more, **kwargs):
        if isinstance(model, str) or not _has_ember_loss(model):
            given = repr(model) if isinstance(model, str) else type(model).__name__
            raise ValueError(f"EmberSFTTrainer: model must be a model passed through ember.engine.patch_model with "
                             f"its loss (patch(model, loss=True)), got {given}")
        for option, replaces_the_loss in (("loss_type", getattr(args, "loss_type", "nll") != "nll"),
                                          ("label_smoothing_factor", getattr(args, "label_smoothing_factor", 0) > 0)):
            if replaces_the_loss:
                raise ValueError(f"EmberSFTTrainer: {option}={getattr(args, option)!r} replaces the negative "
                                 f"log-likelihood that ember's fused loss computes; use trl.SFTTrainer for it")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("EmberSFTTrainer: compute_loss_func replaces the loss that ember's fused loss computes; "
                             "use trl.SFTTrainer for it")
        super().__init__(model, args, *more, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As SFTTrainer: a key-value cache is of no use to a training step (and warns under checkpointing).
        inputs["use_cache"] = False
        # transformers.Trainer's compute_loss, skipping SFTTrainer's: model(**inputs, labels=...,
        # num_items_in_batch=...).loss, which the patched forward computes with linear_cross_entropy.
        loss, outputs = super(trl.SFTTrainer, self).compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:
            self._count_tokens(inputs)
        return (loss, outputs) if return_outputs else loss

    def _count_tokens(self, inputs) -> None:
        # SFTTrainer's own `num_tokens` metric: the tokens seen so far, over every process, counted as it counts
        # them (non-padding tokens; every position when padding-free batches carry position_ids instead of a mask).
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = inputs["input_ids"].new_tensor(inputs["position_ids"].size(1))
        self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
