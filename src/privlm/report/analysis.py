"""Numbers the report and the sweep tables derive from runs: entropy bins and verdicts (through
`privlm.entropy`), predicted PI cost (through `privlm.pi`), the Pareto front, and table rows."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from privlm import entropy as ent
from privlm.report.runs import RunData
from privlm.results import EntropyDiagnosis, FlightSummary, RunRow, as_rows

if TYPE_CHECKING:
    from privlm.pi.summary import CostSummary

BIN_LABELS = ent.BIN_LABELS
DEFAULT_PROFILE = "paper-fit"


def causal_max_entropy(T: int) -> float:
    return ent.causal_entropy_max(T)


def bin_shares_for(runs: Sequence[RunData], shared_max: bool = False) -> list[np.ndarray]:
    """Fig. 2a shares of each run; max per run (the paper's reading) or shared by all runs."""
    mats = [r.head_entropy() for r in runs]
    common = ent.shared_max(*mats) if shared_max else None
    return [np.array(ent.entropy_bins(m, common).shares) for m in mats]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (x and y both minimized; ties kept once)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front)


def last_nan_counts(run: RunData) -> Optional[list[float]]:
    """Per-layer NaN counts summed over all telemetry records (a NaN at any step is a collapse sign)."""
    if not run.entropy:
        return None
    rows = [rec.get("nan_counts") for rec in run.entropy if rec.get("nan_counts") is not None]
    if not rows:
        return None
    return np.nansum(np.array(rows, float), axis=0).tolist()


def diagnosis(run: RunData, baseline: Optional[RunData] = None) -> Optional[EntropyDiagnosis]:
    """`privlm.entropy.diagnosis` of the final head entropies, with NaN counts over the whole run and, when a
    baseline run of the same depth and T is given, the per-layer comparison with its final entropies, reduced
    to the result row's `EntropyDiagnosis`."""
    m = run.head_entropy()
    if m is None:
        return None
    base = None
    if baseline is not None and baseline is not run and baseline.seq_len == run.seq_len:
        base = baseline.head_entropy()
        if base is not None and base.shape[0] != m.shape[0]:
            base = None
    nans = last_nan_counts(run)
    d = ent.diagnosis(m, nans, T=run.seq_len, baseline=base)
    vs = d.vs_baseline
    return EntropyDiagnosis(
        bin_shares=tuple(d.bins.shares), bin_max=d.bins.max_value, layer_mean_entropy=tuple(None if math.isnan(v) else v for v in d.layer_mean),
        deep_layer_min_entropy=deep_layer_entropy(d.layer_mean), nan_total=float(np.nansum(nans or [0.0])),
        overloaded=d.overload.overloaded, overloaded_layers=tuple(d.overload.overloaded_layers),
        collapsed=d.collapse.collapsed, collapsed_layers=tuple(d.collapse.collapsed_layers),
        too_early=d.overload.too_early, near_uniform_share=d.overload.share,
        layer_verdicts=tuple(d.layer_verdicts), verdict=d.verdict,
        excess_vs_baseline=tuple(vs["excess_nats"]) if vs else None,
        overloaded_vs_baseline=tuple(vs["overloaded_layers"]) if vs else None)


def predicted_cost(run: RunData, profile: str = DEFAULT_PROFILE) -> "CostSummary":
    """Census (nonlinear ops, FLOPs) and predicted 2PC Comm/Lat of the run's architecture at its T."""
    from privlm import pi
    c = pi.census(run.cfg.model, run.seq_len)
    return pi.CostSummary.of(c, pi.predict(c, profile))


