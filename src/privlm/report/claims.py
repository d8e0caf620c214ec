"""The paper's qualitative claims, checked on the rows of a sweep (results.json) that contains the variants.

Each claim reports two things. ``holds`` compares the seed means (a single run is its own mean); ``verdict``
is a statistical statement over seeds (docs/DECISIONS.md, "Claims and seeds"), made by `compare` for every
comparison of every claim:

- two variants that share at least two seeds (same seed: same initialization stream and data order) are
  compared **paired**: the per-seed difference on the paper's side (e.g. the PPL the paper's better variant
  saves, in %), its mean, a percentile **bootstrap** confidence interval of that mean over seeds
  (`RESAMPLES` resamples, fixed generator seed `RNG_SEED`, level `CONFIDENCE`) and the exact one-sided
  **sign-flip permutation** p-value (all 2^n sign assignments; with n seeds the smallest p is 1/2^n);
- otherwise, when both have at least two seeds, **unpaired**: a bootstrap interval of the difference of the
  two means, each variant's seeds resampled independently;
- otherwise (a variant with one seed) nothing is weighed: the verdict is "not resolved at 1 seed";
- the verdict is **holds** when the interval excludes zero on the paper's side, **contradicted** when it
  excludes zero on the other side, else **not resolved at n seeds**; a "<=" part of a claim (SM+LN+G no worse
  than SM+LN+R) holds unless contradicted.

A claim whose variants are missing from the sweep is "not testable" (``holds`` None).
``python -m privlm.report.claims RESULTS.json`` rewrites the ``claims`` of a sweep's results.json from its
rows (what `privlm sweep` stores there), e.g. after these rules change.
"""
from __future__ import annotations

import itertools
import math
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from privlm.entropy.measure import COLLAPSE_NATS
from privlm.presets import normalize_name
from privlm.results import RunRow, as_rows

NORM_FREE_FIXES = ("SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN", "SM+ScFuFFN")
# Controls of the fixes: the fused FFN without its Eq. 8 scaling (does fusing alone, or the scaling, help?)
NORM_FREE_CONTROLS = ("SM+FuFFN",)
HOLDS, CONTRADICTED, UNTESTABLE = "holds", "contradicted", "not testable"
CONFIDENCE = 0.95
RESAMPLES = 10_000
RNG_SEED = 0
MAX_SIGN_FLIP_SEEDS = 20  # 2^20 sign assignments; more seeds than any study here trains
Metric = Callable[[RunRow], float]
# stat(a, b): the difference on the paper's side (positive = the paper's direction) of values or of means;
# numpy arrays in, numpy arrays out
Stat = Callable[[np.ndarray, np.ndarray], np.ndarray]


