"""Test helper: every tensor ATen returns while a block runs (forward and the autograd backward alike)."""
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationRecorder(TorchDispatchMode):
    """Records (op, shape) of every tensor an ATen op returns inside ``with AllocationRecorder() as rec:``."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.records.append((str(func), tuple(t.shape)))
        return out

    def at_least(self, n_elements: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(op, s) for op, s in self.records if math.prod(s) >= n_elements]

    def ops(self) -> set[str]:
        return {op for op, _ in self.records}
