"""The paper's figures, drawn from run directories alone.

Every function takes loaded runs (`privlm.report.runs.RunData`) and returns a matplotlib `Figure`
built without pyplot (no global state, no display needed: the Agg canvas renders PNG).
`build_figures` draws every figure that the given runs have data for; `save_figure` writes one as PNG, the
single figure format of privlm (docs/DECISIONS.md, "Figures: PNG only").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from privlm.fileio import slug
from privlm.report import analysis
from privlm.pi.summary import CostSummary
from privlm.report.runs import RunData

CMAP = "cividis"  # the authors' heatmap colormap


@dataclass
class FigureSpec:
    name: str  # file stem
    title: str
    caption: str
    figure: Figure


def _kilo(x: float, _pos=None) -> str:
    return f"{x / 1000:g}K" if abs(x) >= 1000 else f"{x:g}"


def _grid(n: int, ncols: int = 4, panel: tuple[float, float] = (3.6, 3.0)) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _annotated_heatmap(ax, values: np.ndarray, vmin: float, vmax: float, fmt: str = "{:.2f}",
                       fontsize: Optional[float] = None):
    L, H = values.shape
    from matplotlib import colormaps
    cmap = colormaps[CMAP].with_extremes(bad="#d0d0d0")  # NaN heads: grey cell, labelled "NaN"
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", origin="upper")
    if fontsize is None:
        fontsize = max(4.0, min(9.0, 60.0 / max(L, H)))
    mid = (vmin + vmax) / 2
    for i in range(L):
        for j in range(H):
            v = values[i, j]
            text = "NaN" if not np.isfinite(v) else fmt.format(v)
            color = "white" if np.isfinite(v) and v <= mid else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    return im


# --------------------------------------------------------------------------------------------
def head_entropy_heatmaps(runs: Sequence[RunData]) -> Optional[Figure]:
    """Fig. 3: final per-head entropy (nats), layer × head, values printed, one panel per run.

    The colour scale is shared by all panels and ends at the causal maximum (1/T)·Σ log i, the
    entropy of uniform causal attention, so panels of different runs are comparable."""
    runs = [r for r in runs if r.head_entropy() is not None]
    if not runs:
        return None
    vmax = max(analysis.causal_max_entropy(r.seq_len) for r in runs)
    fig, axes = _grid(len(runs))
    im = None
    for ax, run in zip(axes, runs):
        im = _annotated_heatmap(ax, run.head_entropy(), 0.0, vmax)
        ax.set_title(run.label, fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="head entropy (nats)")
    return fig


def entropy_bin_histogram(runs: Sequence[RunData], shared_max: bool = False) -> Optional[Figure]:
    """Fig. 2a / Fig. 7: % of heads in [0,max/4), [max/4,max/2), [max/2,3max/4), [3max/4,max]."""
    runs = [r for r in runs if r.head_entropy() is not None]
    if not runs:
        return None
    shares = analysis.bin_shares_for(runs, shared_max=shared_max)
    n = len(runs)
    width = 0.8 / n
    fig = Figure(figsize=(max(7.0, 1.2 + 0.55 * n * 4 * 0.5), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(4)
    for k, (run, share) in enumerate(zip(runs, shares)):
        bars = ax.bar(x - 0.4 + width * (k + 0.5), 100 * share, width, label=run.label,
                      hatch=None if k < 10 else "//")  # 10 colours in the cycle: hatch the rest
        fontsize = 7 if n <= 6 else 5
        for b, v in zip(bars, share):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.5, f"{100 * v:.0f}",
                    ha="center", va="bottom", fontsize=fontsize)
    ax.set_xticks(x, analysis.BIN_LABELS)
    ax.set_ylabel("% of heads")
    ax.set_xlabel("head entropy bin (max = " + ("largest head entropy over all runs" if shared_max
                                              else "largest head entropy of each run") + ")")
    ax.legend(fontsize=7, ncols=2 if n > 6 else 1)
    return fig


def eval_loss_curves(runs: Sequence[RunData]) -> Optional[Figure]:
    """Fig. 2b: validation cross-entropy vs tokens trained, one curve per run (every evaluation the run
    recorded), the final whole-split evaluation as a star when it differs from the curve's slice."""
    runs = [r for r in runs if r.eval]
    if not runs:
        return None
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    whole_labelled = False
    for k, run in enumerate(runs):
        # every evaluation of metrics.jsonl: the curve is the evaluations on the curve's slice (the token count
        # of the first one, train.eval_curve_batches); one on a different count (the final evaluation on the
        # whole split, train.eval_max_batches) is drawn as a star of the run's colour
        curve = [rec for rec in run.eval if rec.get("tokens") == run.eval[0].get("tokens")]
        other = [rec for rec in run.eval if rec.get("tokens") != run.eval[0].get("tokens")]
        # the default cycle has 10 colours: later runs get dashed lines so that no two curves look alike
        (line,) = ax.plot([run.tokens_at(rec["step"]) for rec in curve], [rec["loss"] for rec in curve],
                          marker="o", ms=3, ls="-" if k < 10 else "--",
                          label=run.label + (" (diverged)" if run.diverged else ""))
        if other:
            ax.plot([run.tokens_at(rec["step"]) for rec in other], [rec["loss"] for rec in other], ls="none",
                    marker="*", ms=9, color=line.get_color(),
                    label=None if whole_labelled else "final, whole validation split")
            whole_labelled = True
    ax.set_xlabel("tokens trained")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x / 1e6:g}M" if x >= 1e6 else _kilo(x)))
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2 if len(runs) > 6 else 1)
    return fig


