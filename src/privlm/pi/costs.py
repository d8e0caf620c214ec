"""Cost profiles (data files) and the linear PI cost model: Comm (GB) and latency (minutes) of a census.

A profile is a JSON file in the format ``privlm-pi-cost-profile/1``, documented in full in docs/pi-cost.md
and in the ``_format`` key of every shipped profile. A profile name is looked up in the user's profile
directory (``$PRIVLM_HOME/profiles``, default ``~/.privlm/profiles``, where `save_profile` and ``privlm pi
calibrate`` write) and then among the read-only profiles shipped in the package (``privlm/pi/profiles``);
a user profile with a shipped name shadows it. Any path to a ``.json`` file works too.

Costs combine linearly (docs/DECISIONS.md#private-inference-cost-model):

    cost = Σ_op  elements(op)·per_element(op) + count(op)·per_call(op)        nonlinear ops of the census
         + Σ_k   GFLOPs_k·per_gflop(k),  k in {ffn, attn, embed_head}          linear layers
         + T·(per_token + V·per_token_per_vocab)                                embeddings, head, misc.
         + fixed                                                                 per-inference setup

for bytes and seconds alike. GB means 10⁹ bytes, latency is reported in minutes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from privlm.config import ConfigError
from privlm.fileio import atomic_write_text
from privlm.opschema import COST_PROFILE_FORMAT, LINEAR_KINDS, OP_TYPES

if TYPE_CHECKING:  # annotations only: `privlm cost --help` lists the profiles without importing torch
    from privlm.pi.census import Census

SHIPPED_PROFILE_DIR = Path(__file__).parent / "profiles"  # package data: read-only at run time
_OP_FIELDS = ("bytes_per_element", "seconds_per_element", "bytes_per_call", "seconds_per_call",
              "rounds_per_call", "messages_per_call")
_LINEAR_FIELDS = ("bytes_per_gflop", "seconds_per_gflop")
_TOKEN_FIELDS = ("bytes", "seconds", "bytes_per_vocab", "seconds_per_vocab")
_FIXED_FIELDS = ("bytes", "seconds")


@dataclass(frozen=True)
class OpCost:
    bytes_per_element: float = 0.0
    seconds_per_element: float = 0.0
    bytes_per_call: float = 0.0  # one call = one counted instance of the census (one head's T x T softmax, ...)
    seconds_per_call: float = 0.0
    rounds_per_call: Optional[float] = None  # informational: communication rounds of one call
    messages_per_call: Optional[float] = None


@dataclass(frozen=True)
class Profile:
    name: str
    nonlinear: dict[str, OpCost]
    linear: dict[str, tuple[float, float]]  # kind -> (bytes per GFLOP, seconds per GFLOP)
    per_token: dict[str, float]  # bytes, seconds, bytes_per_vocab, seconds_per_vocab
    fixed: dict[str, float]  # bytes, seconds
    flop_convention: str  # "paper" or "dense": which census FLOPs the per-GFLOP costs apply to
    final_layernorm: str  # "counted" (ln_f charged as a layernorm op) or "in_per_token" (absorbed)
    network: dict[str, Any]
    provenance: dict[str, Any]
    description: str = ""
    # op sets whose total cost the profile's data pins down; None = every set (e.g. a per-op measurement)
    identified_op_sets: Optional[tuple[frozenset, ...]] = None
    path: Optional[str] = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Cost:
    """Predicted cost of one census under one profile; ``breakdown`` maps component -> {gb, min}."""

    arch: str
    T: int
    profile: str
    comm_gb: float
    lat_min: float
    breakdown: dict[str, dict[str, float]]
    rounds: Optional[float] = None
    warnings: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # census ops the profile has no figure for (not in totals)

    @property
    def complete(self) -> bool:
        """False when some op had no figure: comm_gb and lat_min are then lower bounds."""
        return not self.unknown

    def to_dict(self) -> dict:
        return {"arch": self.arch, "T": self.T, "profile": self.profile, "comm_gb": self.comm_gb,
                "lat_min": self.lat_min, "breakdown": self.breakdown, "rounds": self.rounds,
                "warnings": list(self.warnings), "unknown": list(self.unknown), "complete": self.complete}


# ----------------------------------------------------------------------------------------
def user_profile_dir() -> Path:
    """Where calibrated and user profiles live: ``$PRIVLM_HOME/profiles`` (default ``~/.privlm/profiles``)."""
    return Path(os.environ.get("PRIVLM_HOME") or "~/.privlm").expanduser() / "profiles"


def profile_paths() -> dict[str, Path]:
    """Profile name -> the file `load_profile` reads for it: user profiles shadow shipped ones."""
    found = {p.stem: p for p in SHIPPED_PROFILE_DIR.glob("*.json")}
    found |= {p.stem: p for p in user_profile_dir().glob("*.json")}
    return dict(sorted(found.items()))


def shadowed_profiles() -> list[str]:
    """Shipped profile names that a user profile of the same name replaces."""
    return [n for n, p in profile_paths().items() if (SHIPPED_PROFILE_DIR / p.name).is_file()
            and p.parent != SHIPPED_PROFILE_DIR]


def available_profiles() -> list[str]:
    return list(profile_paths())


def load_profile(name_or_path: Union[str, Path, Profile] = "paper-fit") -> Profile:
    """Read a profile by name (user directory first, then shipped) or path; ConfigError on anything malformed."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = profile_paths().get(str(name_or_path), path)
    if not path.is_file():
        raise ConfigError(f"cost profile '{name_or_path}' not found; available: {', '.join(available_profiles())} "
                          f"(or a path to a .json profile)")
    from privlm.validate import read_json
    return parse_profile(read_json(path, {}, error=ConfigError), str(path))


