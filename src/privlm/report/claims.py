"""The paper's qualitative claims, checked on the rows of a sweep (results.json) that contains the variants.

Each claim reports two things. ``holds`` compares the seed means (a single run is its own mean); ``verdict``
weighs the difference against seed-to-seed noise (docs/DECISIONS.md, "Claims and seeds"):

- a variant with several seeds is the interval [min, max] of its seeds;
- a variant with one seed borrows the noise of the others: its interval is value x (1 +/- r/2), r the median
  relative seed range (max - min) / mean of the variants that have several seeds in the same sweep;
- two intervals that do not overlap decide the comparison ("holds" / "does not hold"); overlapping ones are
  "within noise" — except for a "<=" (or "no worse than") part, which noise cannot break and so holds;
- C4 compares the two variants seed by seed when they share at least two seeds: every paired difference with
  the same sign decides it, mixed signs are within noise;
- a sweep where no variant has several seeds falls back to comparing the single runs, and says so.

A claim whose variants are missing from the sweep is "not testable" (``holds`` None).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from privlm.entropy.measure import COLLAPSE_NATS
from privlm.presets import normalize_name
from privlm.results import RunRow, as_rows

NORM_FREE_FIXES = ("SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN", "SM+ScFuFFN")
HOLDS, FAILS, NOISE, UNTESTABLE = "holds", "does not hold", "within noise", "not testable"
Metric = Callable[[RunRow], float]


def seed_group(rows: Sequence[RunRow], preset: str) -> list[RunRow]:
    """Every seed of ``preset`` at the learning rate of its first row (a stability map's other rates are other
    experiments, not other seeds)."""
    same = [r for r in as_rows(rows) if normalize_name(r.preset) == normalize_name(preset)]
    return [r for r in same if r.lr == same[0].lr] if same else []


def ppl_of(r: RunRow) -> float:
    return r.ppl_or_inf


def _top_bin(r: RunRow) -> float:
    return r.diagnosis.top_bin_share


@dataclass(frozen=True)
class Spread:
    """One variant's metric over its seeds."""
    values: tuple[float, ...]
    seeds: tuple

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if all(map(math.isfinite, self.values)) else math.inf

    @property
    def relative_range(self) -> Optional[float]:
        m = self.mean
        return (max(self.values) - min(self.values)) / abs(m) if self.n >= 2 and math.isfinite(m) and m else None

    def interval(self, pooled_r: Optional[float]) -> tuple[float, float]:
        if self.n >= 2 or pooled_r is None or not math.isfinite(self.mean):
            return min(self.values), max(self.values)
        return self.mean * (1 - pooled_r / 2), self.mean * (1 + pooled_r / 2)

    def text(self, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        one = lambda v: "NaN (diverged)" if not math.isfinite(v) else fmt.format(scale * v)  # noqa: E731
        if self.n == 1:
            return one(self.values[0])
        return f"{one(self.mean)} [{one(min(self.values))}–{one(max(self.values))}, {self.n} seeds]"


def spread_of(group: Sequence[RunRow], metric: Metric) -> Spread:
    return Spread(tuple(metric(r) for r in group), tuple(r.seed for r in group))


def pooled_noise(rows: Sequence[RunRow], metric: Metric) -> Optional[float]:
    """Median relative seed range of the variants with several seeds (None when no variant has two)."""
    rows = as_rows(rows)
    ranges = []
    for p in dict.fromkeys(r.preset for r in rows):
        try:
            r = spread_of(seed_group(rows, p), metric).relative_range
        except (AttributeError, TypeError, IndexError):  # e.g. a run without a diagnosis
            continue
        if r is not None:
            ranges.append(r)
    return statistics.median(ranges) if ranges else None


def compare(a: Spread, b: Spread, pooled_r: Optional[float], strict: bool = True) -> str:
    """Verdict on "a < b" (strict) or "a <= b" given the seeds' spread."""
    point = a.mean < b.mean if strict else a.mean <= b.mean
    if a.n < 2 and b.n < 2 and pooled_r is None:
        return HOLDS if point else FAILS  # single runs, nothing to weigh them against
    (alo, ahi), (blo, bhi) = a.interval(pooled_r), b.interval(pooled_r)
    if ahi < blo:
        return HOLDS
    if alo > bhi:
        return FAILS
    return HOLDS if not strict else NOISE


def _combine(verdicts: Sequence[str]) -> str:
    return FAILS if FAILS in verdicts else NOISE if NOISE in verdicts else HOLDS


def _seed_note(rows: Sequence[RunRow], pooled_r: Optional[float], what: str) -> str:
    if pooled_r is None:
        return " (single seed per variant: no noise estimate)"
    return f" (single-seed variants use the median seed range of {what}, {100 * pooled_r:.1f}%)"


def _result(out: dict, verdict: str, holds: Optional[bool], numbers: str, **extra) -> dict:
    return {**out, "holds": holds, "verdict": verdict, "numbers": numbers, **extra}


def _collapsed(r: RunRow) -> bool:
    return bool(r.diverged or (r.diagnosis and r.diagnosis.collapsed))


def claim_c1(rows: Sequence[RunRow]) -> dict:
    """(C1) SM without normalization collapses (NaN or near-zero deep-layer entropy); WN/SN/Scaled-FFN do not."""
    rows = as_rows(rows)
    sm = seed_group(rows, "SM")
    fixes = [g for g in (seed_group(rows, p) for p in NORM_FREE_FIXES) if g]
    out = {"id": "C1", "claim": "SM without normalization collapses (NaN or near-zero deep-layer entropy) while "
                                "WN(ffn)/SN(ffn)/Scaled-FFN do not"}
    if not sm or not fixes or sm[0].diagnosis is None:
        return _result(out, UNTESTABLE, None, "variants or entropy telemetry missing")
    sm_share = sum(map(_collapsed, sm)) / len(sm)
    fix_shares = [sum(map(_collapsed, g)) / len(g) for g in fixes]
    holds = sm_share == 1 and not any(fix_shares)
    mixed = 0 < sm_share < 1 or any(0 < s < 1 for s in fix_shares)
    verdict = HOLDS if holds else NOISE if mixed else FAILS

    def numbers(g: list[RunRow]) -> str:
        deep = spread_of(g, lambda r: r.diagnosis.deep_layer_min_entropy if r.diagnosis else math.nan)
        layers = sorted({i for r in g if r.diagnosis for i in r.diagnosis.collapsed_layers})
        nan = max(r.diagnosis.nan_total if r.diagnosis else 0 for r in g)
        return (f"{g[0].preset}: deepest-half min layer entropy {deep.text()} nats, "
                f"NaN entries {nan:.0f}, diverged {sum(r.diverged for r in g)}/{len(g)}, "
                f"collapsed {sum(map(_collapsed, g))}/{len(g)} (layers {layers})")
    return _result(out, verdict, holds, "; ".join(numbers(g) for g in [sm, *fixes])
                   + f" (collapse: >= half of a layer's heads below {COLLAPSE_NATS} nats, or NaN)")


def verdicts_of(group: Sequence[RunRow]) -> str:
    """The runs' entropy verdicts: the verdict when all seeds agree, else each with its count."""
    counts: dict[str, int] = {}
    for r in as_rows(group):
        v = r.verdict or "?"
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{n}/{len(group)} {v}" for v, n in counts.items())


def claim_c2(rows: Sequence[RunRow]) -> dict:
    """(C2) SM+G has a larger top-bin share (entropic overload) than SM+R."""
    rows = as_rows(rows)
    g, r = seed_group(rows, "SM+G"), seed_group(rows, "SM+R")
    out = {"id": "C2", "claim": "SM+G has a larger share of heads in the top entropy bin [3max/4, max] than SM+R"}
    if not g or not r or g[0].diagnosis is None or r[0].diagnosis is None:
        return _result(out, UNTESTABLE, None, "variants or entropy telemetry missing")
    sg, sr = spread_of(g, _top_bin), spread_of(r, _top_bin)
    pooled = pooled_noise(rows, _top_bin)
    verdict = compare(sr, sg, pooled)
    pct = dict(fmt="{:.1f}%", scale=100)
    bins = lambda grp: " / ".join(f"{100 * statistics.fmean(x.diagnosis.bin_shares[i] for x in grp):.0f}"  # noqa: E731
                                  for i in range(4))
    uniform = ""
    if all(x.diagnosis and x.diagnosis.near_uniform_share is not None for x in g + r):
        share = lambda x: x.diagnosis.near_uniform_share  # noqa: E731
        ug, ur = spread_of(g, share), spread_of(r, share)
        uniform = (f"; near-uniform heads SM+G {ug.text('{:.0f}%', 100)} ({verdicts_of(g)}) vs SM+R "
                   f"{ur.text('{:.0f}%', 100)} ({verdicts_of(r)})")
    return _result(out, verdict, sg.mean > sr.mean,
                   f"top-bin share SM+G {sg.text(**pct)} vs SM+R {sr.text(**pct)} (paper: 58% vs 23-24%); "
                   f"bins SM+G {bins(g)}, SM+R {bins(r)} %{uniform}"
                   + ("" if sg.n >= 2 and sr.n >= 2 else _seed_note(rows, pooled, "the top-bin share")))


def claim_c3(rows: Sequence[RunRow]) -> dict:
    """(C3) PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G."""
    rows = as_rows(rows)
    names = ["SM+LN+G", "SM+LN+R", "SM+R", "SM+G"]
    groups = [seed_group(rows, n) for n in names]
    out = {"id": "C3", "claim": "PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G"}
    if not all(groups):
        return _result(out, UNTESTABLE, None, "variants missing")
    spreads = [spread_of(g, ppl_of) for g in groups]
    pooled = pooled_noise(rows, ppl_of)
    strict = [False, True, True]
    verdicts = [compare(a, b, pooled, s) for a, b, s in zip(spreads, spreads[1:], strict)]
    parts = [a.mean <= b.mean if not s else a.mean < b.mean for a, b, s in zip(spreads, spreads[1:], strict)]
    chain = f"{names[0]} {spreads[0].text()}"
    for v, s, n, sp in zip(verdicts, strict, names[1:], spreads[1:]):
        op = ("<=" if not s else "<") if v == HOLDS else (">" if not s else ">=") if v == FAILS else "~"
        chain += f" {op} {n} {sp.text()}"
    return _result(out, _combine(verdicts), all(parts), chain + " (paper: 2.69 <= 2.76 < 2.94 < 3.20; ~ = within "
                   "noise)" + _seed_note(rows, pooled, "PPL"), parts=parts, part_verdicts=verdicts)


def claim_c4(rows: Sequence[RunRow]) -> dict:
    """(C4) EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN."""
    rows = as_rows(rows)
    e, s = seed_group(rows, "EReg(SM(t)+ScFuFFN)"), seed_group(rows, "SM+ScFuFFN")
    t = seed_group(rows, "SM(t)+ScFuFFN")
    out = {"id": "C4", "claim": "EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN"}
    if not e or not s:
        return _result(out, UNTESTABLE, None, "variants missing")
    se, ss = spread_of(e, ppl_of), spread_of(s, ppl_of)
    pe, ps = se.mean, ss.mean
    rel = (ps - pe) / ps * 100 if math.isfinite(ps) and math.isfinite(pe) else math.nan
    by_seed = {r.seed: ppl_of(r) for r in s}
    pairs = [(by_seed[r.seed], ppl_of(r)) for r in e if r.seed in by_seed]
    pooled = pooled_noise(rows, ppl_of)
    if len(pairs) >= 2:
        diffs = [(b - a) / b * 100 for b, a in pairs]
        verdict = HOLDS if all(d > 0 for d in diffs) else FAILS if all(d < 0 for d in diffs) else NOISE
        paired = f"; paired by seed: {', '.join(f'{d:+.1f}%' for d in diffs)} lower"
    else:
        verdict, paired = compare(se, ss, pooled), _seed_note(rows, pooled, "PPL")
    extra = f"; SM(t)+ScFuFFN without the regularizer {spread_of(t, ppl_of).text()}" if t else ""
    return _result(out, verdict, pe < ps,
                   f"EReg(SM(t)+ScFuFFN) {se.text()} vs SM+ScFuFFN {ss.text()} "
                   f"({abs(rel):.1f}% {'lower' if rel >= 0 else 'higher'}; paper: 3.21 vs 3.48, 7.8% lower)"
                   f"{paired}{extra}")


def stable_up_to(cells: dict, preset: str, lrs: Sequence[float]) -> Optional[float]:
    """The largest learning rate up to which every finished run of ``preset`` (every seed, every smaller rate)
    trained without a divergence; rates where it has no finished run are skipped (not tested, not a failure).
    None when it diverged already at the smallest tested rate or has no finished run."""
    best = None
    for lr in lrs:
        runs = [r for r in cells.get((preset, lr), []) if r.finished]
        if not runs:
            continue
        if any(r.diverged for r in runs):
            break
        best = lr
    return best


def claim_c1_stability(rows: Sequence[RunRow]) -> Optional[dict]:
    """(C1, in the form a small budget can test) WN/SN/Scaled-FFN widen the range of learning rates over which
    the norm-free SM trains without NaN. None unless the rows span at least two learning rates."""
    from privlm.report.analysis import stability_map
    presets, lrs, cells = stability_map(as_rows(rows))
    if len(lrs) < 2:
        return None
    out = {"id": "C1-stability", "claim": "WN(ffn)/SN(ffn)/Scaled-FFN train without NaN up to a larger learning "
                                          "rate than SM without normalization"}
    by_norm = {normalize_name(p): p for p in presets}
    sm = by_norm.get(normalize_name("SM"))
    fixes = [by_norm[normalize_name(f)] for f in NORM_FREE_FIXES if normalize_name(f) in by_norm]
    if sm is None or not fixes:
        return _result(out, UNTESTABLE, None, "SM or all of its fixes missing")
    limit = {p: stable_up_to(cells, p, lrs) for p in [sm, *fixes]}
    key = {p: -1.0 if v is None else v for p, v in limit.items()}
    holds = all(key[f] >= key[sm] for f in fixes) and any(key[f] > key[sm] for f in fixes)
    text = ", ".join(f"{p} {'none' if v is None else f'{v:g}'}" for p, v in limit.items())
    return {**out, "holds": holds, "verdict": HOLDS if holds else FAILS, "stable_up_to": limit,
            "numbers": f"largest learning rate up to which every run trained without NaN (of {', '.join(f'{lr:g}' for lr in lrs)}): {text}"}


def evaluate_claims(rows: Sequence[RunRow]) -> list[dict]:
    rows = as_rows(rows)
    return [claim_c1(rows), claim_c2(rows), claim_c3(rows), claim_c4(rows)]


def verdict_text(claim: dict) -> str:
    v = claim.get("verdict") or {True: HOLDS, False: FAILS, None: UNTESTABLE}[claim["holds"]]
    return f"**{v}**" if v == FAILS else v


def claims_markdown(rows: Sequence[RunRow]) -> list[str]:
    lines = ["| Claim | Holds here? | Numbers |", "|---|---|---|"]
    for c in evaluate_claims(rows):
        lines.append(f"| ({c['id']}) {c['claim']} | {verdict_text(c)} | {c['numbers']} |")
    return lines