def _per_layer_lines(runs: Sequence[RunData], values, ylabel: str, panel: tuple[float, float]):
    """One panel per run, one line per layer over the logged entropy steps; `values(rec)` gives the L values
    of one entropy record. Returns (figure, axes, the [step, layer] array of each run)."""
    fig, axes = _grid(len(runs), ncols=3, panel=panel)
    all_series = []
    for ax, run in zip(axes, runs):
        steps = [rec["step"] for rec in run.entropy]
        series = np.array([values(rec) for rec in run.entropy], float)
        all_series.append(series)
        colors = _layer_colors(series.shape[1])
        for layer in range(series.shape[1]):
            ax.plot(steps, series[:, layer], color=colors[layer], label=f"L{layer}", lw=1.4)
        ax.set_title(run.label, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_formatter(FuncFormatter(_kilo))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncols=2)
    return fig, axes, all_series


def layer_entropy_dynamics(runs: Sequence[RunData]) -> Optional[Figure]:
    """Fig. 5 / Fig. 8: layerwise mean entropy vs training step, one line per layer, one panel per run."""
    runs = [r for r in runs if r.entropy]
    if not runs:
        return None
    fig, axes, _ = _per_layer_lines(runs, lambda rec: [math.nan if v is None else v for v in rec["layer_mean"]],
                                 "mean entropy (nats)", panel=(4.2, 3.0))
    for ax, run in zip(axes, runs):
        ax.axhline(analysis.causal_max_entropy(run.seq_len), color="gray", ls=":", lw=1)
        ax.set_ylim(bottom=0)
    return fig


