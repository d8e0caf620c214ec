"""One self-contained HTML report for a set of runs: summary table, diagnosis, every figure.

Images are embedded as base64 PNG data URIs and the style sheet is inline, so the file opens
offline, can be mailed or attached to an issue, and needs nothing but a browser.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from pathlib import Path
from typing import Optional, Sequence

from privlm import __version__
from privlm.results import RunRow
from privlm.report import analysis
from privlm.report.figures import FigureSpec

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;
     color:#1b1b1b;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0} th,td{border:1px solid #ccc;padding:.3em .5em;
     text-align:right;vertical-align:top} th{background:#f2f2f2} td.l,th.l{text-align:left}
td.bad{background:#fde2e1} td.warn{background:#fff4d6} td.ok{background:#e5f5e5}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} .meta{color:#666;font-size:.85em} code{font-size:.9em}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(x, fmt: str = "{:,.2f}", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def _flops(x) -> str:
    return "–" if x is None else f"{x / 1e9:.3g}B" if x >= 1e8 else f"{x / 1e6:.3g}M"


def _bytes(x) -> str:
    return "–" if x is None else f"{x / 1e9:.3f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def png_data_uri(spec: FigureSpec, dpi: int = 100) -> str:
    buf = io.BytesIO()
    spec.figure.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def summary_table(rows: Sequence[RunRow]) -> str:
    head = ["run", "preset", "params", "tokens trained", "steps", "final PPL", "#nonlinear ops (paper)",
            "FFN FLOPs", "Attn FLOPs (paper)", "Attn FLOPs (dense)", "pred. Comm", "pred. Lat",
            "Comm sav.", "Lat sav.", "SPU-measured"]
    out = ['<table id="summary-table"><thead><tr>' + "".join(
        f'<th class="{"l" if i < 2 or i == 6 else ""}">{_e(h)}</th>' for i, h in enumerate(head)) + "</tr></thead><tbody>"]
    for r in rows:
        status = "" if r.finished else " (unfinished)"
        ppl = "NaN (diverged)" if r.diverged else _num(r.ppl, "{:.3f}")
        spu = "–" if r.spu_bytes is None else f"{_bytes(r.spu_bytes)} ({_e(r.spu_protocol or '')})"
        c = r.cost
        cells = [
            f'<td class="l">{_e(r.name)}{status}</td>', f'<td class="l">{_e(r.preset)}</td>',
            f"<td>{_num(r.params, '{:,}')}</td>", f"<td>{_num(r.tokens_trained, '{:,}')}</td>",
            f"<td>{_num(r.steps, '{:,}')}</td>",
            f'<td class="{"bad" if r.diverged else ""}">{ppl}</td>',
        ]
        if c is None:
            cells += ['<td class="l">–</td>'] + ["<td>–</td>"] * 7
        else:
            cells += [
                f'<td class="l">{_e(c.nonlinear)}</td>',
                f"<td>{_flops(c.ffn_flops)}</td>", f"<td>{_flops(c.attn_flops_paper)}</td>",
                f"<td>{_flops(c.attn_flops_dense)}</td>",
                f"<td>{_num(c.comm_gb, '{:.3f} GB')}</td>", f"<td>{_num(c.lat_min, '{:.3f} min')}</td>",
                f"<td>{_num(c.comm_savings, '{:.2f}×')}</td>", f"<td>{_num(c.lat_savings, '{:.2f}×')}</td>",
            ]
        cells.append(f"<td>{spu}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


VERDICT_CLASS = {"ok": "ok", "healthy": "ok", "overload": "warn", "uniform": "", "too early": ""}


def _verdict_class(word: str) -> str:
    if word.startswith("too early"):
        return ""
    if word.startswith("entropic overload"):
        return "warn"
    return VERDICT_CLASS.get(word, "bad")


def diagnosis_table(rows: Sequence[RunRow]) -> str:
    with_diag = [(r.label, r.diagnosis) for r in rows if r.diagnosis is not None]
    if not with_diag:
        return "<p>No entropy telemetry in these runs.</p>"
    n_layers = max(len(d.layer_verdicts) for _, d in with_diag)
    head = (["run", "verdict"] + [f"L{i}" for i in range(n_layers)] + ["near-uniform heads"]
            + [f"bin {lab}" for lab in analysis.BIN_LABELS] + ["NaN entries"])
    out = ['<table id="diagnosis-table"><thead><tr>' + "".join(
        f'<th class="{"l" if i < 2 else ""}">{_e(h)}</th>' for i, h in enumerate(head))
           + "</tr></thead><tbody>"]
    for label, d in with_diag:
        cells = [f'<td class="l">{_e(label)}</td>',
                 f'<td class="l {_verdict_class(d.verdict)}">{_e(d.verdict)}</td>']
        excess = d.excess_vs_baseline
        for i in range(n_layers):
            if i < len(d.layer_verdicts):
                v, mean = d.layer_verdicts[i], d.layer_mean_entropy[i]
                vs = ""
                if excess is not None and excess[i] is not None:
                    vs = f'<br><span class="meta">{excess[i]:+.2f} vs baseline</span>'
                cells.append(f'<td class="{_verdict_class(v)}">{v}<br><span class="meta">{_num(mean, "{:.2f}")} '
                             f"nats</span>{vs}</td>")
            else:
                cells.append("<td></td>")
        cells.append(f"<td>{100 * d.near_uniform_share:.0f}%</td>")
        cells += [f"<td>{100 * s:.1f}%</td>" for s in d.bin_shares]
        cells.append(f"<td>{_num(d.nan_total, '{:,.0f}')}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render(rows: Sequence[RunRow], figures: Sequence[FigureSpec], title: str = "privlm report",
           notes: Optional[Sequence[str]] = None) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    profile = next((r.cost.profile for r in rows if r.cost is not None and r.cost.profile), None)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">privlm {__version__} · generated {now} · {len(rows)} run(s)'
        + (f" · cost profile <code>{_e(profile)}</code>" if profile else "") + "</p>",
    ]
    for note in notes or []:
        parts.append(f"<p>{_e(note)}</p>")
    parts += [
        "<h2>Summary</h2>", summary_table(rows),
        '<p class="meta">PPL: exp of the mean validation cross-entropy at the end of training. Costs: '
        "predicted 2PC cost of generating one token after a T-token prompt (the paper's workload), from the "
        "nonlinear-op census and the cost profile; savings relative to the first run (or the sweep's "
        "baseline). Attn FLOPs (paper) uses the paper's 8LTd²+3LT²d convention, (dense) counts both T×T "
        "products. SPU-measured: bytes of a real SecretFlow SPU run of the checkpoint, when one was saved "
        "in the run directory.</p>",
        "<h2>Diagnosis</h2>", diagnosis_table(rows),
        '<p class="meta">Per layer (final head entropies; causal maximum log(T!)/T): <b>overload</b> = at least '
        "half of the heads near-uniform (at least 95% of the causal maximum) while some other layer has left "
        "uniform attention; <b>uniform</b> = the same, but no layer has left it yet: the model is too early to "
        "judge; <b>collapse</b> = at least half of the heads below 0.1 nats, or NaN attention entries at any "
        "logged step. Under each layer: its mean head entropy and, for runs compared with the baseline, the "
        "difference from the baseline's same layer (10% of the causal maximum or more marks overload relative "
        "to the baseline). The paper's four bins (max = the run's largest head entropy) are reported as "
        "figures only. Criteria: docs/DECISIONS.md.</p>",
    ]
    for r in rows:
        if r.diagnosis_summary:
            parts.append(f'<p><b>{_e(r.label)}</b>: {_e(r.diagnosis_summary)}</p>')
    parts.append("<h2>Figures</h2>")
    for spec in figures:
        parts.append(f'<figure id="fig-{_e(spec.name)}"><img alt="{_e(spec.title)}" src="{png_data_uri(spec)}">'
                     f"<figcaption><b>{_e(spec.title)}.</b> {_e(spec.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: Path, text: str) -> None:
    """Write atomically (`privlm.fileio.atomic_write_text`): an interrupted report or a full disk never leaves
    a truncated file or a temporary one behind, and a symbolic link at ``path`` is refused, not followed."""
    from privlm.fileio import atomic_write_text
    atomic_write_text(path, text)
