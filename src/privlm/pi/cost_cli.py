"""`privlm cost`: PI cost of presets / run directories in the layout of the paper's Table 3, and the
published tables beside privlm's predictions.

    privlm cost SM+ScFuFFN --vs SM+LN+G                 # GPT-2 size, T=128, profile paper-fit
    privlm cost SM+LN+G SM+LN+R SM+ScFuFFN --T 256 model.n_layer=18 --format md
    privlm cost runs/my-run                             # reads runs/my-run/config.yaml (T = its data.seq_len)
    privlm cost path/to/hf-model hf:EleutherAI/pythia-70m  # Hugging Face causal LMs (config.json is enough)
    privlm cost --table paper-t128 --format json        # published rows, predictions, relative errors
    privlm cost SM+ScFuFFN --vs SM+LN+G --spu-profile all   # the band: every calibrated SPU profile
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional


from privlm.config import Config, ConfigError, apply_overrides, load_config, split_args
from privlm.errors import MAX_T, OneLineArgumentParser, bounded_int
from privlm.pi.costs import Cost, available_profiles, load_profile, predict, shadowed_profiles, user_profile_dir
from privlm.pi.summary import CostSummary
from privlm.pi.published import TABLES, load_rows, paper_round, printed_decimals
from privlm.spu.spu_profile import available_spu_profiles, cost_profile_name

if TYPE_CHECKING:
    from privlm.pi.census import Census
# the census, Hugging Face models and run loading (torch) are imported by the functions that use them, so that
# `privlm cost --help` stays light (tests/test_cli.py)

# Fields copied from the costed model onto the --vs reference so both have the same size.
SIZE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "ffn_hidden", "block_size")


def resolve_spec(spec: str, overrides: list[str]) -> tuple[Config, Optional[int]]:
    """Preset name, YAML file or RUN_DIR -> (Config, T of the run or None)."""
    from privlm.hfmodel import check_model_dir, is_hf_spec
    from privlm.run import load_run_config
    path = Path(spec)
    check_model_dir(spec)
    if path.is_dir() and not is_hf_spec(spec):
        cfg = apply_overrides(load_run_config(path), overrides)
        return cfg, cfg.data.seq_len
    return load_config(spec, overrides), None


def reference_config(vs: str, model_cfg) -> Config:
    """The --vs model at the same size as the costed one (a privlm Config or a Hugging Face config; a run
    directory is taken as it is)."""
    if Path(vs).is_dir():
        return resolve_spec(vs, [])[0]
    if isinstance(model_cfg, Config):
        m = model_cfg.model
        sizes, seq_len = {k: getattr(m, k) for k in SIZE_FIELDS}, model_cfg.data.seq_len
    else:
        from privlm.hfmodel import shape_of
        shape = shape_of(model_cfg)
        sizes = {k: shape[k] for k in SIZE_FIELDS if k in shape} | {"block_size": shape["max_positions"]}
        seq_len = min(128, shape["max_positions"] or 128)
    size = [f"model.{k}={'null' if v is None else v}" for k, v in sizes.items()]
    return load_config(vs, size + [f"data.seq_len={seq_len}"])


def hf_target(spec: str, overrides: list[str]):
    """(HF config, meta-device model, label) of a Hugging Face spec; overrides do not apply to it."""
    if overrides:
        raise ConfigError(f"key=value overrides ({overrides[0]}) apply to privlm presets, not to the Hugging Face "
                          f"model '{spec}'")
    from privlm.hfmodel import build_model, load_config as load_hf_config
    config = load_hf_config(spec)[0]
    return config, build_model(config), spec.rstrip("/").rsplit("/", 1)[-1] if not spec.startswith("hf:") else spec


def cost_row(c: Census, cost: Cost, ref: Optional[Cost]) -> dict:
    """One `privlm cost` row: the typed `CostSummary` (flat) plus the census detail and the cost breakdown."""
    summary = CostSummary.of(c, cost)
    if ref is not None:
        summary = summary.relative_to(ref)
    return {
        **summary.to_dict(), "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
        "vocab_size": c.vocab_size, "n_kv_head": c.n_kv_head,
        "nonlinear_ops": [{"op": o.op, "count": o.count, "shape": list(o.shape), "where": o.where,
                           "in_paper": o.in_paper} for o in c.ops],
        "breakdown": cost.breakdown, "warnings": cost.warnings, "notes": c.notes,
    }


def table_rows(table: str, profile) -> list[dict]:
    """Every published row of ``table`` with the census, the prediction and the relative error per cell."""
    rows = load_rows(table)
    base = next((r for r in rows if r.comm_sav == 1.0 or r.arch == "SM+LN+G"), rows[0])
    ref = predict(base.census(), profile)
    out = []
    for r in rows:
        c = r.census()
        cost = predict(c, profile)
        row = cost_row(c, cost, ref)
        row["arch"] = ("SOTA " if r.variant == "sota" else "") + r.arch
        row["preset"] = r.preset
        row["source"] = r.source
        row.update({
            "paper_nonlinear": r.nonlinear or None,
            "nonlinear_match": (row["nonlinear"] == r.nonlinear) if r.nonlinear else None,
            "paper_ffn_flops": float(r.ffn_flops) * 1e9 if r.ffn_flops else None,
            "paper_attn_flops": float(r.attn_flops) * 1e9 if r.attn_flops else None,
            "ffn_flops_match": (paper_round(row["ffn_flops"] / 1e9, printed_decimals(r.ffn_flops)) ==
                                float(r.ffn_flops)) if r.ffn_flops else None,
            "attn_flops_match": (paper_round(row["attn_flops_paper"] / 1e9, printed_decimals(r.attn_flops)) ==
                                 float(r.attn_flops)) if r.attn_flops else None,
            "paper_comm_gb": r.comm_gb, "paper_lat_min": r.lat_min,
            "comm_err": cost.comm_gb / r.comm_gb - 1, "lat_err": cost.lat_min / r.lat_min - 1,
            "paper_comm_savings": r.comm_sav, "paper_lat_savings": r.lat_sav,
            "ppl": r.ppl, "note": r.note or None,
        })
        for ours, theirs, err in (("ffn_flops", "paper_ffn_flops", "ffn_flops_err"),
                                  ("attn_flops_paper", "paper_attn_flops", "attn_flops_err"),
                                  ("comm_savings", "paper_comm_savings", "comm_savings_err"),
                                  ("lat_savings", "paper_lat_savings", "lat_savings_err")):
            row[err] = (row[ours] / row[theirs] - 1) if row[theirs] else None
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------
def _fl(flops: float) -> str:
    """FLOPs in the paper's style (14.50B), falling back to M/K for small models."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if flops >= 0.1 * scale or unit == "K":
            return f"{flops / scale:.2f}{unit}"
    return ""