def _layer_colors(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def nan_counts(runs: Sequence[RunData]) -> Optional[Figure]:
    """AERO Fig. 6: NaN entries in the attention matrices per layer vs step, one panel per run."""
    runs = [r for r in runs if r.entropy]
    if not runs:
        return None
    fig, axes, series = _per_layer_lines(runs, lambda rec: rec.get("nan_counts") or [0] * len(rec["layer_mean"]),
                                 "NaN count", panel=(4.2, 2.8))
    for ax, run, counts in zip(axes, runs, series):
        total = int(np.nansum(counts))
        ax.set_title(f"{run.label}: {total} NaN" if total else f"{run.label}: no NaN", fontsize=10)
    return fig


def learned_thresholds(run: RunData) -> Optional[Figure]:
    """Fig. 6: (a) learned θ, layer × head, (b) per-layer mean and variance of θ."""
    theta = run.thresholds()
    if theta is None:
        return None
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax_map, ax_stats = fig.subplots(1, 2, width_ratios=[1.1, 1])
    im = _annotated_heatmap(ax_map, theta, float(np.nanmin(theta)), float(np.nanmax(theta)))
    fig.colorbar(im, ax=ax_map, label="θ (fraction of log T)")
    fig.suptitle(f"Learned thresholds θ of the entropy regularizer: {run.label}", fontsize=11)
    ax_map.set_title("(a) θ per head", fontsize=10)
    layers = np.arange(theta.shape[0])
    ax_stats.plot(layers, np.nanmean(theta, axis=1), marker="o", color="C0", label="mean")
    ax_stats.set_xlabel("layer")
    ax_stats.set_ylabel("mean θ", color="C0")
    ax_var = ax_stats.twinx()
    ax_var.plot(layers, np.nanvar(theta, axis=1), marker="s", color="C1", label="variance")
    ax_var.set_ylabel("variance of θ", color="C1")
    ax_stats.set_xticks(layers, [f"L{i}" for i in layers])
    ax_stats.set_title("(b) per-layer mean and variance", fontsize=10)
    ax_stats.grid(alpha=0.3)
    return fig


def ppl_vs_cost(runs: Sequence[RunData], costs: Sequence[Optional[CostSummary]], key: str) -> Optional[Figure]:
    """PPL vs predicted communication (key="comm_gb") or latency (key="lat_min"), with the Pareto
    front of the runs that did not diverge (lower cost and lower PPL are both better)."""
    unit = {"comm_gb": "communication (GB)", "lat_min": "latency (min)"}[key]
    pts = [(run, getattr(c, key)) for run, c in zip(runs, costs) if c is not None]
    if not pts:
        return None
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    finite = [(r, x) for r, x in pts if math.isfinite(r.final_ppl)]
    bad = [(r, x) for r, x in pts if not math.isfinite(r.final_ppl)]
    xs = np.array([x for _, x in finite])
    ys = np.array([r.final_ppl for r, _ in finite])
    if finite:
        front = analysis.pareto_front(list(zip(xs, ys)))
        on = np.zeros(len(finite), bool)
        on[front] = True
        if (~on).any():
            ax.scatter(xs[~on], ys[~on], color="C0", zorder=3, label="dominated")
        ax.scatter(xs[on], ys[on], color="C3", zorder=4, label="Pareto front")
        order = sorted(front, key=lambda i: xs[i])
        ax.step(xs[order], ys[order], where="post", color="C3", lw=1.2, zorder=2)
        for (run, x), y in zip(finite, ys):
            ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if bad:  # diverged runs have no PPL: mark them along the top edge so their cost is still shown
        top = (ys.max() * 1.08) if finite else 1.0
        for run, x in bad:
            ax.scatter([x], [top], marker="x", color="gray", zorder=3)
            ax.annotate(run.label + " (NaN)", (x, top), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color="gray")
    ax.set_xlabel(f"predicted {unit}, one token after a T-token prompt")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _trace_value(x) -> float:
    return math.nan if x is None or abs(x) >= 1e308 else float(x)


def flight_recorder_trace(run: RunData) -> Optional[Figure]:
    """The flight recorder's window before a divergence: per layer, mean head entropy, max attention logit
    (max over heads) and mean residual norm, and the loss / gradient norm, vs step; dashed line: the step whose
    update was non-finite; dotted lines: the first collapse / blow-up the verdict names."""
    trace = run.flight
    if trace is None:
        return None
    recs = trace["records"] + ([trace["at_divergence"]] if trace.get("at_divergence") else [])
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    ent = np.array([[np.nanmean([_trace_value(v) for v in row]) for row in r["head_entropy"]] for r in recs])
    logit = np.array([[np.nanmax([_trace_value(v) for v in row] + [-math.inf]) for row in r["max_logit"]]
                      for r in recs])
    resid = np.array([[_trace_value(v) for v in r["resid_norm"]] for r in recs])
    fig = Figure(figsize=(13.0, 3.3), layout="constrained")
    axes = fig.subplots(1, 4)
    colors = _layer_colors(ent.shape[1])
    for ax, values, ylabel, log in ((axes[0], ent, "mean head entropy (nats)", False),
                                    (axes[1], logit, "max attention logit", True),
                                    (axes[2], resid, "mean residual norm", True)):
        for layer in range(values.shape[1]):
            ax.plot(steps, np.where(np.isfinite(values[:, layer]), values[:, layer], np.nan), marker=".", ms=3,
                    color=colors[layer], label=f"L{layer}")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
    axes[0].axhline(analysis.causal_max_entropy(run.seq_len), color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=6, ncols=2)
    axes[3].plot(steps, [_trace_value(r["loss"]) for r in recs], marker=".", color="k", label="loss")
    axes[3].plot(steps, [_trace_value(r["grad_norm"]) for r in recs], marker=".", color="C3", label="grad norm")
    axes[3].set_yscale("log")
    axes[3].legend(fontsize=7)
    events = (trace.get("verdict") or {}).get("events") or {}
    for ax in axes:
        ax.axvline(trace["divergence_step"], color="C3", ls="--", lw=1)
        for kind, ev in events.items():
            if ev is not None:
                ax.axvline(ev["step"], color={"collapse": "C0", "logit_blowup": "C1", "resid_blowup": "C2"}[kind],
                           ls=":", lw=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.label}: non-finite at step {trace['divergence_step']}", fontsize=10)
    return fig


def stability_map_figure(runs: Sequence[RunData]) -> Optional[Figure]:
    """Variants x learning rate: green cells trained to the end (validation PPL printed), red cells diverged
    (step printed, shade = how early: the darker, the earlier), with the flight recorder's first event.
    Several seeds of one cell are printed one per line; the shade follows the worst seed. Drawn when the runs
    span at least two learning rates."""
    rows = [analysis.run_row(r, None, None) for r in runs]
    presets, lrs, cells = analysis.stability_map(rows)
    if len(lrs) < 2:
        return None
    from matplotlib import colormaps
    fig = Figure(figsize=(1.2 + 1.9 * len(lrs), 0.9 + 0.55 * len(presets)), layout="constrained")
    ax = fig.subplots()
    shade = np.full((len(presets), len(lrs)), np.nan)
    for (preset, lr), cell in cells.items():
        i, j = presets.index(preset), lrs.index(lr)
        div = [r for r in cell if r.diverged]
        # 1 = trained to the end; diverged: fraction of the budget reached, mapped below 0 so the colormap
        # turns red; runs still unfinished leave the cell blank
        if div:
            shade[i, j] = -1.0 + min(r.divergence_step / r.max_steps for r in div)
        elif all(r.finished for r in cell):
            shade[i, j] = 1.0
        texts = [t.replace(" (", "\n(") for t in analysis.stability_cell_text(cell).split(" / ")]
        ax.text(j, i, "\n".join(texts), ha="center", va="center", fontsize=6.5 if len(texts) == 1 else 5.5)
    ax.imshow(np.ma.masked_invalid(shade), cmap=colormaps["RdYlGn"], vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(presets)), presets)
    ax.set_xlabel("peak learning rate")
    return fig


