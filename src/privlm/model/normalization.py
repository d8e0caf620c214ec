"""Activation normalization (LayerNorm or identity) and the PI-free weight normalizations of docs/DECISIONS.md#weight-and-spectral-normalization."""
from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from privlm.config import ModelConfig

# Placement name -> the projections it covers (names of the nn.Linear attributes in Attention / FFN).
PLACEMENT_TARGETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "qk": ("q_proj", "k_proj"),
    "ffn": ("ffn",),
    "qk+ffn": ("q_proj", "k_proj", "ffn"),
    "qkv+ffn": ("q_proj", "k_proj", "v_proj", "ffn"),
    "qkvo+ffn": ("q_proj", "k_proj", "v_proj", "o_proj", "ffn"),
}


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LN1/LN2 of a block: LayerNorm, or identity in the LN-free variants (the residuals stay)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
    return nn.Identity()


def apply_weight_normalization(block: nn.Module, cfg: ModelConfig) -> None:
    """Wrap the named projections of one block with torch's weight_norm / spectral_norm parametrizations.

    WN: W = g * V / ||V|| per output unit (dim 0 of nn.Linear's [out, in] weight).
    SN: W / sigma(W), sigma estimated by one power iteration per training step (torch default).
    """
    for kind, placement in (("weight_norm", cfg.weight_norm), ("spectral_norm", cfg.spectral_norm)):
        targets = PLACEMENT_TARGETS[placement]
        for target in targets:
            for linear in _linears(block, target):
                if kind == "weight_norm":
                    weight_norm(linear, name="weight", dim=0)
                    linear.no_weight_decay = _weight_norm_gain
                else:
                    spectral_norm(linear, name="weight")


def _weight_norm_gain() -> set[str]:
    """``no_weight_decay`` of a weight-normalized linear: its gain g ([out, 1], torch's ``original0``) is a
    per-unit scale like a norm gain; the direction v (``original1``) is the weight that decays."""
    return {"parametrizations.weight.original0"}


def _linears(block: nn.Module, target: str) -> list[nn.Linear]:
    if target == "ffn":
        ffn = getattr(block, "ffn", None)
        return [m for m in ffn.modules() if isinstance(m, nn.Linear)] if ffn is not None else []
    return [getattr(block.attn, target)]
