"""Named hook points (TransformerLens style): analyses register forward hooks, never patch the model."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class HookPoint(nn.Identity):
    """Identity module whose only job is to have a stable name, e.g. ``blocks.3.attn.hook_probs``."""


@contextmanager
def capture(model: nn.Module, names: list[str] | Callable[[str], bool]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of the named hook points during the ``with`` block.

    >>> with capture(model, lambda n: n.endswith("hook_resid_post")) as acts:
    ...     model(idx)
    """
    match = names if callable(names) else (lambda n, _s=set(names): n in _s)
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, HookPoint) and match(name):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, _n=name: store.__setitem__(_n, out.detach())))
    if not handles:
        raise KeyError(f"no hook point matches {names!r}")
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