def not_resolved(n: int) -> str:
    return f"not resolved at {n} seed{'s' if n != 1 else ''}"


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

    def text(self, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
        one = lambda v: "NaN (diverged)" if not math.isfinite(v) else fmt.format(scale * v)  # noqa: E731
        if self.n == 1:
            return one(self.values[0])
        return f"{one(self.mean)} [{one(min(self.values))}–{one(max(self.values))}, {self.n} seeds]"


def spread_of(group: Sequence[RunRow], metric: Metric) -> Spread:
    return Spread(tuple(metric(r) for r in group), tuple(r.seed for r in group))


# ---------------------------------------------------------------------------------------------- statistics
def _alpha(level: float) -> float:
    return (1 - level) / 2


def bootstrap_mean_ci(values: Sequence[float], level: float = CONFIDENCE, resamples: int = RESAMPLES,
                      seed: int = RNG_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    x = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    a = _alpha(level)
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], stat: Stat, level: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = RNG_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(mean(a), mean(b))``, each sample resampled on its own."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ma = xa[rng.integers(0, len(xa), size=(resamples, len(xa)))].mean(axis=1)
    mb = xb[rng.integers(0, len(xb), size=(resamples, len(xb)))].mean(axis=1)
    d = stat(ma, mb)
    al = _alpha(level)
    return float(np.quantile(d, al)), float(np.quantile(d, 1 - al))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact one-sided p-value of "mean difference > 0": the share of the 2^n sign assignments of the
    per-seed differences whose mean is at least the observed one (the observed assignment included)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) > MAX_SIGN_FLIP_SEEDS:
        raise ValueError(f"{len(d)} paired seeds: the exact test enumerates at most 2^{MAX_SIGN_FLIP_SEEDS}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    means = (signs * d).mean(axis=1)
    observed = d.mean()
    return float(np.mean(means >= observed - 1e-12 * max(1.0, abs(observed))))


@dataclass(frozen=True)
class Comparison:
    """One comparison "a is on the paper's side of b" over seeds (see the module docstring)."""
    kind: str                       # "paired", "unpaired", "single" (a variant with one seed), "diverged"
    n: int                          # seeds the statistic rests on (pairs; the smaller group when unpaired)
    estimate: float                 # mean paired difference, or the difference of the means
    ci: Optional[tuple[float, float]]
    p: Optional[float]              # one-sided sign-flip p (paired only)
    per_seed: tuple[float, ...]     # the paired differences
    verdict: str
    unit: str = ""

    @property
    def decided(self) -> bool:
        return self.verdict in (HOLDS, CONTRADICTED)

    def text(self, fmt: str = "{:+.1f}") -> str:
        f = lambda v: fmt.format(v) + self.unit  # noqa: E731
        if self.kind == "single":
            return f"difference {f(self.estimate)} (one seed: no interval)"
        if self.kind == "diverged":
            return "diverged runs: no interval"
        lo, hi = self.ci
        ci = f"{100 * CONFIDENCE:.0f}% bootstrap CI [{f(lo)}, {f(hi)}]"
        if self.kind == "unpaired":
            return f"unpaired, difference of means {f(self.estimate)}, {ci}"
        return (f"paired over {self.n} seeds: mean {f(self.estimate)}, {ci}, per seed "
                f"{', '.join(f(d) for d in self.per_seed)}; sign-flip p = {self.p:.3g} "
                f"(smallest possible at {self.n} seeds: {0.5 ** self.n:.3g})")


def _verdict(lo: float, hi: float, n: int, strict: bool) -> str:
    if hi < 0:
        return CONTRADICTED
    if lo > 0 or not strict:
        return HOLDS
    return not_resolved(n)


def compare(a: Sequence[RunRow], b: Sequence[RunRow], metric: Metric, stat: Stat, strict: bool = True,
            unit: str = "") -> Comparison:
    """Is variant ``a`` on the paper's side of variant ``b``? ``stat(a_value, b_value)`` is the difference,
    positive on the paper's side; paired over shared seeds when there are two or more."""
    xa, xb = [metric(r) for r in a], [metric(r) for r in b]
    va, vb = {r.seed: x for r, x in zip(a, xa)}, {r.seed: x for r, x in zip(b, xb)}
    # pairs only where every run names its seed once (rows of old results files may carry no seed)
    pairable = None not in va and None not in vb and len(va) == len(xa) and len(vb) == len(xb)
    shared = [s for s in va if s in vb] if pairable else []
    if not all(map(math.isfinite, xa + xb)):  # a diverged run has no PPL; only a clean split is decided
        fa, fb = all(map(math.isfinite, xa)), all(map(math.isfinite, xb))
        n = min(len(xa), len(xb))
        v = HOLDS if fa and not any(map(math.isfinite, xb)) else \
            CONTRADICTED if fb and not any(map(math.isfinite, xa)) else not_resolved(n)
        return Comparison("diverged", n, math.nan, None, None, (), v, unit)
    if len(shared) >= 2:
        d = [float(stat(np.float64(va[s]), np.float64(vb[s]))) for s in shared]
        lo, hi = bootstrap_mean_ci(d)
        return Comparison("paired", len(d), statistics.fmean(d), (lo, hi), sign_flip_p(d), tuple(d),
                          _verdict(lo, hi, len(d), strict), unit)
    est = float(stat(np.float64(statistics.fmean(xa)), np.float64(statistics.fmean(xb))))
    n = min(len(xa), len(xb))
    if n >= 2:
        lo, hi = bootstrap_diff_ci(xa, xb, stat)
        return Comparison("unpaired", n, est, (lo, hi), None, (), _verdict(lo, hi, n, strict), unit)
    return Comparison("single", n, est, None, None, (), HOLDS if not strict and est >= 0 else not_resolved(n), unit)


def lower_ppl(a, b):
    """PPL the first variant saves against the second, in % of the second's."""
    return (b - a) / b * 100


def larger_share(a, b):
    """Percentage points by which the first variant's share exceeds the second's."""
    return (a - b) * 100


def _combine(verdicts: Sequence[str]) -> str:
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return next((v for v in verdicts if v != HOLDS), HOLDS)


def _result(out: dict, verdict: str, holds: Optional[bool], numbers: str, **extra) -> dict:
    return {**out, "holds": holds, "verdict": verdict, "numbers": numbers, **extra}


def _collapsed(r: RunRow) -> bool:
    return bool(r.diverged or (r.diagnosis and r.diagnosis.collapsed))


# ---------------------------------------------------------------------------------------------- claims
def claim_c1(rows: Sequence[RunRow]) -> dict:
    """(C1) SM without normalization collapses (NaN or near-zero deep-layer entropy); WN/SN/Scaled-FFN do not.
    An outcome per seed (collapsed or not), not a difference: holds when every seed of SM collapses and no
    seed of a fix does, contradicted when no seed of SM collapses or every seed of a fix does, else not
    resolved."""
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
    contradicted = sm_share == 0 or any(s == 1 for s in fix_shares)
    verdict = HOLDS if holds else CONTRADICTED if contradicted else not_resolved(min(map(len, [sm, *fixes])))

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
    cmp = compare(g, r, _top_bin, larger_share, unit=" pp")
    pct = dict(fmt="{:.1f}%", scale=100)
    bins = lambda grp: " / ".join(f"{100 * statistics.fmean(x.diagnosis.bin_shares[i] for x in grp):.0f}"  # noqa: E731
                                  for i in range(4))
    uniform = ""
    if all(x.diagnosis and x.diagnosis.near_uniform_share is not None for x in g + r):
        share = lambda x: x.diagnosis.near_uniform_share  # noqa: E731
        ug, ur = spread_of(g, share), spread_of(r, share)
        uniform = (f"; near-uniform heads SM+G {ug.text('{:.0f}%', 100)} ({verdicts_of(g)}) vs SM+R "
                   f"{ur.text('{:.0f}%', 100)} ({verdicts_of(r)})")
    return _result(out, cmp.verdict, sg.mean > sr.mean,
                   f"top-bin share SM+G {sg.text(**pct)} vs SM+R {sr.text(**pct)} (paper: 58% vs 23-24%); "
                   f"SM+G − SM+R {cmp.text()}; bins SM+G {bins(g)}, SM+R {bins(r)} %{uniform}")


def claim_c3(rows: Sequence[RunRow]) -> dict:
    """(C3) PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G."""
    rows = as_rows(rows)
    names = ["SM+LN+G", "SM+LN+R", "SM+R", "SM+G"]
    groups = [seed_group(rows, n) for n in names]
    out = {"id": "C3", "claim": "PPL order SM+LN+G <= SM+LN+R < SM+R < SM+G"}
    if not all(groups):
        return _result(out, UNTESTABLE, None, "variants missing")
    spreads = [spread_of(g, ppl_of) for g in groups]
    strict = [False, True, True]
    cmps = [compare(a, b, ppl_of, lower_ppl, s, unit="%") for a, b, s in zip(groups, groups[1:], strict)]
    verdicts = [c.verdict for c in cmps]
    parts = [a.mean <= b.mean if not s else a.mean < b.mean for a, b, s in zip(spreads, spreads[1:], strict)]
    chain = f"{names[0]} {spreads[0].text()}"
    for c, s, n, sp in zip(cmps, strict, names[1:], spreads[1:]):
        op = ("<=" if not s else "<") if c.verdict == HOLDS else (">" if not s else ">=") \
            if c.verdict == CONTRADICTED else "~"
        chain += f" {op} {n} {sp.text()}"
    links = "; ".join(f"{a} vs {b}: {c.text()}" for a, b, c in zip(names, names[1:], cmps))
    return _result(out, _combine(verdicts), all(parts), chain + " (paper: 2.69 <= 2.76 < 2.94 < 3.20; ~ = not "
                   "resolved); PPL saved by the left variant, " + links, parts=parts, part_verdicts=verdicts)


def claim_c4(rows: Sequence[RunRow]) -> dict:
    """(C4) EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN (and, reported beside it, than the clean control
    SM(t)+ScFuFFN, which differs from it by the regularizer alone)."""
    rows = as_rows(rows)
    e, s = seed_group(rows, "EReg(SM(t)+ScFuFFN)"), seed_group(rows, "SM+ScFuFFN")
    t = seed_group(rows, "SM(t)+ScFuFFN")
    out = {"id": "C4", "claim": "EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN"}
    if not e or not s:
        return _result(out, UNTESTABLE, None, "variants missing")
    se, ss = spread_of(e, ppl_of), spread_of(s, ppl_of)
    pe, ps = se.mean, ss.mean
    rel = (ps - pe) / ps * 100 if math.isfinite(ps) and math.isfinite(pe) else math.nan
    cmp = compare(e, s, ppl_of, lower_ppl, unit="%")
    extra = ""
    if t:
        ct = compare(e, t, ppl_of, lower_ppl, unit="%")
        extra = (f"; against SM(t)+ScFuFFN without the regularizer {spread_of(t, ppl_of).text()}: {ct.verdict}, "
                 f"{ct.text()}")
    return _result(out, cmp.verdict, pe < ps,
                   f"EReg(SM(t)+ScFuFFN) {se.text()} vs SM+ScFuFFN {ss.text()} "
                   f"({abs(rel):.1f}% {'lower' if rel >= 0 else 'higher'}; paper: 3.21 vs 3.48, 7.8% lower); "
                   f"PPL saved {cmp.text()}{extra}")


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
    the norm-free SM trains without NaN. None unless the rows span at least two learning rates. Every seed of a
    cell must train without NaN; the unscaled fused FFN (SM+FuFFN), when present, is reported as a control."""
    from privlm.report.analysis import stability_map
    presets, lrs, cells = stability_map(as_rows(rows))
    if len(lrs) < 2:
        return None
    out = {"id": "C1-stability", "claim": "WN(ffn)/SN(ffn)/Scaled-FFN train without NaN up to a larger learning "
                                          "rate than SM without normalization"}
    by_norm = {normalize_name(p): p for p in presets}
    sm = by_norm.get(normalize_name("SM"))
    fixes = [by_norm[normalize_name(f)] for f in NORM_FREE_FIXES if normalize_name(f) in by_norm]
    controls = [by_norm[normalize_name(f)] for f in NORM_FREE_CONTROLS if normalize_name(f) in by_norm]
    if sm is None or not fixes:
        return _result(out, UNTESTABLE, None, "SM or all of its fixes missing")
    limit = {p: stable_up_to(cells, p, lrs) for p in [sm, *fixes, *controls]}
    key = {p: -1.0 if v is None else v for p, v in limit.items()}
    holds = all(key[f] >= key[sm] for f in fixes) and any(key[f] > key[sm] for f in fixes)
    counts = [len(v) for (p, _), v in cells.items() if p in limit] or [0]
    per_cell = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"

    def one(p: str) -> str:
        v = limit[p]
        return f"{p}{' (control)' if p in controls else ''} {'none' if v is None else f'{v:g}'}"
    return {**out, "holds": holds, "verdict": HOLDS if holds else CONTRADICTED,
            "stable_up_to": {p: limit[p] for p in [sm, *fixes]},
            **({"controls_stable_up_to": {p: limit[p] for p in controls}} if controls else {}),
            "numbers": f"largest learning rate up to which every run ({per_cell} seed{'s' if max(counts) != 1 else ''} "
                       f"per cell) trained without NaN (of {', '.join(f'{lr:g}' for lr in lrs)}): "
                       + ", ".join(map(one, limit))}


def evaluate_claims(rows: Sequence[RunRow]) -> list[dict]:
    rows = as_rows(rows)
    return [claim_c1(rows), claim_c2(rows), claim_c3(rows), claim_c4(rows)]


def stored_claims(rows: Sequence[RunRow]) -> list[dict]:
    """The claims a sweep stores in its results.json: C1–C4 and, on a stability map, C1-stability."""
    rows = as_rows(rows)
    stability = claim_c1_stability(rows)
    return evaluate_claims(rows) + ([stability] if stability else [])


def verdict_text(claim: dict) -> str:
    v = claim.get("verdict") or {True: HOLDS, False: CONTRADICTED, None: UNTESTABLE}[claim["holds"]]
    return f"**{v}**" if v == CONTRADICTED else v


def claims_markdown(rows: Sequence[RunRow]) -> list[str]:
    lines = ["| Claim | Verdict | Numbers |", "|---|---|---|"]
    for c in evaluate_claims(rows):
        lines.append(f"| ({c['id']}) {c['claim']} | {verdict_text(c)} | {c['numbers']} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rewrite the ``claims`` of results.json files from their rows."""
    import json
    from pathlib import Path

    from privlm.errors import OneLineArgumentParser
    from privlm.fileio import atomic_write_text

    prog = "python -m privlm.report.claims"
    ap = OneLineArgumentParser(prog=prog, description=main.__doc__)
    ap.add_argument("results", nargs="+", metavar="RESULTS.json")
    args = ap.parse_args(argv)
    for name in args.results:
        path = Path(name)
        try:
            doc = json.loads(path.read_text())
            rows = as_rows(doc["rows"])
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            print(f"{prog}: error: '{path}' is not a readable results file: {exc}", file=sys.stderr)
            return 2
        except (KeyError, TypeError, AttributeError) as exc:
            print(f"{prog}: error: '{path}' has no well-formed 'rows': {exc}", file=sys.stderr)
            return 2
        doc["claims"] = stored_claims(rows)
        atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")  # as `privlm sweep` writes it
        print(f"{path}: claims rewritten from {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
