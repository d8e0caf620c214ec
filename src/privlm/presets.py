"""Paper variant names -> config fields.

A name is parsed the way the papers write it (case and spaces ignored), as ``+``-separated parts:

=====================  =========================================================================
part                   fields it sets
=====================  =========================================================================
``SM``                 softmax attention (always first); alone it means no LN and identity FFN
``SM(t)``              softmax with learnable temperature, t in R^{H x T} per layer
``LN``                 LayerNorm before attention and FFN (LN1/LN2) and the final ln_f
``G`` / ``R``          GELU / ReLU in the FFN
``LR`` ``LR(0.1)``     leaky ReLU (fixed slope, default 0.01)
``LR(layer)`` …        leaky ReLU with a learnable slope per layer (``layer``) or one global slope
``WN(p)`` / ``SN(p)``  weight / spectral normalization on placement p in qk|ffn|qk+ffn|qkv+ffn|qkvo+ffn
``ScFFN``              Eq. 8 learnable scaling, unfused linear-only FFN (d -> 4d -> d)
``ScFuFFN``            Eq. 8 scaling and a single fused d x d FFN
``FuFFN``              the fused d x d FFN without the scaling (the control of ScFuFFN's scaling)
``…^iK``               (suffix of the FFN part) prune the FFNs of the K deepest blocks (AERO)
``EReg(…)``            wrapper: the model inside, trained with the entropy regularizer
=====================  =========================================================================

Any model without ``LN`` has no LN1/LN2 and no ln_f (AERO's op counts list no LayerNorm at all);
set ``model.ln_f=true`` to keep the final LayerNorm as ReLU's Revival's code does.
"""
from __future__ import annotations

import re

from privlm.errors import ConfigError

# The canonical names of the paper's tables, in the order of the papers (used by `inspect --all`, tests, sweeps).
PAPER_PRESETS: tuple[str, ...] = (
    "SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM",
    "SM+WN(ffn)", "SM+SN(ffn)", "SM+WN(qk)", "SM+SN(qk)", "SM+WN(qk+ffn)", "SM+WN(qkv+ffn)", "SM+WN(qkvo+ffn)",
    "SM+ScFFN", "SM+ScFuFFN", "SM(t)+ScFuFFN", "SM+ScFuFFN^i6", "SM(t)+ScFuFFN^i6", "EReg(SM(t)+ScFuFFN)",
    "SM+LN+LR(0.1)", "SM+LR(layer)", "SM+LR(global)",
)

NORM_PLACEMENTS = ("qk", "ffn", "qk+ffn", "qkv+ffn", "qkvo+ffn")
_ACTIVATIONS = {"g": "gelu", "gelu": "gelu", "r": "relu", "relu": "relu"}


def normalize_name(name: str) -> str:
    return re.sub(r"\s+", "", name).lower()


def _split_parts(body: str) -> list[str]:
    """Split on '+' outside parentheses, so 'wn(qk+ffn)' stays one part."""
    parts, depth, current = [], 0, ""
    for ch in body:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "+" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def preset_fields(name: str) -> tuple[dict, dict]:
    """Return (model fields, other sections) for a paper variant name. Raises ConfigError if unknown."""
    key = normalize_name(name)
    extra: dict = {}
    ereg = re.fullmatch(r"ereg\((.*)\)", key)
    if ereg:
        key = ereg.group(1)
        extra = {"reg": {"enabled": True}}
    parts = _split_parts(key)
    fields: dict = {"norm": "none", "ln_f": False, "activation": "identity", "ffn": "standard",
                    "ffn_scaling": False, "attn_temperature": False, "weight_norm": "none",
                    "spectral_norm": "none", "ffn_prune_deepest": 0, "leaky_slope_learnable": "none"}
    head, rest = parts[0], parts[1:]
    if head not in ("sm", "sm(t)"):
        raise _unknown(name, f"it must start with SM or SM(t), not '{head}'")
    fields["attn_temperature"] = head == "sm(t)"
    for part in rest:
        fields.update(_part_fields(part, name))
    return fields, extra


def _part_fields(part: str, name: str) -> dict:
    if part == "ln":
        return {"norm": "layernorm", "ln_f": True}
    if part in _ACTIVATIONS:
        return {"activation": _ACTIVATIONS[part]}
    leaky = re.fullmatch(r"(?:lr|lrelu|leakyrelu)(?:\((.*)\))?", part)
    if leaky:
        arg = leaky.group(1)
        if arg is None:
            return {"activation": "leaky_relu"}
        if arg in ("layer", "global"):
            return {"activation": "leaky_relu", "leaky_slope_learnable": arg}
        try:
            return {"activation": "leaky_relu", "leaky_slope": float(arg)}
        except ValueError:
            raise _unknown(name, f"LR({arg}): the argument is a slope, 'layer' or 'global'") from None
    wn = re.fullmatch(r"(wn|sn|weightnorm|spectralnorm|weightnormalization|spectralnormalization)\((.*)\)", part)
    if wn:
        placement = wn.group(2)
        if placement not in NORM_PLACEMENTS:
            raise _unknown(name, f"placement '{placement}' is not one of {', '.join(NORM_PLACEMENTS)}")
        which = "weight_norm" if wn.group(1).startswith("w") else "spectral_norm"
        return {which: placement}
    ffn = re.fullmatch(r"(scffn|scfuffn|scaled\(ffn\)|fuffn)(?:\^i(\d+))?", part)
    if ffn:
        out = {"ffn_scaling": ffn.group(1) != "fuffn", "activation": "identity",
               "ffn": "fused" if ffn.group(1) in ("scfuffn", "fuffn") else "standard"}
        if ffn.group(2) is not None:
            out["ffn_prune_deepest"] = int(ffn.group(2))
        return out
    raise _unknown(name, f"unknown part '{part}'")


def _unknown(name: str, why: str) -> ConfigError:
    return ConfigError(f"unknown preset '{name}': {why}; known presets: {', '.join(PAPER_PRESETS)} "
                       f"(parts: SM, SM(t), LN, G, R, LR(x), WN(p), SN(p), ScFFN, ScFuFFN, FuFFN, ^iK, EReg(...))")


def describe(name: str) -> str:
    """One line saying what a preset changes relative to the GPT-2 baseline (for the README table)."""
    fields, extra = preset_fields(name)
    bits = []
    bits.append("LayerNorm" if fields["norm"] == "layernorm" else "no LayerNorm")
    bits.append({"identity": "linear FFN", "gelu": "GELU FFN", "relu": "ReLU FFN",
                 "leaky_relu": "leaky-ReLU FFN"}[fields["activation"]])
    if fields["ffn"] == "fused":
        bits.append("fused d×d FFN")
    if fields["ffn_scaling"]:
        bits.append("Eq. 8 α/β scaling")
    if fields["ffn_prune_deepest"]:
        bits.append(f"FFN pruned in the {fields['ffn_prune_deepest']} deepest blocks")
    for which in ("weight_norm", "spectral_norm"):
        if fields[which] != "none":
            bits.append(f"{'WN' if which == 'weight_norm' else 'SN'} on {fields[which]}")
    if fields["attn_temperature"]:
        bits.append("learnable temperature t∈R^{H×T}")
    if fields["leaky_slope_learnable"] != "none":
        bits.append(f"learnable slope ({fields['leaky_slope_learnable']})")
    if extra.get("reg", {}).get("enabled"):
        bits.append("entropy regularizer")
    return ", ".join(bits)
