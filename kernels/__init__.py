"""ember.kernels: Triton kernels with forward and backward, each usable alone.

Imports only torch and triton. Every function dispatches on its inputs'
device (see ``ember.kernels.backend``): Triton on CUDA, the Triton
interpreter on CPU when ``TRITON_INTERPRET=1``, otherwise a PyTorch
implementation of the same algorithm.
"""

from .adamw8bit import adamw8bit_step, adamw8bit_step_ref
from .attention import attention_ref, flash_attention, flash_attention_varlen
from .cross_entropy import (
    LinearCrossEntropyLoss,
    cross_entropy,
    cross_entropy_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from .lora import lora_linear, lora_linear_ref
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "adamw8bit_step",
    "adamw8bit_step_ref",
    "attention_ref",
    "flash_attention",
    "flash_attention_varlen",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "cross_entropy_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "lora_linear",
    "lora_linear_ref",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
]
