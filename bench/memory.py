"""Memory measurements that mean something on any device, the CPU included.

``TensorSizeTracker`` records every tensor that PyTorch operators create while
it is active (through a dispatch mode, so it sees the allocations of autograd's
backward too). The largest one tells whether a computation materialized an
(N, V) logits matrix, whatever the allocator or the device.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorSizeTracker(TorchDispatchMode):
    """Tracks the largest tensor (in bytes) created by any operator inside the block."""

    def __init__(self, ignore_shapes=()) -> None:
        """ignore_shapes: shapes not to count, e.g. a weight's own gradient, which any method creates."""
        super().__init__()
        self.ignore_shapes = {tuple(shape) for shape in ignore_shapes}
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) not in self.ignore_shapes:
                size = tensor.numel() * tensor.element_size()
                if size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape, self.largest_op = size, tuple(tensor.shape), str(func)
        return out
