"""Named hook points (TransformerLens style): analyses register forward hooks, never patch the model."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class HookPoint(nn.Identity):
    """Identity module whose only job is to have a stable name, e.g. ``blocks.3.attn.hook_probs``.

    Attaching a forward hook is a request for the value: ``requested`` is True while at least one hook
    registered through ``register_forward_hook`` is attached, so a module can compute a value it would
    otherwise skip (the attention computes its probabilities only when asked, or when ``hook_probs`` is hooked).
    """

    def __init__(self) -> None:
        super().__init__()
        self.n_hooks = 0

    @property
    def requested(self) -> bool:
        return self.n_hooks > 0

    def register_forward_hook(self, hook, *args, **kwargs) -> "CountedHandle":
        handle = super().register_forward_hook(hook, *args, **kwargs)
        self.n_hooks += 1
        return CountedHandle(handle, self)


class CountedHandle:
    """A forward-hook handle that also withdraws its HookPoint's request when removed (once)."""

    def __init__(self, handle, point: HookPoint) -> None:
        self.handle, self.point, self.removed = handle, point, False
        self.id = handle.id

    def remove(self) -> None:
        self.handle.remove()
        if not self.removed:
            self.removed = True
            self.point.n_hooks -= 1

    def __enter__(self) -> "CountedHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def capture(model: nn.Module, names: list[str] | Callable[[str], bool]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of the named hook points during the ``with`` block.

    Capturing is a request: ``blocks.i.attn.hook_probs`` makes the attention form its probabilities and
    ``blocks.i.attn.hook_entropy`` makes it compute the per-query entropy (on the fused kernels) even when the
    forward call did not ask for them.

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
