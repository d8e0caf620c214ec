"""SPU profiles: named bundles of SPU runtime settings, compiler options and kernel choices.

A profile is a JSON file ``src/privlm/spu/spu_profiles/<name>.json`` (format ``privlm-spu-profile/1``)::

    {"format": "privlm-spu-profile/1", "name": ..., "description": ...,
     "runtime":  {RuntimeConfig fields in protobuf JSON, merged over the base settings below},
     "compiler": {CompilerOptions attributes},
     "kernels":  {"softmax": ..., "gelu": ..., "layernorm": ..., "rmsnorm": ..., "silu": ..., "gate_product": ...},
                 names from privlm.spu.kernels.KERNELS
     "rings":    {op: {"field": "FM32", "fxp_fraction_bits": 12, ...}}  (optional: the kernel's elementwise
                 stage runs in another ring, with these runtime settings over the profile's)
     "why": {setting: the measurement that chose it}}

``rings`` names the ops whose kernel runs in a smaller ring than the rest of the forward (Bumblebee-class
engines evaluate activations in a 32-bit ring). SPU 0.9.5 fixes the ring per runtime and has no arithmetic
share conversion between rings, so such a profile is measured per op (`privlm.spu.microbench`: the kernel in a
runtime of its own ring, plus the two conversions each element needs — see `RING_CONVERSIONS` there) and
costed (`privlm cost`), but cannot run a whole forward (`check_spu_profile(name, whole_program=True)` refuses
it with one line). Renamed profiles (`RENAMED`) are refused with a one-line hint naming the new name.

Every party, micro-benchmark and calibration builds its SPU configuration from one profile, so a
measurement always names the engine it ran on. The base settings are not a profile's choice: the 64-bit
ring with 18 fraction bits (SPU's default), and colocated optimisation, which is what keeps an input
private to its owner (the server's weights, the client's one-hot prompt): SPU drops the owner of a
share without it, and the weights would have to be secret-shared to the client.

Imports only the standard library until a config is built, so the main environment can list and
validate names without spu installed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

FORMAT = "privlm-spu-profile/1"
PROFILE_DIR = Path(__file__).parent / "spu_profiles"
DEFAULT = "default"
BASE_RUNTIME: dict[str, Any] = {
    "field": "FM64",
    "fxp_fraction_bits": 18,
    "experimental_enable_colocated_optimization": True,
    "share_max_chunk_size": 16 << 20,
}
KERNEL_OPS = ("softmax", "gelu", "layernorm", "rmsnorm", "silu", "gate_product")
REQUIRED_KERNEL_OPS = ("softmax", "gelu", "layernorm")  # the others default to kernels.DEFAULT_KERNELS


# Old profile names: refused with a hint rather than kept as aliases, so that no measurement is filed under a
# name that says something else (docs/DECISIONS.md#spu-profiles-named-for-what-they-are).
RENAMED: dict[str, str] = {
    "bumblebee": "SPU profile 'bumblebee' is now 'puma' (its GELU is PUMA-style piecewise at FM64, not "
                 "Bumblebee's engine); Bumblebee-class kernels in a 32-bit ring are 'bumblebee-ring32'",
}


class UnknownSPUProfile(ValueError):
    """An SPU profile name that has no file (the message lists the known ones)."""


@dataclass(frozen=True)
class SPUProfile:
    name: str
    description: str
    runtime: dict[str, Any]
    compiler: dict[str, Any]
    kernels: dict[str, str]
    why: dict[str, str] = field(default_factory=dict)
    rings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def ring_of(self, op: str) -> Optional[dict[str, Any]]:
        """The runtime overrides (field, fraction bits) of ``op``'s kernel when it runs in another ring."""
        return self.rings.get(op)

    def runtime_doc(self, op: Optional[str] = None) -> dict[str, Any]:
        """Base settings, this profile's, then ``op``'s ring (if the op's kernel runs in another ring)."""
        return {**BASE_RUNTIME, **self.runtime, **(self.rings.get(op, {}) if op is not None else {})}

    def runtime_config(self, protocol: str, link_profile: bool = False, op: Optional[str] = None):
        """SPU RuntimeConfig for ``protocol`` ('cheetah' | 'semi2k'): base settings, then this profile's, then
        ``op``'s ring when given.

        link_profile sets enable_pphlo_profile, which makes every run log its 'Link details' (the byte
        counter `privlm.spu.linkstats` reads)."""
        import spu.libspu as libspu

        doc = {**self.runtime_doc(op), "protocol": protocol.upper(), "enable_pphlo_profile": bool(link_profile)}
        cfg = libspu.RuntimeConfig()
        if not cfg.ParseFromJsonString(json.dumps(doc)):
            raise ValueError(f"SPU profile '{self.name}': runtime settings are not a valid RuntimeConfig: {doc}")
        return cfg

    def taylor_exp_iters(self, protocol: str = "cheetah") -> Optional[int]:
        """The squarings of SPU's Taylor exp in the forward's ring under this profile (None when its exp mode
        is another approximation): what `privlm.spu.kernels.exp` writes as products for small tensors."""
        import spu.libspu as libspu

        cfg = self.runtime_config(protocol)
        taylor = (libspu.RuntimeConfig.ExpMode.EXP_DEFAULT, libspu.RuntimeConfig.ExpMode.EXP_TAYLOR)
        if cfg.fxp_exp_mode not in taylor:
            return None
        return int(cfg.fxp_exp_iters) or 8  # 0: SPU's default (libspu/core/config.cc populates 8)

    def compiler_options(self):
        import spu.libspu as libspu

        opts = libspu.CompilerOptions()
        for key, value in self.compiler.items():
            if not hasattr(opts, key):
                raise ValueError(f"SPU profile '{self.name}': CompilerOptions has no option '{key}'")
            setattr(opts, key, value)
        return opts

    def to_dict(self) -> dict:
        d = {"name": self.name, "runtime": {**BASE_RUNTIME, **self.runtime}, "compiler": dict(self.compiler),
             "kernels": dict(self.kernels)}
        if self.rings:
            d["rings"] = {op: dict(r) for op, r in self.rings.items()}
        return d