def deep_layer_entropy(layer_means: Sequence[float]) -> float:
    """Lowest mean entropy of the deeper half of the layers (collapse shows up there first); the means are the
    diagnosis's, in which impossible head entropies already count as NaN."""
    deep = np.asarray(layer_means, dtype=float)[len(layer_means) // 2:]
    return float(np.nanmin(deep)) if np.any(np.isfinite(deep)) else math.nan


def flight_summary(run: RunData) -> Optional[FlightSummary]:
    """The flight recorder's verdict of a diverged run: the first event (collapse / logit blow-up / residual
    blow-up), its step, how many steps before the divergence, and the one-line verdict."""
    if run.flight is None:
        return None
    from privlm.flight_trace import verdict_line
    v = run.flight.get("verdict") or {}
    first = v.get("first")
    ev = (v.get("events") or {}).get(first) if first else None
    return FlightSummary(first=first, first_all=tuple(v.get("first_all") or ([first] if first else [])),
                         event_step=ev["step"] if ev else None, steps_before=ev["steps_before"] if ev else None,
                         where=tuple(f"L{w['layer']}" + (f"h{w['head']}" if w.get("head") is not None else "")
                                     for w in ev["where"]) if ev else (),
                         line=verdict_line(run.flight))


EVENT_ABBREV = {"collapse": "collapse", "logit_blowup": "logit", "resid_blowup": "resid"}


def stability_map(rows: Sequence["RunRow"]) -> tuple[list[str], list[float], dict[tuple[str, float], list["RunRow"]]]:
    """Group result rows by (preset, learning rate): the presets in order of first appearance, the sorted
    learning rates, and the rows (one per seed) of each cell."""
    presets: list[str] = []
    cells: dict[tuple[str, float], list[RunRow]] = {}
    for r in as_rows(rows):
        if r.lr is None:
            continue
        if r.preset not in presets:
            presets.append(r.preset)
        cells.setdefault((r.preset, r.lr), []).append(r)
    lrs = sorted({lr for _, lr in cells})
    return presets, lrs, cells


def stability_cell_text(cell_rows: Sequence["RunRow"]) -> str:
    """'PPL 74.2' / 'NaN @ 24 (collapse -6: L3h1)' per seed, joined by ' / '."""
    parts = []
    for r in as_rows(cell_rows):
        if r.diverged:
            text = f"NaN @ {r.divergence_step}"
            fl = r.flight
            if fl and fl.first:
                kinds = "+".join(EVENT_ABBREV[k] for k in fl.first_all or [fl.first])
                text += f" ({kinds} -{fl.steps_before}: {','.join(fl.where[:2])})"
            parts.append(text)
        elif not r.finished:
            parts.append("unfinished")
        elif r.ppl is not None:
            parts.append(f"PPL {r.ppl:.1f}" if r.ppl < 1e6 else f"PPL {r.ppl:.3g}")  # an exploded but finite run
        else:
            parts.append("–")
    return " / ".join(parts)


def run_row(run: RunData, cost: Optional["CostSummary"], baseline_cost: Optional["CostSummary"],
            baseline: Optional[RunData] = None) -> RunRow:
    """One row of the results table (paper Table 3 layout plus entropy diagnostics)."""
    summary = run.summary or {}
    return RunRow(
        name=run.path.name, label=run.label, preset=run.preset, params=run.params,
        tokens_trained=run.tokens_trained, steps=summary.get("steps"), finished=run.finished, diverged=run.diverged,
        diagnosis_summary=summary.get("diagnosis"), final_loss=summary.get("final_loss"),
        unigram_ppl=summary.get("unigram_ppl"),  # same tokenizer's unigram model, if recorded
        ppl=None if not math.isfinite(run.final_ppl) else run.final_ppl,
        lr=run.cfg.train.lr, seed=run.cfg.train.seed, max_steps=run.cfg.train.max_steps,
        divergence_step=run.divergence_step, flight=flight_summary(run),
        cost=(cost.relative_to(baseline_cost) if baseline_cost is not None else cost) if cost is not None else None,
        spu_bytes=run.pi_measured.get("bytes_total") if run.pi_measured is not None else None,
        spu_protocol=run.pi_measured.get("protocol") if run.pi_measured is not None else None,
        diagnosis=diagnosis(run, baseline))