def _paper_gflops(flops: float) -> str:
    """The paper's printed GFLOPs cell back from the FLOP count (14.5, not 14.499999999)."""
    return f"{flops / 1e9:g}"


def _fmt_sav(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}×"


def _err(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def _ok(x: Optional[bool]) -> str:
    return "" if x is None else ("=" if x else "≠")


def render(rows: list[dict], fmt: str, published: bool) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)
    if published:
        header = ["Network Arch.", "#Nonlinear Ops (census)", "paper", "FFN FLOPs", "paper", "Attn FLOPs",
                  "paper", "Comm. (GB)", "paper", "err", "Lat. (min.)", "paper", "err", "Comm. Sav.", "paper",
                  "Lat. Sav.", "paper"]
        body = [[r["arch"], r["nonlinear"], _ok(r["nonlinear_match"]),
                 _fl(r["ffn_flops"]), f"{_paper_gflops(r['paper_ffn_flops'])}B{_ok(r['ffn_flops_match'])}"
                 if r["paper_ffn_flops"] is not None else "",
                 _fl(r["attn_flops_paper"]), f"{_paper_gflops(r['paper_attn_flops'])}B{_ok(r['attn_flops_match'])}"
                 if r["paper_attn_flops"] is not None else "",
                 f"{r['comm_gb']:.2f}", f"{r['paper_comm_gb']:.2f}", _err(r["comm_err"]),
                 f"{r['lat_min']:.2f}", f"{r['paper_lat_min']:.2f}", _err(r["lat_err"]),
                 _fmt_sav(r["comm_savings"]), _fmt_sav(r["paper_comm_savings"]),
                 _fmt_sav(r["lat_savings"]), _fmt_sav(r["paper_lat_savings"])] for r in rows]
    else:
        header = ["Network Arch.", "T", "#Nonlinear Ops", "FFN FLOPs", "Attn FLOPs (paper)", "Attn FLOPs (dense)",
                  "Comm. (GB)", "Lat. (min.)", "Comm. Savings", "Lat. Savings"]
        # a cost with unknown ops is a lower bound: "≥", and no savings factor (it would be an upper bound)
        body = [[r["arch"], str(r["T"]), r["nonlinear"], _fl(r["ffn_flops"]), _fl(r["attn_flops_paper"]),
                 _fl(r["attn_flops_dense"]), ("" if r["complete"] else "≥") + f"{r['comm_gb']:.2f}",
                 ("" if r["complete"] else "≥") + f"{r['lat_min']:.2f}",
                 _fmt_sav(r["comm_savings"] if r["complete"] else None),
                 _fmt_sav(r["lat_savings"] if r["complete"] else None)] for r in rows]
    return _layout(header, body, fmt)