def available_spu_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_spu_profile(name: str) -> SPUProfile:
    path = PROFILE_DIR / f"{name}.json"
    if name in RENAMED:
        raise UnknownSPUProfile(RENAMED[name])
    if not path.is_file():
        raise UnknownSPUProfile(f"unknown SPU profile '{name}' (known: {', '.join(available_spu_profiles())})")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("name") != name:
        raise ValueError(f"{path}: not a privlm SPU profile named '{name}' (format {raw.get('format')!r})")
    kernels = dict(raw.get("kernels", {}))
    missing = [op for op in REQUIRED_KERNEL_OPS if op not in kernels]
    if missing:
        raise ValueError(f"{path}: kernels for {missing} are missing")
    rings = {op: dict(r) for op, r in raw.get("rings", {}).items()}
    if len({json.dumps(r, sort_keys=True) for r in rings.values()}) > 1:
        raise ValueError(f"{path}: every op in 'rings' must use the same ring settings (one extra runtime)")
    bad = [op for op in rings if op not in KERNEL_OPS or "field" not in rings[op]]
    if bad:
        raise ValueError(f"{path}: rings of {bad}: only kernel ops ({', '.join(KERNEL_OPS)}), each with a 'field'")
    return SPUProfile(name=name, description=raw.get("description", ""), runtime=dict(raw.get("runtime", {})),
                      compiler=dict(raw.get("compiler", {})), kernels=kernels, why=dict(raw.get("why", {})),
                      rings=rings)


def cost_profile_name(spu_profile: str) -> str:
    """The cost profile `privlm pi calibrate` writes for an SPU profile (and `privlm cost --spu-profile` reads)."""
    return "spu-cheetah-measured" if spu_profile == DEFAULT else f"spu-{spu_profile}-measured"


def add_spu_profile_arg(parser) -> None:
    """The ``--spu-profile NAME`` option of the commands that run SPU."""
    parser.add_argument("--spu-profile", default=DEFAULT, metavar="NAME",
                        help=f"SPU runtime settings, compiler options and kernels (known: "
                             f"{', '.join(available_spu_profiles())}; see docs/pi-measured.md)")


def check_spu_profile(name: str, whole_program: bool = True) -> str:
    """The name, if an SPU profile of that name exists; else a one-line error listing the known ones (or
    naming a renamed profile's new name). With ``whole_program`` (pi run/eval/measure) a profile whose kernels
    run in another ring is refused too: SPU 0.9.5 cannot convert shares between rings inside one program."""
    from privlm.errors import PrivlmError
    try:
        prof = load_spu_profile(name)
    except UnknownSPUProfile as exc:
        raise PrivlmError(str(exc)) from None
    if whole_program and prof.rings:
        ops = ", ".join(f"{op} in {r.get('field', 'FM64')}" for op, r in prof.rings.items())
        raise PrivlmError(f"SPU profile '{name}' runs {ops}, and SPU 0.9.5 cannot convert shares between rings "
                          f"inside one program: it is measured per op (privlm pi calibrate --spu-profile {name}) "
                          f"and costed (privlm cost --spu-profile {name}), not run end to end")
    return name
