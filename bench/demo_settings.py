"""Demo settings measured on 3 seeds: which entropy-regularizer setting the demo's EReg(SM(t)+ScFuFFN) uses.

    PYTHONPATH=src python bench/demo_settings.py --out runs/demo-settings --jobs 2
    PYTHONPATH=src python bench/demo_settings.py --out runs/demo-settings --score-only   # tables only

Trains configs/sweeps/demo-settings.yaml through the sweep runner (`privlm.sweep.run_sweep`, `--jobs` runs
at a time, one torch thread each; resumable: rerun the same command), then scores every finished run:

* held-out PPL (`privlm eval RUN --split heldout`: files carved from the training side, never trained on) --
  the only number the setting is chosen on;
* validation PPL (whole validation split, end of training) and the entropy diagnosis (layer mean entropies,
  verdict) as the sweep's results rows hold them: the run's last entropy measurement judged by
  `privlm.entropy`'s criteria, exactly what the demo's table prints for a run;
* per seed, the paired difference EReg - control (same seed, same data order) of held-out PPL, valid PPL and
  the mean entropy of layers 0-1 (the layers the paper's entropic overload is about), with mean, min and max.

Rule: the EReg setting with the lowest mean held-out PPL is selected. Its effect "shows in the paper's
direction beyond the 3-seed spread" only if every seed's paired difference is < 0 for held-out PPL *and* for
the layer 0-1 entropy (max < 0: the whole seed range on the paper's side of zero). Writes
bench/results/demo_settings.json and a generated demo_settings.md beside it (`--results`).
`--tiny` (a few steps, for checking that the script runs) writes nothing to bench/results unless asked.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "demo-settings.yaml"
EARLY_LAYERS = (0, 1)


def _setting_and_seed(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.+)-s(\d+)", name)
    if not m:
        raise ValueError(f"run name '{name}' does not end in -s<seed>")
    return m.group(1), int(m.group(2))


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}


def score(sweep, out: Path, log=print) -> dict:
    from privlm.report import collect, load_runs
    from privlm.selection import heldout_eval  # the one held-out scorer (also of the selection sweeps)

    # the sweep's result rows (what write_results tabulates), read from the run directories; nothing written
    dirs = [out / r.name for r in sweep.runs if (out / r.name / "summary.json").is_file()]
    rows = {r.name: r for r in collect(load_runs(dirs), sweep.runs[0].name)[0]} if dirs else {}
    runs = []
    for r in sweep.runs:
        row = rows.get(r.name)
        if row is None or not row.finished:
            continue
        setting, seed = _setting_and_seed(r.name)
        held = heldout_eval(out, r.name)
        diag = row.diagnosis
        layers = list(diag.layer_mean_entropy) if diag is not None else None
        runs.append({"name": r.name, "setting": setting, "seed": seed, "preset": r.preset,
                     "overrides": r.overrides,
                     "reg": {"enabled": r.cfg.reg.enabled, "lambda": r.cfg.reg.lambda_, "gamma": r.cfg.reg.gamma,
                             "theta_init": r.cfg.reg.theta_init, "reduction": r.cfg.reg.reduction},
                     "heldout_ppl": held["ppl"], "heldout_tokens": held["tokens"], "valid_ppl": row.ppl,
                     "layer_entropy": layers,
                     "early_entropy": (statistics.fmean(layers[i] for i in EARLY_LAYERS) if layers else None),
                     "verdict": row.verdict, "diverged": row.diverged, "tokens_trained": row.tokens_trained})
        log(f"{r.name}: held-out PPL {held['ppl']:.3f}  valid PPL {row.ppl}  {row.verdict}")

    by = {(x["setting"], x["seed"]): x for x in runs}
    settings = sorted({x["setting"] for x in runs if x["setting"] != "control"})
    seeds = sorted({x["seed"] for x in runs})
    summary = []
    for s in ["control"] + settings:
        mine = [x for x in runs if x["setting"] == s]
        entry = {"setting": s, "reg": mine[0]["reg"] if mine else None, "seeds": [x["seed"] for x in mine],
                 "heldout_ppl": _stats([x["heldout_ppl"] for x in mine]),
                 "valid_ppl": _stats([x["valid_ppl"] for x in mine]),
                 "early_entropy": _stats([x["early_entropy"] for x in mine])}
        if s != "control":
            paired = [(by[(s, k)], by[("control", k)]) for k in seeds if (s, k) in by and ("control", k) in by]
            entry["paired_seeds"] = [e["seed"] for e, _ in paired]
            for key in ("heldout_ppl", "valid_ppl", "early_entropy"):
                diffs = [e[key] - c[key] for e, c in paired if e[key] is not None and c[key] is not None]
                entry[f"diff_{key}"] = {"per_seed": diffs, **_stats(diffs)}
        summary.append(entry)
    candidates = [e for e in summary if e["setting"] != "control" and e["heldout_ppl"]["n"]]
    selected = min(candidates, key=lambda e: e["heldout_ppl"]["mean"]) if candidates else None
    shows = None
    if selected is not None:
        dh, de = selected["diff_heldout_ppl"], selected["diff_early_entropy"]
        shows = bool(dh["n"] >= 3 and de["n"] >= 3 and dh["max"] < 0 and de["max"] < 0)
    done = {x["name"] for x in runs}
    return {"sweep": str(SWEEP.relative_to(ROOT)), "out": str(out), "seeds": seeds,
            "not_finished": [r.name for r in sweep.runs if r.name not in done],
            "selection": {"split": "heldout", "rule": "lowest mean held-out PPL among the EReg settings",
                          "selected": selected["setting"] if selected else None,
                          "paper_direction_beyond_seed_spread": shows,
                          "criterion": "every seed's paired EReg - control difference < 0 for held-out PPL and "
                                       "for the mean entropy of layers 0-1"},
            "settings": summary, "runs": runs}


def _f(x, fmt=".2f") -> str:
    return "—" if x is None else format(x, fmt)


def _range(st: dict, fmt=".2f") -> str:
    if not st.get("n"):
        return "—"
    return f"{_f(st['mean'], fmt)} [{_f(st['min'], fmt)}, {_f(st['max'], fmt)}]"


def markdown(res: dict, command: str) -> str:
    sel = res["selection"]
    missing = res.get("not_finished") or []
    out = ["# Demo settings over seeds (generated by bench/demo_settings.py)", "",
           f"Command: `{command}`", "",
           f"Sweep: `{res['sweep']}` (the demo's model, data and 983,040-token budget; held-out split = 5 % of "
           f"the files carved from the training side; seeds {', '.join(map(str, res['seeds']))}).", "",
           (f"Not finished yet ({len(missing)} of the sweep's runs; rerun the command without --score-only to "
            f"train them, then score again): {', '.join(missing)}." if missing else "Every run of the sweep is finished."),
           "",
           "## Per setting (mean [min, max] over seeds; differences paired by seed, EReg − control)", "",
           "| setting | λ | reduction | θ init | seeds | held-out PPL | valid PPL | entropy L0–1 (nats) "
           "| Δ held-out PPL | Δ valid PPL | Δ entropy L0–1 |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in res["settings"]:
        reg = e["reg"] or {}
        lam = _f(reg.get("lambda"), "g") if reg.get("enabled") else "off"
        d = (lambda k: _range(e[k], "+.2f") + f" per seed {', '.join(format(v, '+.2f') for v in e[k]['per_seed'])}"
             if k in e and e[k]["n"] else "—")
        out.append(f"| {e['setting']} | {lam} | {reg.get('reduction', '—') if reg.get('enabled') else '—'} | "
                   f"{reg.get('theta_init') if reg.get('enabled') else '—'} | {len(e['seeds'])} | "
                   f"{_range(e['heldout_ppl'])} | {_range(e['valid_ppl'])} | {_range(e['early_entropy'], '.3f')} | "
                   f"{d('diff_heldout_ppl')} | {d('diff_valid_ppl')} | {d('diff_early_entropy')} |")
    out += ["", f"Selected on the held-out split ({sel['rule']}): **{sel['selected']}**. "
            f"Effect in the paper's direction beyond the seed spread ({sel['criterion']}): "
            f"**{'yes' if sel['paper_direction_beyond_seed_spread'] else 'no'}**.", "",
            "## Per run", "", "| run | held-out PPL | valid PPL | layer entropies (nats) | verdict |", "|---|---|---|---|---|"]
    for x in res["runs"]:
        ents = " / ".join(_f(v, ".2f") for v in (x["layer_entropy"] or []))
        out.append(f"| {x['name']} | {_f(x['heldout_ppl'])} | {_f(x['valid_ppl'])} | {ents} | {x['verdict']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo-settings", help="sweep directory (runs, logs, results)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at a time, one torch thread each")
    ap.add_argument("--score-only", action="store_true", help="score the runs that exist; train nothing")
    ap.add_argument("--results", default=None,
                    help="where demo_settings.json/.md go (default bench/results; with --tiny: the --out dir)")
    ap.add_argument("--tiny", action="store_true", help="8 steps per run and 2 runs: checks that the script works")
    args = ap.parse_args(argv)

    import torch

    from privlm.sweep import load_sweep, run_sweep

    torch.set_num_threads(1)
    sweep = load_sweep(SWEEP)
    out = Path(args.out)
    if args.tiny:
        sweep.runs = sweep.runs[:2]
        for r in sweep.runs:
            r.cfg = dataclasses.replace(r.cfg, train=dataclasses.replace(
                r.cfg.train, max_steps=8, eval_every=8, entropy_every=4, save_every=8, log_every=4,
                eval_max_batches=2))
    command = "PYTHONPATH=src python " + " ".join(["bench/demo_settings.py"] + (argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    if not args.score_only:
        run_sweep(sweep, out, jobs=args.jobs, threads=1, command=command)
    res = score(sweep, out)
    res["wall_seconds_this_call"] = round(time.time() - t0, 1)
    results = Path(args.results) if args.results else (out if args.tiny else ROOT / "bench" / "results")
    results.mkdir(parents=True, exist_ok=True)
    (results / "demo_settings.json").write_text(json.dumps(res, indent=1) + "\n")
    (results / "demo_settings.md").write_text(markdown(res, command))
    print(f"wrote {results / 'demo_settings.json'} and demo_settings.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