def band_profiles(spec: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``--spu-profile NAME|all`` -> ([(SPU profile, its calibrated cost profile)], SPU profiles not calibrated)."""
    names = available_spu_profiles() if spec == "all" else [spec]
    known = set(available_profiles())
    for n in names:
        if n not in available_spu_profiles():
            from privlm.spu.spu_profile import UnknownSPUProfile, load_spu_profile
            try:
                load_spu_profile(n)
            except UnknownSPUProfile as exc:
                raise ConfigError(f"--spu-profile: {exc} (or 'all')") from None
    have = [(n, cost_profile_name(n)) for n in names if cost_profile_name(n) in known]
    missing = [n for n in names if cost_profile_name(n) not in known]
    if not have:
        raise ConfigError(f"--spu-profile {spec}: no calibrated cost profile ({', '.join(cost_profile_name(n) for n in names)}); "
                          f"run `privlm pi calibrate --spu-profile {names[0]}`")
    return have, missing


def busy_calibration(profile) -> Optional[str]:
    """A warning when a measured profile's seconds were taken on a busy machine (load above its CPUs)."""
    prov = profile.provenance
    busy = [(max(p["load_average"]), p["cpus"], p.get("ops")) for p in [prov, *prov.get("merged", [])]
            if p.get("load_average") and p.get("cpus") and max(p["load_average"]) > p["cpus"]]
    if not busy:
        return None
    load, cpus, ops = max(busy, key=lambda b: b[0])
    return (f"{profile.name}: {'its ' + ', '.join(ops) + ' were ' if ops else ''}calibrated at load average "
            f"{load:.1f} on {cpus} CPUs; the bytes hold, the seconds (latency) are those of a busy machine")


def cost_rows(targets: list, ref_cfg: Config, profile, T_arg: Optional[int]) -> tuple[list[dict], list[str], list[str]]:
    """One `cost_row` per target under one cost profile, savings against ``ref_cfg`` under the same profile."""
    from privlm.pi.census import census
    rows, warnings, notes = [], [], []
    for target, _size, run_T, label in targets:
        T = T_arg if T_arg is not None else (run_T or 128)
        ref_c = census(ref_cfg, T)
        ref = predict(ref_c, profile)
        c = census(target, T)
        if label is not None:
            c = dataclasses.replace(c, arch=label)
        cost = predict(c, profile, unknown="report")
        row = cost_row(c, cost, ref)
        # per-op bytes per element of the profile, for the ops of this census (the band view's columns)
        row["bytes_per_element"] = {o.op: profile.nonlinear[o.op].bytes_per_element for o in c.ops
                                    if o.op in profile.nonlinear}
        rows.append(row)
        warnings += [w for w in cost.warnings if w not in warnings]
        notes += [f"{c.arch}: {n}" for n in c.notes if label is not None]
    return rows, warnings, notes


BAND_OPS = ("softmax", "layernorm", "rmsnorm", "gelu", "relu", "leaky_relu", "silu", "gate_product", "rotary")


def render_band(rows: list[dict], fmt: str) -> str:
    """The band view: one row per (model, SPU profile) with the profile's bytes per element of each op of the
    models, the total, the latency estimate and the savings against the baseline under the same profile."""
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)
    ops = [op for op in BAND_OPS if any(op in r["bytes_per_element"] for r in rows)]
    header = ["Network Arch.", "T", "SPU profile", *[f"{op} B/el" for op in ops], "Comm. (GB)", "Lat. (min.)",
              "Comm. Savings", "Lat. Savings"]
    body = [[r["arch"], str(r["T"]), r["spu_profile"],
             *[f"{r['bytes_per_element'][op]:.0f}" if op in r["bytes_per_element"] else "" for op in ops],
             ("" if r["complete"] else "≥") + f"{r['comm_gb']:.2f}", ("" if r["complete"] else "≥") + f"{r['lat_min']:.2f}",
             _fmt_sav(r["comm_savings"] if r["complete"] else None),
             _fmt_sav(r["lat_savings"] if r["complete"] else None)] for r in rows]
    return _layout(header, body, fmt)