# --------------------------------------------------------------------------------------------
def build_figures(runs: Sequence[RunData], costs: Optional[Sequence[Optional[CostSummary]]] = None) -> list[FigureSpec]:
    """Every figure the runs have data for, in the paper's order."""
    costs = list(costs) if costs is not None else [None] * len(runs)
    specs: list[FigureSpec] = []

    def add(name: str, title: str, caption: str, make: Callable[[], Optional[Figure]]) -> None:
        fig = make()
        if fig is not None:
            specs.append(FigureSpec(name, title, caption, fig))

    add("entropy-bins", "Head-entropy histogram (Fig. 2a / Fig. 7)",
        "Share of heads per entropy bin; max is the largest head entropy of each run (the paper's convention).",
        lambda: entropy_bin_histogram(runs))
    add("eval-loss", "Validation loss (Fig. 2b)", "Validation cross-entropy vs tokens trained.",
        lambda: eval_loss_curves(runs))
    add("entropy-heatmaps", "Headwise entropy (Fig. 3)",
        "Final per-head entropy in nats (query-averaged, causal); the colour scale ends at the causal "
        "maximum (1/T)·Σ log i.", lambda: head_entropy_heatmaps(runs))
    add("layer-entropy", "Layerwise mean entropy during training (Fig. 5 / Fig. 8)",
        "Mean entropy of each layer vs step; dotted line: the causal maximum.",
        lambda: layer_entropy_dynamics(runs))
    for run in runs:
        add(f"thresholds-{slug(run.label)}", f"Learned thresholds, {run.label} (Fig. 6)",
            "θ of the entropy regularizer (threshold = θ·log T) and its per-layer mean and variance.",
            lambda run=run: learned_thresholds(run))
    add("nan-counts", "NaN counts in attention (AERO Fig. 6)", "NaN entries of the attention matrices per layer.",
        lambda: nan_counts(runs))
    add("stability-map", "Stability map",
        "Variant x peak learning rate: trained to the end (PPL) or diverged (NaN @ step, and the flight "
        "recorder's first event with how many steps before the divergence and where).",
        lambda: stability_map_figure(runs))
    for run in runs:
        add(f"flight-{slug(run.path.name)}", f"Flight recorder, {run.label}",
            "The recorded window before the non-finite step (dashed red): per layer mean head entropy, max "
            "attention logit and mean residual norm; loss and gradient norm. Dotted: the first collapse (blue), "
            "logit blow-up (orange), residual blow-up (green).", lambda run=run: flight_recorder_trace(run))
    add("ppl-vs-comm", "PPL vs communication",
        "Predicted 2PC communication (cost profile in the summary table) vs validation PPL; red: Pareto front.",
        lambda: ppl_vs_cost(runs, costs, "comm_gb"))
    add("ppl-vs-latency", "PPL vs latency",
        "Predicted 2PC latency vs validation PPL; red: Pareto front.",
        lambda: ppl_vs_cost(runs, costs, "lat_min"))
    return specs


FIGURE_DPI = 110


def save_figure(spec: FigureSpec, out_dir: Path) -> Path:
    """Write ``spec`` as ``out_dir/<name>.png`` atomically (never through a symbolic link) and return its path."""
    import io

    from privlm.fileio import RunDirectory
    target = RunDirectory(out_dir)
    target.mkdir()
    buf = io.BytesIO()
    spec.figure.savefig(buf, format="png", dpi=FIGURE_DPI)
    return target.write_bytes(f"{spec.name}.png", buf.getvalue())
