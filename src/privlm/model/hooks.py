"""Named hook points (TransformerLens style): analyses register forward hooks, never patch the model.

Every block of ``privlm.model.GPT`` has these (``blocks.{i}.`` + name; q, k, v, z are [B, H, T, d_k]):

  hook_resid_pre, hook_resid_mid, hook_resid_post   residual stream into the block, after attention, out [B, T, d]
  attn.hook_q, attn.hook_k, attn.hook_v             projections (q before 1/sqrt(d_k) and the SM(t) temperature)
  attn.hook_attn_scores                             scaled, causally masked logits [B, H, T, T] (requested only)
  attn.hook_probs                                   attention probabilities [B, H, T, T] (requested only)
  attn.hook_entropy                                 per-query entropy in nats [B, H, T] (requested only)
  attn.hook_z                                       per-head attention output, before W^O
  hook_attn_out                                     MHA output (after W^O) [B, T, d]
  hook_mlp_pre, hook_mlp_post                       FFN input LN2(X_SA) and output FFN(.) [B, T, d], before Eq. 8's
                                                    1/alpha; every FFN kind (two-matrix, fused, scaled); absent in
                                                    AERO's pruned blocks
  ffn.hook_pre_act, ffn.hook_post_act               hidden activations of a two-matrix FFN [B, T, ffn_width]

Hooks not attached cost nothing beyond an identity call. Attaching one is a request only for the three marked
"requested only": hook_attn_scores and hook_probs make the attention form its T x T matrices (explicit path),
hook_entropy makes it compute the entropy (on the fused entropy kernels when nothing T x T is asked); hook_q, k,
v, z and the others leave the attention path as it is.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Callable, Iterator, Union

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


# cache accessor -> hook name relative to ``blocks.{i}.``
HOOK_NAMES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "attn_scores": "attn.hook_attn_scores",
    "probs": "attn.hook_probs", "entropy": "attn.hook_entropy", "z": "attn.hook_z", "attn_out": "hook_attn_out",
    "mlp_pre": "hook_mlp_pre", "mlp_post": "hook_mlp_post", "pre_act": "ffn.hook_pre_act",
    "post_act": "ffn.hook_post_act",
}

Names = Union[None, str, Iterable[str], Callable[[str], bool]]


def hook_point_names(model: nn.Module) -> list[str]:
    """Every hook point of ``model``, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, HookPoint)]


def name_filter(model: nn.Module, names: Names) -> Callable[[str], bool]:
    """``names`` as a predicate over hook-point names: None = all; a full name (``blocks.2.attn.hook_q``) or a
    name within the blocks (``hook_q``, ``attn.hook_q``: every layer's); or a predicate. A name that matches no
    hook point is a KeyError naming it."""
    if names is None:
        return lambda n: True
    if callable(names):
        return names
    wanted = [names] if isinstance(names, str) else list(names)
    known = hook_point_names(model)
    for w in wanted:
        if not any(n == w or n.endswith("." + w) for n in known):
            raise KeyError(f"no hook point named {w!r} (hook points: {', '.join(sorted(set(HOOK_NAMES.values())))})")
    full = {n for n in known for w in wanted if n == w or n.endswith("." + w)}
    return full.__contains__


class ActivationCache(Mapping):
    """The activations one forward pass recorded, by hook-point name (``cache["blocks.2.attn.hook_q"]``) or by
    layer through a typed accessor (``cache.q(2)``, ``cache.resid_post(0)``, ``cache.entropy(1)``); tensors are
    detached. ``cache.stack("q")`` stacks one accessor over the layers ([L, ...]); ``cache.n_layer`` layers."""

    def __init__(self, store: Mapping[str, torch.Tensor], n_layer: int):
        self._store = dict(store)
        self.n_layer = n_layer

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._store[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache (it holds {len(self._store)} activations; pass the "
                           f"name to run_with_cache(names=...), and note that pruned blocks have no FFN "
                           f"hooks)") from None

    def __iter__(self):
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations over {self.n_layer} layers)"

    def layer(self, what: str, layer: int) -> torch.Tensor:
        """Accessor ``what`` (a key of HOOK_NAMES) of layer ``layer`` (negative counts from the last)."""
        if what not in HOOK_NAMES:
            raise KeyError(f"unknown activation {what!r} (known: {', '.join(HOOK_NAMES)})")
        if not -self.n_layer <= layer < self.n_layer:
            raise IndexError(f"layer {layer} out of range for {self.n_layer} layers")
        return self[f"blocks.{layer % self.n_layer}.{HOOK_NAMES[what]}"]

    def stack(self, what: str) -> torch.Tensor:
        return torch.stack([self.layer(what, i) for i in range(self.n_layer)])

    def resid_pre(self, layer: int) -> torch.Tensor:
        return self.layer("resid_pre", layer)

    def resid_mid(self, layer: int) -> torch.Tensor:
        return self.layer("resid_mid", layer)

    def resid_post(self, layer: int) -> torch.Tensor:
        return self.layer("resid_post", layer)

    def q(self, layer: int) -> torch.Tensor:
        return self.layer("q", layer)

    def k(self, layer: int) -> torch.Tensor:
        return self.layer("k", layer)

    def v(self, layer: int) -> torch.Tensor:
        return self.layer("v", layer)

    def attn_scores(self, layer: int) -> torch.Tensor:
        return self.layer("attn_scores", layer)

    def probs(self, layer: int) -> torch.Tensor:
        return self.layer("probs", layer)

    def entropy(self, layer: int) -> torch.Tensor:
        return self.layer("entropy", layer)

    def z(self, layer: int) -> torch.Tensor:
        return self.layer("z", layer)

    def attn_out(self, layer: int) -> torch.Tensor:
        return self.layer("attn_out", layer)

    def mlp_pre(self, layer: int) -> torch.Tensor:
        return self.layer("mlp_pre", layer)

    def mlp_post(self, layer: int) -> torch.Tensor:
        return self.layer("mlp_post", layer)

    def pre_act(self, layer: int) -> torch.Tensor:
        return self.layer("pre_act", layer)

    def post_act(self, layer: int) -> torch.Tensor:
        return self.layer("post_act", layer)
