"""The paper's qualitative claims, checked on the rows of a sweep (results.json) that contains the variants.

Each check returns whether the claim holds on these runs and the numbers it rests on; a claim whose
variants are missing from the sweep is reported as not testable. Single runs (one seed): a difference is a
measurement, not a significance test; the README of a study must say how large seed-to-seed noise is.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from privlm.entropy.measure import COLLAPSE_NATS
from privlm.presets import normalize_name

NORM_FREE_FIXES = ("SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN", "SM+ScFuFFN")


def _find(rows: Sequence[dict], preset: str) -> Optional[dict]:
    return next((r for r in rows if normalize_name(r["preset"]) == normalize_name(preset)), None)


def _ppl(r: dict) -> float:
    return math.inf if r["diverged"] or r.get("ppl") is None else r["ppl"]


def _fmt_ppl(r: dict) -> str:
    return "NaN (diverged)" if r["diverged"] else f"{r['ppl']:.3f}" if r.get("ppl") is not None else "–"


def _collapse_numbers(r: dict) -> str:
    return (f"{r['preset']}: deepest-half min layer entropy {r.get('deep_layer_min_entropy', math.nan):.3f} nats, "
            f"NaN entries {r.get('nan_total', 0):.0f}, diverged {r['diverged']}, "
            f"collapsed layers {r.get('collapsed_layers', [])}")


def _collapsed(r: dict) -> bool:
    return bool(r["diverged"] or r.get("collapsed"))


def claim_c1(rows: Sequence[dict]) -> dict:
    """(C1) SM without normalization collapses (NaN or near-zero deep-layer entropy); WN/SN/Scaled-FFN do not."""
    sm = _find(rows, "SM")
    fixes = [r for r in (_find(rows, p) for p in NORM_FREE_FIXES) if r is not None]
    out = {"id": "C1", "claim": "SM without normalization collapses (NaN or near-zero deep-layer entropy) while "
                                "WN(ffn)/SN(ffn)/Scaled-FFN do not"}
    if sm is None or not fixes or "deep_layer_min_entropy" not in sm:
        return {**out, "holds": None, "numbers": "variants or entropy telemetry missing"}
    holds = _collapsed(sm) and not any(_collapsed(r) for r in fixes)
    return {**out, "holds": holds,
            "numbers": "; ".join(_collapse_numbers(r) for r in [sm, *fixes])
            + f" (collapse: >= half of a layer's heads below {COLLAPSE_NATS} nats, or NaN)"}


def claim_c2(rows: Sequence[dict]) -> dict:
    """(C2) SM+G has a larger top-bin share (entropic overload) than SM+R."""
    g, r = _find(rows, "SM+G"), _find(rows, "SM+R")
    out = {"id": "C2", "claim": "SM+G has a larger share of heads in the top entropy bin [3max/4, max] than SM+R"}
    if g is None or r is None or "bin_shares" not in g or "bin_shares" not in r:
        return {**out, "holds": None, "numbers": "variants or entropy telemetry missing"}
    sg, sr = g["bin_shares"][3], r["bin_shares"][3]
    uniform = ""
    if g.get("near_uniform_share") is not None and r.get("near_uniform_share") is not None:
        uniform = (f"; near-uniform heads SM+G {100 * g['near_uniform_share']:.0f}% ({g['verdict']}) vs SM+R "
                   f"{100 * r['near_uniform_share']:.0f}% ({r['verdict']})")
    return {**out, "holds": sg > sr,
            "numbers": f"top-bin share SM+G {100 * sg:.1f}% vs SM+R {100 * sr:.1f}% (paper: 58% vs 23-24%); "
                       f"bins SM+G {' / '.join(f'{100 * s:.0f}' for s in g['bin_shares'])}, "
                       f"SM+R {' / '.join(f'{100 * s:.0f}' for s in r['bin_shares'])} %{uniform}"}


def claim_c3(rows: Sequence[dict]) -> dict:
    """(C3) PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G."""
    names = ["SM+LN+G", "SM+LN+R", "SM+R", "SM+G"]
    found = [_find(rows, n) for n in names]
    out = {"id": "C3", "claim": "PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G"}
    if any(f is None for f in found):
        return {**out, "holds": None, "numbers": "variants missing"}
    p = [_ppl(f) for f in found]
    parts = [p[0] <= p[1], p[1] < p[2], p[2] < p[3]]
    ops = ["<=" if parts[0] else ">", "<" if parts[1] else ">=", "<" if parts[2] else ">="]
    chain = f"{names[0]} {_fmt_ppl(found[0])}"
    for op, n, f in zip(ops, names[1:], found[1:]):
        chain += f" {op} {n} {_fmt_ppl(f)}"
    return {**out, "holds": all(parts), "parts": parts,
            "numbers": chain + " (paper: 2.69 <= 2.76 < 2.94 < 3.20)"}


def claim_c4(rows: Sequence[dict]) -> dict:
    """(C4) EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN."""
    e, s = _find(rows, "EReg(SM(t)+ScFuFFN)"), _find(rows, "SM+ScFuFFN")
    t = _find(rows, "SM(t)+ScFuFFN")
    out = {"id": "C4", "claim": "EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN"}
    if e is None or s is None:
        return {**out, "holds": None, "numbers": "variants missing"}
    pe, ps = _ppl(e), _ppl(s)
    rel = (ps - pe) / ps * 100 if math.isfinite(ps) and math.isfinite(pe) else math.nan
    extra = f"; SM(t)+ScFuFFN without the regularizer {_fmt_ppl(t)}" if t is not None else ""
    return {**out, "holds": pe < ps,
            "numbers": f"EReg(SM(t)+ScFuFFN) {_fmt_ppl(e)} vs SM+ScFuFFN {_fmt_ppl(s)} "
                       f"({abs(rel):.1f}% {'lower' if rel >= 0 else 'higher'}; paper: 3.21 vs 3.48, 7.8% lower)"
                       f"{extra}"}


def stable_up_to(cells: dict, preset: str, lrs: Sequence[float]) -> Optional[float]:
    """The largest learning rate up to which every finished run of ``preset`` (every seed, every smaller rate)
    trained without a divergence; rates where it has no finished run are skipped (not tested, not a failure).
    None when it diverged already at the smallest tested rate or has no finished run."""
    best = None
    for lr in lrs:
        runs = [r for r in cells.get((preset, lr), []) if r["finished"]]
        if not runs:
            continue
        if any(r["diverged"] for r in runs):
            break
        best = lr
    return best


def claim_c1_stability(rows: Sequence[dict]) -> Optional[dict]:
    """(C1, in the form a small budget can test) WN/SN/Scaled-FFN widen the range of learning rates over which
    the norm-free SM trains without NaN. None unless the rows span at least two learning rates."""
    from privlm.report.analysis import stability_map
    presets, lrs, cells = stability_map(rows)
    if len(lrs) < 2:
        return None
    out = {"id": "C1-stability", "claim": "WN(ffn)/SN(ffn)/Scaled-FFN train without NaN up to a larger learning "
                                          "rate than SM without normalization"}
    by_norm = {normalize_name(p): p for p in presets}
    sm = by_norm.get(normalize_name("SM"))
    fixes = [by_norm[normalize_name(f)] for f in NORM_FREE_FIXES if normalize_name(f) in by_norm]
    if sm is None or not fixes:
        return {**out, "holds": None, "numbers": "SM or all of its fixes missing"}
    limit = {p: stable_up_to(cells, p, lrs) for p in [sm, *fixes]}
    key = {p: -1.0 if v is None else v for p, v in limit.items()}
    holds = all(key[f] >= key[sm] for f in fixes) and any(key[f] > key[sm] for f in fixes)
    text = ", ".join(f"{p} {'none' if v is None else f'{v:g}'}" for p, v in limit.items())
    return {**out, "holds": holds, "stable_up_to": limit,
            "numbers": f"largest learning rate up to which every run trained without NaN (of {', '.join(f'{lr:g}' for lr in lrs)}): {text}"}


def evaluate_claims(rows: Sequence[dict]) -> list[dict]:
    return [claim_c1(rows), claim_c2(rows), claim_c3(rows), claim_c4(rows)]


def claims_markdown(rows: Sequence[dict]) -> list[str]:
    lines = ["| Claim | Holds here? | Numbers |", "|---|---|---|"]
    for c in evaluate_claims(rows):
        verdict = {True: "yes", False: "**no**", None: "not testable"}[c["holds"]]
        lines.append(f"| ({c['id']}) {c['claim']} | {verdict} | {c['numbers']} |")
    return lines