def _layout(header: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in body]
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    if args.spu_profile is not None and args.profile is not None:
        raise ConfigError("give --profile (a cost profile) or --spu-profile (the calibrated cost profile of an SPU "
                          "profile, or 'all'), not both")
    if args.spu_profile is not None and args.table:
        raise ConfigError("--table compares with the published rows under one --profile; drop --spu-profile")
    profile = load_profile(args.profile or "paper-fit") if args.spu_profile is None else None
    if args.table:
        if args.specs:
            raise ConfigError("--table prints a published table; give it no PRESET/RUN_DIR (or drop --table)")
        rows = table_rows(args.table, profile)
        print(render(rows, args.format, published=True))
        if args.format in ("table", "md"):
            worst_c = max(rows, key=lambda r: abs(r["comm_err"]))
            worst_l = max(rows, key=lambda r: abs(r["lat_err"]))
            print(f"\n{TABLES[args.table]}; profile {profile.name}. Worst Comm error {_err(worst_c['comm_err'])} "
                  f"({worst_c['arch']}), worst latency error {_err(worst_l['lat_err'])} ({worst_l['arch']}). "
                  f"FLOPs in the paper convention; '=' census matches the printed cell.")
        return 0
    from privlm.hfmodel import is_hf_spec
    from privlm.pi.census import census
    specs, overrides = split_args(args.specs)
    if not specs:
        specs = ["SM+LN+G"]
    targets = []  # (what census() takes, config the --vs size comes from, T of a run, label of an HF model)
    for s in specs:
        if is_hf_spec(s):
            config, model, label = hf_target(s, overrides)
            targets.append((model, config, None, label))
        else:
            cfg, run_T = resolve_spec(s, overrides)
            targets.append((cfg, cfg, run_T, None))
    ref_cfg = reference_config(args.vs, targets[0][1])
    if args.spu_profile is not None:
        band, missing = band_profiles(args.spu_profile)
        rows, warnings, notes = [], [], []
        # the baseline first (its GELU/LayerNorm bytes are what the others save), unless it is costed anyway
        with_ref = targets if any(isinstance(t[0], Config) and t[0].model == ref_cfg.model for t in targets) \
            else [(ref_cfg, ref_cfg, None, None)] + targets
        for spu, cost_name in band:
            r, w, n = cost_rows(with_ref, ref_cfg, load_profile(cost_name), args.T)
            rows += [(i, {**row, "spu_profile": spu, "cost_profile": cost_name}) for i, row in enumerate(r)]
            warnings += [x for x in w if x not in warnings]
            notes += [x for x in n if x not in notes]
        rows = [row for _, row in sorted(rows, key=lambda ir: ir[0])]  # model by model, profiles in order
        print(render_band(rows, args.format))
        if args.format in ("table", "md"):
            print(f"\nthe band over SPU profiles: each row under the cost profile `privlm pi calibrate --spu-profile P` "
                  f"measured (spu-<P>-measured; bytes per element of each op, linear layers per GFLOP); savings vs "
                  f"{args.vs} under the same profile (docs/pi-measured.md)")
            if missing:
                print(f"note: not calibrated, so not in the band: {', '.join(missing)}")
            for spu, cost_name in band:
                w = busy_calibration(load_profile(cost_name))
                if w:
                    print(f"warning: {w}")
            for w in warnings:
                print(f"warning: {w}")
            for n in notes:
                print(f"note: {n}")
        return 0
    rows, warnings, notes = cost_rows(targets, ref_cfg, profile, args.T)
    print(render(rows, args.format, published=False))
    if args.format in ("table", "md"):
        print(f"\nprofile {profile.name} (network {profile.network.get('bandwidth_mbps')} Mbit/s, "
              f"{profile.network.get('rtt_ms')} ms as stated by its source); savings vs {args.vs} at the same size; "
              f"FLOPs: paper convention, attention also dense (docs/pi-cost.md)")
        for w in warnings:
            print(f"warning: {w}")
        for n in notes:
            print(f"note: {n}")
    return 0


