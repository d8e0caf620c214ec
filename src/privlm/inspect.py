"""`privlm inspect PRESET|CONFIG.yaml [key=value ...] [--json] [--all]`: resolved config, parameter
counts per module group, the special (scale / temperature / slope) parameters and the module tree."""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from privlm.config import load_config, split_spec, to_yaml
from privlm.model import GPT
from privlm.presets import PAPER_PRESETS, describe


def special_parameters(model: GPT) -> list[dict]:
    """Eq. 8 scales, SM(t) temperatures and learnable slopes, with shape and value summary."""
    rows = []
    for name, p in model.named_parameters():
        if p.ndim <= 2 and any(k in name for k in ("alpha", "beta", "temperature", "slope")):
            t = p.detach().float()
            rows.append({"name": name, "shape": list(p.shape), "mean": t.mean().item(),
                         "min": t.min().item(), "max": t.max().item()})
    return rows


def inspect_report(spec: str, overrides: list[str]) -> dict:
    cfg = load_config(spec, overrides)
    with torch.device("meta"):  # shapes only: no memory, instant even at GPT-2 size
        model = GPT(cfg.model)
    real_for_values = None
    specials = []
    if any(k in n for n, _ in model.named_parameters() for k in ("alpha", "beta", "temperature", "slope")):
        torch.manual_seed(0)
        real_for_values = GPT(cfg.model)
        specials = special_parameters(real_for_values)
    return {
        "preset": cfg.model.preset,
        "description": describe(cfg.model.preset),
        "config": dataclasses.asdict(cfg),
        "parameters": {"total": model.num_params(), "by_group": model.param_groups()},
        "special_parameters": specials,
        "ffn_layers": cfg.model.ffn_layers(),
        "module_tree": repr(model),
        "_yaml": to_yaml(cfg),
    }


def _print_human(rep: dict) -> None:
    print(f"== {rep['preset']}: {rep['description']}")
    print("-- resolved config")
    print(rep["_yaml"].rstrip())
    print(f"-- parameters: {rep['parameters']['total']:,}")
    for group, n in sorted(rep["parameters"]["by_group"].items(), key=lambda kv: -kv[1]):
        print(f"   {group:<28} {n:>14,}")
    if rep["special_parameters"]:
        print("-- scale / temperature / slope parameters (at init)")
        for row in rep["special_parameters"]:
            print(f"   {row['name']:<36} shape={row['shape']!s:<12} mean={row['mean']:.4g} "
                  f"min={row['min']:.4g} max={row['max']:.4g}")
    print(f"-- blocks with an FFN: {rep['ffn_layers']}")
    print("-- module tree")
    print(rep["module_tree"])


def run(args: argparse.Namespace) -> int:
    spec, overrides = split_spec(args.spec, args.overrides)
    specs = list(PAPER_PRESETS) if args.all else [spec]
    reports = [inspect_report(spec, overrides) for spec in specs]
    if args.json:
        for rep in reports:
            rep.pop("_yaml")
        print(json.dumps(reports if args.all else reports[0], indent=2))
        return 0
    if args.all:
        print(f"{'preset':<22} {'params':>12}  what changes vs GPT-2")
        for rep in reports:
            print(f"{rep['preset']:<22} {rep['parameters']['total']:>12,}  {rep['description']}")
        return 0
    _print_human(reports[0])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a preset's resolved config, parameter counts and modules",
                       description=__doc__)
    p.add_argument("spec", nargs="?", default=None, help="preset name (e.g. 'SM(t)+ScFuFFN') or YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=12")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="one line per paper preset")
    p.set_defaults(func=run)
