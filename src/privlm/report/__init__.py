"""Figures, results tables and the self-contained HTML report, built from run directories alone. The names below
are imported on first use (`privlm report --help` imports neither numpy nor matplotlib)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from privlm.errors import PrivlmError
from privlm.lazy import lazy_exports
from privlm.pi.summary import CostSummary
from privlm.results import RunRow

if TYPE_CHECKING:
    from privlm.report import analysis, figures, html
    from privlm.report.runs import RunData, load_run, load_runs

__all__ = ["RunData", "load_run", "load_runs", "collect", "build_report", "analysis", "figures", "html"]
lazy_exports(__name__, dict.fromkeys(["RunData", "load_run", "load_runs"], "privlm.report.runs"),
             submodules=("analysis", "figures", "html"))


def collect(runs: Sequence[RunData], baseline: Optional[str] = None,
            profile: Optional[str] = None) -> tuple[list[RunRow], list[Optional[CostSummary]], list[str]]:
    """Rows (one per run), predicted costs and notes. ``baseline`` names the run (directory name,
    label or preset) the savings are relative to; default the first run. ``profile``: default
    ``analysis.DEFAULT_PROFILE``."""
    from privlm.report import analysis

    profile = profile or analysis.DEFAULT_PROFILE
    notes: list[str] = []
    costs: list[Optional[CostSummary]] = []
    for run in runs:
        try:
            costs.append(analysis.predicted_cost(run, profile))
        except PrivlmError as exc:  # e.g. the profile lacks an op this architecture uses
            costs.append(None)
            notes.append(f"{run.label}: no cost prediction ({exc})")
    base_idx = 0
    if baseline is not None:
        matches = [i for i, r in enumerate(runs) if baseline in (r.path.name, r.label, r.preset)]
        if not matches:
            raise PrivlmError(f"baseline '{baseline}' is none of the runs: "
                              f"{', '.join(r.path.name for r in runs)}")
        base_idx = matches[0]
    rows = [analysis.run_row(run, cost, costs[base_idx], runs[base_idx]) for run, cost in zip(runs, costs)]
    return rows, costs, notes


def build_report(run_dirs: Sequence[str | Path], out_html: Path, figures_dir: Optional[Path] = None,
                 baseline: Optional[str] = None, title: str = "privlm report",
                 profile: Optional[str] = None, extra_notes: Sequence[str] = ()) -> list[RunRow]:
    """Write the HTML report (and, when ``figures_dir`` is given, every figure as PNG)."""
    from privlm.report import figures, html
    from privlm.report.runs import load_runs

    runs = load_runs(list(run_dirs))
    rows, costs, notes = collect(runs, baseline, profile)
    specs = figures.build_figures(runs, costs)
    if figures_dir is not None:
        for spec in specs:
            figures.save_figure(spec, figures_dir)
    html.write_html(Path(out_html), html.render(rows, specs, title,
                                                list(extra_notes) + notes))
    return rows