class _IntermixedParser(OneLineArgumentParser):
    """Lets ``key=value`` overrides follow options (``privlm cost SM+LN+G --T 256 model.n_layer=18``):
    argparse's plain parsing takes positionals only once, so the sub-parser parses intermixed."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(subparsers) -> None:
    p = subparsers.add_parser("cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="*", metavar="PRESET|RUN_DIR|HF_MODEL|key=value",
                   help="presets, config YAMLs, run directories or Hugging Face models (a save_pretrained directory "
                        "or hf:<hub id>; default SM+LN+G at GPT-2 size), and overrides")
    p.add_argument("--T", type=bounded_int(1, MAX_T), default=None,
                   help="prompt length (default 128; a run's data.seq_len)")
    shadowed = shadowed_profiles()
    p.add_argument("--profile", default=None,
                   help=f"cost profile name or .json path (default paper-fit; available: {', '.join(available_profiles())}; names are "
                        f"looked up in {user_profile_dir()} first, then among the shipped profiles"
                        + (f"; user profiles shadow the shipped {', '.join(shadowed)}" if shadowed else "") + ")")
    p.add_argument("--spu-profile", default=None, metavar="NAME|all",
                   help=f"cost under the calibrated profile of an SPU profile (spu-<NAME>-measured), or the band over "
                        f"all of them with per-op bytes per element (SPU profiles: {', '.join(available_spu_profiles())})")
    p.add_argument("--vs", default="SM+LN+G", help="reference for the savings columns (preset or RUN_DIR)")
    p.add_argument("--format", choices=("table", "md", "csv", "json"), default="table")
    p.add_argument("--table", choices=tuple(TABLES), help="print a published table beside the predictions")
    p.set_defaults(func=run)
    p.__class__ = _IntermixedParser  # the subparsers action builds plain ArgumentParsers