def parse_profile(raw: dict, origin: str = "<dict>") -> Profile:
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"cost profile '{origin}': {msg}")

    if not isinstance(raw, dict) or raw.get("format") != COST_PROFILE_FORMAT:
        raise fail(f"'format' must be '{COST_PROFILE_FORMAT}'")
    for key in ("name", "nonlinear", "linear", "per_token", "network", "provenance", "conventions"):
        if key not in raw:
            raise fail(f"missing key '{key}'")

    def numbers(section: dict, allowed: tuple[str, ...], where: str, optional=()) -> dict[str, Any]:
        if not isinstance(section, dict):
            raise fail(f"'{where}' must be an object")
        out = {}
        for k, v in section.items():
            if k.startswith("_"):
                continue  # comments
            if k not in allowed:
                raise fail(f"unknown key '{where}.{k}'; allowed: {', '.join(allowed)}")
            if v is None and k in optional:
                out[k] = None
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or v != v:
                raise fail(f"'{where}.{k}'={v!r} must be a non-negative number")
            out[k] = float(v)
        return out

    nonlinear = {}
    for op, section in raw["nonlinear"].items():
        if op.startswith("_"):
            continue
        if op not in OP_TYPES:
            raise fail(f"unknown nonlinear op '{op}'; known: {', '.join(OP_TYPES)}")
        nonlinear[op] = OpCost(**numbers(section, _OP_FIELDS, f"nonlinear.{op}",
                                         optional=("rounds_per_call", "messages_per_call")))
    linear = {}
    for kind, section in raw["linear"].items():
        if kind.startswith("_"):
            continue
        if kind not in LINEAR_KINDS:
            raise fail(f"unknown linear kind '{kind}'; known: {', '.join(LINEAR_KINDS)}")
        vals = numbers(section, _LINEAR_FIELDS, f"linear.{kind}")
        linear[kind] = (vals.get("bytes_per_gflop", 0.0), vals.get("seconds_per_gflop", 0.0))
    per_token = {k: 0.0 for k in _TOKEN_FIELDS} | numbers(raw["per_token"], _TOKEN_FIELDS, "per_token")
    fixed = {k: 0.0 for k in _FIXED_FIELDS} | numbers(raw.get("fixed", {}), _FIXED_FIELDS, "fixed")
    conv = raw["conventions"]
    flop_convention = conv.get("flops")
    if flop_convention not in ("paper", "dense"):
        raise fail(f"'conventions.flops'={flop_convention!r} must be 'paper' or 'dense'")
    final_ln = conv.get("final_layernorm")
    if final_ln not in ("counted", "in_per_token"):
        raise fail(f"'conventions.final_layernorm'={final_ln!r} must be 'counted' or 'in_per_token'")
    sets = raw.get("identified_op_sets")
    if sets is not None and (not isinstance(sets, list) or any(
            not isinstance(g, list) or not set(g) <= set(OP_TYPES) for g in sets)):
        raise fail(f"'identified_op_sets' must be null or a list of lists of op names from {', '.join(OP_TYPES)}")
    identified = None if sets is None else tuple(frozenset(g) for g in sets)
    return Profile(name=str(raw["name"]), identified_op_sets=identified, nonlinear=nonlinear,
                   linear=linear, per_token=per_token, fixed=fixed,
                   flop_convention=flop_convention, final_layernorm=final_ln, network=dict(raw["network"]),
                   provenance=dict(raw["provenance"]), description=str(raw.get("description", "")),
                   path=origin, raw=raw)


