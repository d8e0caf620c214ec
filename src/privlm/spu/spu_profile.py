"""SPU profiles: named bundles of SPU runtime settings, compiler options and kernel choices.

A profile is a JSON file ``src/privlm/spu/spu_profiles/<name>.json`` (format ``privlm-spu-profile/1``)::

    {"format": "privlm-spu-profile/1", "name": ..., "description": ...,
     "runtime":  {RuntimeConfig fields in protobuf JSON, merged over the base settings below},
     "compiler": {CompilerOptions attributes},
     "kernels":  {"softmax": ..., "gelu": ..., "layernorm": ..., "rmsnorm": ..., "silu": ..., "gate_product": ...},
                 names from privlm.spu.kernels.KERNELS
     "why": {setting: the measurement that chose it}}

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
from typing import Any

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

    def runtime_config(self, protocol: str, link_profile: bool = False):
        """SPU RuntimeConfig for ``protocol`` ('cheetah' | 'semi2k'): base settings, then this profile's.

        link_profile sets enable_pphlo_profile, which makes every run log its 'Link details' (the byte
        counter `privlm.spu.linkstats` reads)."""
        import spu.libspu as libspu

        doc = {**BASE_RUNTIME, **self.runtime, "protocol": protocol.upper(),
               "enable_pphlo_profile": bool(link_profile)}
        cfg = libspu.RuntimeConfig()
        if not cfg.ParseFromJsonString(json.dumps(doc)):
            raise ValueError(f"SPU profile '{self.name}': runtime settings are not a valid RuntimeConfig: {doc}")
        return cfg

    def compiler_options(self):
        import spu.libspu as libspu

        opts = libspu.CompilerOptions()
        for key, value in self.compiler.items():
            if not hasattr(opts, key):
                raise ValueError(f"SPU profile '{self.name}': CompilerOptions has no option '{key}'")
            setattr(opts, key, value)
        return opts

    def to_dict(self) -> dict:
        return {"name": self.name, "runtime": {**BASE_RUNTIME, **self.runtime}, "compiler": dict(self.compiler),
                "kernels": dict(self.kernels)}


def available_spu_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_spu_profile(name: str) -> SPUProfile:
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        raise UnknownSPUProfile(f"unknown SPU profile '{name}' (known: {', '.join(available_spu_profiles())})")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("name") != name:
        raise ValueError(f"{path}: not a privlm SPU profile named '{name}' (format {raw.get('format')!r})")
    kernels = dict(raw.get("kernels", {}))
    missing = [op for op in REQUIRED_KERNEL_OPS if op not in kernels]
    if missing:
        raise ValueError(f"{path}: kernels for {missing} are missing")
    return SPUProfile(name=name, description=raw.get("description", ""), runtime=dict(raw.get("runtime", {})),
                      compiler=dict(raw.get("compiler", {})), kernels=kernels, why=dict(raw.get("why", {})))


def add_spu_profile_arg(parser) -> None:
    """The ``--spu-profile NAME`` option of the commands that run SPU."""
    parser.add_argument("--spu-profile", default=DEFAULT, metavar="NAME",
                        help=f"SPU runtime settings, compiler options and kernels (known: "
                             f"{', '.join(available_spu_profiles())}; see docs/pi-measured.md)")


def check_spu_profile(name: str) -> str:
    """The name, if an SPU profile of that name exists; else a one-line error listing the known ones."""
    from privlm.errors import PrivlmError
    try:
        load_spu_profile(name)
    except UnknownSPUProfile as exc:
        raise PrivlmError(str(exc)) from None
    return name
