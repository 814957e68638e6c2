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


class HeldActivations:
    """The tensor storages autograd keeps for the backward of what runs inside the block, by module.

    Each storage is counted once, by its data pointer, with the names of the
    modules of ``model`` that were running when a tensor on it was saved;
    ``model``'s parameters and buffers are left out (they are not activations),
    while a 16-bit copy of a weight made in the forward is counted, as the
    memory it holds until the backward is real.

        with HeldActivations(model) as held:
            loss = model(**batch).loss
        held.per_layer(["model.layers.1", "model.layers.2"])   # bytes, averaged over those layers
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.storages: dict[int, tuple[int, set[str]]] = {}  # data_ptr -> (bytes, module names)
        self._stack = [""]
        self._handles: list = []
        self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._excluded and storage.nbytes():
            self.storages.setdefault(pointer, (storage.nbytes(), set()))[1].add(self._stack[-1])
        return tensor

    def __enter__(self) -> "HeldActivations":
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        self._excluded = {t.untyped_storage().data_ptr() for t in tensors}
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._stack.append(name)))
            self._handles.append(module.register_forward_hook(lambda m, a, o: (self._stack.pop(), None)[1],
                                                              always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for nbytes, _ in self.storages.values())

    def inside(self, prefix: str) -> dict[str, int]:
        """{submodule name relative to ``prefix``: bytes of the storages first saved there} for one module."""
        by_module: dict[str, int] = {}
        for nbytes, names in self.storages.values():
            within = sorted(n for n in names if n == prefix or n.startswith(prefix + "."))
            if within:
                key = within[0][len(prefix):].lstrip(".") or "(itself)"
                by_module[key] = by_module.get(key, 0) + nbytes
        return by_module

    def per_layer(self, layers: list[str]) -> float:
        """Bytes held inside each of ``layers`` (module names), averaged; a storage shared by several
        (the rotary cos and sin) counts in each, as each layer's backward needs it."""
        return sum(sum(self.inside(layer).values()) for layer in layers) / len(layers)