def default_profile_path(name: str) -> Path:
    """Where `save_profile` writes profile ``name`` when given no path: the user profile directory."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"cost profile name {name!r} must be a plain file name (no directories, no leading dot)")
    return user_profile_dir() / f"{name}.json"


def save_profile(raw: dict, path: Union[str, Path, None] = None, overwrite: bool = False) -> Path:
    """Validate ``raw`` exactly as `load_profile` will, then write it atomically (default: the user profile
    directory, `default_profile_path`); never clobbers an existing file unless ``overwrite``. The writer of
    every profile: ``privlm pi calibrate`` and the paper fit alike."""
    parse_profile(raw, str(path or raw.get("name")))
    path = Path(path) if path is not None else default_profile_path(str(raw["name"]))
    if path.exists() and not overwrite:
        raise ConfigError(f"cost profile '{path}' already exists; pass overwrite=True to replace it")
    atomic_write_text(path, json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
    return path


# Ops of Hugging Face families charged at the figure of the paper op that computes the same thing when a
# profile has no figure of their own (docs/pi-cost.md): RMSNorm is LayerNorm without the mean (a linear
# step): the same squares, one reciprocal square root per row and the same products; SiLU x*sigmoid(x)
# is a smooth activation evaluated, like GELU, by piecewise polynomials. The SwiGLU gate's product and
# rotary embeddings have no such stand-in: without a figure they are unknown.
COST_PROXIES: dict[str, str] = {"rmsnorm": "layernorm", "silu": "gelu"}


# ----------------------------------------------------------------------------------------
def predict(c: Census, profile: Union[str, Path, Profile] = "paper-fit", unknown: str = "error") -> Cost:
    """Linear cost model: Comm in GB (10⁹ bytes) and latency in minutes, with a breakdown.

    An op the profile has no figure for (directly or through `COST_PROXIES`) is a ConfigError with
    ``unknown="error"``; with ``unknown="report"`` it is listed in ``Cost.unknown`` (breakdown entry None,
    totals are lower bounds), never charged as zero.
    """
    if unknown not in ("error", "report"):
        raise ValueError(f"unknown={unknown!r}: use 'error' or 'report'")
    prof = load_profile(profile)
    parts: dict[str, list[float]] = {}  # component -> [bytes, seconds]
    rounds: Optional[float] = 0.0
    missing: list[str] = []
    notes: list[str] = []
    for o in c.ops:
        if o.where == "final" and prof.final_layernorm == "in_per_token":
            continue  # the profile's per-token constant already carries ln_f (paper convention)
        key = o.op if o.where != "final" else f"{o.op} (final)"
        cost = prof.nonlinear.get(o.op)
        if cost is None and o.op in COST_PROXIES and COST_PROXIES[o.op] in prof.nonlinear:
            cost = prof.nonlinear[COST_PROXIES[o.op]]
            note = f"{o.op} charged at the profile's {COST_PROXIES[o.op]} figure (docs/pi-cost.md)"
            notes += [note] if note not in notes else []
        if cost is None:
            if unknown == "error":
                raise ConfigError(f"cost profile '{prof.name}' has no cost for nonlinear op '{o.op}' "
                                  f"(needed by {c.arch}); it covers: {', '.join(prof.nonlinear)}")
            missing += [key] if key not in missing else []
            rounds = None
            continue
        if key == "layernorm (final)":
            key = "layernorm (ln_f)"
        acc = parts.setdefault(key, [0.0, 0.0])
        acc[0] += o.elements * cost.bytes_per_element + o.count * cost.bytes_per_call
        acc[1] += o.elements * cost.seconds_per_element + o.count * cost.seconds_per_call
        if rounds is not None:
            rounds = None if cost.rounds_per_call is None else rounds + o.count * cost.rounds_per_call
    gflops = c.flops_by(prof.flop_convention)
    for kind in LINEAR_KINDS:
        b, s = prof.linear.get(kind, (0.0, 0.0))
        g = gflops[kind] / 1e9
        parts[kind] = [g * b, g * s]
    pt = prof.per_token
    parts["per_token"] = [c.T * (pt["bytes"] + c.vocab_size * pt["bytes_per_vocab"]),
                          c.T * (pt["seconds"] + c.vocab_size * pt["seconds_per_vocab"])]
    parts["fixed"] = [prof.fixed["bytes"], prof.fixed["seconds"]]
    present = frozenset(o.op for o in c.ops if o.where != "final")
    warnings = []
    if prof.identified_op_sets is not None and present not in prof.identified_op_sets:
        order = {op: i for i, op in enumerate(OP_TYPES)}
        warnings.append(f"profile '{prof.name}' is only identified for the op sets of its data "
                        f"({'; '.join('+'.join(sorted(g, key=order.get)) for g in prof.identified_op_sets)}); "
                        f"{c.arch} has {'+'.join(sorted(present, key=order.get)) or 'no nonlinear op'}, so its "
                        f"per-op split is an extrapolation")
    warnings += notes
    if missing:
        warnings.append(f"profile '{prof.name}' has no figure for {', '.join(missing)} of {c.arch}: unknown, not "
                        f"in the totals, which are lower bounds")
    breakdown = {k: {"gb": v[0] / 1e9, "min": v[1] / 60} for k, v in parts.items()}
    return Cost(arch=c.arch, T=c.T, profile=prof.name,
                comm_gb=sum(v["gb"] for v in breakdown.values()),
                lat_min=sum(v["min"] for v in breakdown.values()),
                breakdown=breakdown | {k: {"gb": None, "min": None} for k in missing}, rounds=rounds,
                warnings=warnings, unknown=missing)
