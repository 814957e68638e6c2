"""ember.kernels: Triton kernels with forward and backward, each usable alone.

Imports only torch and triton. Every function dispatches on its inputs'
device (see ``ember.kernels.backend``): Triton on CUDA, the Triton
interpreter on CPU when ``TRITON_INTERPRET=1``, otherwise a PyTorch
implementation of the same algorithm.

The package exports the production API; each module also keeps its float64
reference (``attention_ref``, ``cross_entropy_ref``, ...) for tests and
benchmarks, and ``ember.kernels.checks`` the dtypes the kernels take.
"""

from .adamw8bit import adamw8bit_step
from .adamw8bit import init_state as adamw8bit_init_state
from .attention import flash_attention, flash_attention_varlen
from .cross_entropy import LinearCrossEntropyLoss, cross_entropy, linear_cross_entropy
from .gated import geglu, swiglu
from .lora import lora_linear
from .nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from .norms import layer_norm, rms_norm
from .rotary import apply_rotary

__all__ = [
    "adamw8bit_init_state",
    "adamw8bit_step",
    "flash_attention",
    "flash_attention_varlen",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "linear_cross_entropy",
    "lora_linear",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "rms_norm",
    "layer_norm",
    "apply_rotary",
    "swiglu",
    "geglu",
]
