"""`privlm inspect PRESET|CONFIG.yaml|HF_MODEL [key=value ...] [--json] [--all]`: resolved config, parameter
counts per module group, the special (scale / temperature / slope) parameters and the module tree; for a
Hugging Face model (a save_pretrained directory or hf:<hub id>; only its config.json is read) its family,
sizes, the blocks' ingredients, parameter counts and the nonlinear ops the census finds at T=128."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from privlm.config import ConfigError, load_config, split_spec, to_yaml
from privlm.presets import PAPER_PRESETS, describe

if TYPE_CHECKING:
    from privlm.model import GPT


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
    import torch

    from privlm.model import GPT

    cfg = load_config(spec, overrides)
    with torch.device("meta"):  # shapes only: no memory, instant even at GPT-2 size
        model = GPT(cfg.model)
    real_for_values = None
    specials = []
    if any(k in n for n, _ in model.named_parameters() for k in ("alpha", "beta", "temperature", "slope")):
        from privlm.validate import check_model_fits
        check_model_fits(cfg.model)
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


def hf_inspect_report(spec: str) -> dict:
    """What `privlm inspect` shows of a Hugging Face model, built from its config on the meta device."""
    from torch import nn

    from privlm.hfmodel import build_model, load_config, shape_of
    from privlm.pi import census

    config, path, family = load_config(spec)
    model = build_model(config)
    shape = shape_of(config)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    groups: dict[str, int] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if module is head and shape["tied"]:
                continue  # the tied head is the embedding matrix
            parts = mod_name.split(".")
            group = ("token embedding" if module is embed else "lm_head" if module is head
                     else "attention" if family.attn in parts else "mlp" if family.mlp in parts
                     else "position embedding" if isinstance(module, nn.Embedding)
                     else "norms" if "norm" in type(module).__name__.lower() else "other")
            groups[group] = groups.get(group, 0) + p.numel()
    T = min(128, shape["max_positions"] or 128)
    c = census(model, T)
    norm = next((type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()), None)
    return {
        "model": spec, "path": str(path), "family": family.name, "model_type": config.model_type,
        "architecture": type(model).__name__, "shape": shape, "norm": norm,
        "activation": getattr(config, "hidden_act", None) or getattr(config, "activation_function", None),
        "gated_mlp": any(o.op == "gate_product" for o in c.ops),
        "rotary_dims": next((o.shape[1] // (shape["n_head"] + shape["n_kv_head"]) for o in c.ops if o.op == "rotary"),
                            None),
        "parameters": {"total": sum(groups.values()), "by_group": groups},
        "census": {"T": T, "nonlinear": c.nonlinear_label(paper_only=False), "notes": c.notes},
        "module_tree": repr(model),
    }


def _print_hf(rep: dict) -> None:
    s = rep["shape"]
    print(f"== {rep['model']}: {rep['family']} ({rep['architecture']}, model_type {rep['model_type']})")
    print(f"-- layers {s['n_layer']}, heads {s['n_head']} (key/value heads {s['n_kv_head']}), width {s['n_embd']}, "
          f"head dim {s['head_dim']}, MLP {s['ffn_hidden']}{' (gated)' if rep['gated_mlp'] else ''}, vocabulary "
          f"{s['vocab_size']}, positions {s['max_positions']}, {'tied' if s['tied'] else 'untied'} LM head")
    print(f"-- norm {rep['norm']}, activation {rep['activation']}, rotary dims per head "
          f"{rep['rotary_dims'] if rep['rotary_dims'] is not None else 'none (learned positions)'}")
    print(f"-- parameters: {rep['parameters']['total']:,}")
    for group, n in sorted(rep["parameters"]["by_group"].items(), key=lambda kv: -kv[1]):
        print(f"   {group:<28} {n:>14,}")
    print(f"-- nonlinear ops at T={rep['census']['T']}: {rep['census']['nonlinear']}")
    for note in rep["census"]["notes"]:
        print(f"   {note}")
    print("-- module tree")
    print(rep["module_tree"])


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
    from privlm.hfmodel import check_model_dir, is_hf_spec

    if args.spec is not None:
        check_model_dir(args.spec)
    if args.spec is not None and is_hf_spec(args.spec) and not args.all:
        if args.overrides:
            raise ConfigError(f"key=value overrides apply to privlm presets, not to the Hugging Face model '{args.spec}'")
        rep = hf_inspect_report(args.spec)
        print(json.dumps(rep, indent=2)) if args.json else _print_hf(rep)
        return 0
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
    p = sub.add_parser("inspect", description=__doc__)
    p.add_argument("spec", nargs="?", default=None,
                   help="preset name (e.g. 'SM(t)+ScFuFFN'), YAML config, or a Hugging Face model (directory or hf:<id>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.n_layer=12")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="one line per paper preset")
    p.set_defaults(func=run)
