"""The divergence flight recorder's trace format (RUN_DIR/flight_recorder.json): its constants, the verdict
computed from a trace, the one-line and tabular renderings and the reader. A leaf module (standard library,
``privlm.errors`` and the collapse threshold only): the recorder (``privlm.train.flight_recorder``) writes
traces, ``privlm.report`` and ``privlm entropy RUN`` read them without importing the trainer."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from privlm.entropy.measure import COLLAPSE_NATS
from privlm.errors import CheckpointError

FLIGHT_FILE = "flight_recorder.json"
FORMAT = "privlm-flight-recorder/1"
BLOWUP_FACTOR = 10.0
LOGIT_FLOOR = 10.0


def json_number(x) -> Optional[float]:
    """A JSON-safe number: NaN -> null, +-inf -> +-1e308 (JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else (None if math.isnan(x) else math.copysign(1e308, x))


def _val(x) -> float:
    return math.nan if x is None else float(x)


def _bad(x) -> bool:
    return not math.isfinite(_val(x)) or abs(_val(x)) >= 1e308


def _events(records: list[dict], start: dict) -> dict[str, Optional[dict]]:
    """First record at which each kind of event shows, with the layers/heads it shows in."""
    found: dict[str, Optional[dict]] = {"collapse": None, "logit_blowup": None, "resid_blowup": None}
    for rec in records:
        where = {
            "collapse": [(l, h, _val(v)) for l, row in enumerate(rec["head_entropy"]) for h, v in enumerate(row)
                         if _bad(v) or _val(v) < COLLAPSE_NATS],
            "logit_blowup": [(l, h, _val(v)) for l, row in enumerate(rec["max_logit"]) for h, v in enumerate(row)
                             if _bad(v) or (_val(v) >= LOGIT_FLOOR
                                            and _val(v) >= BLOWUP_FACTOR * abs(_val(start["max_logit"][l][h])))],
            "resid_blowup": [(l, None, _val(v)) for l, v in enumerate(rec["resid_norm"])
                             if _bad(v) or _val(v) >= BLOWUP_FACTOR * _val(start["resid_norm"][l])],
        }
        for kind, hits in where.items():
            if hits and found[kind] is None:
                found[kind] = {"step": rec["step"], "where": [{"layer": l, "head": h, "value": None if not
                                                               math.isfinite(v) else v} for l, h, v in hits]}
    return found


def verdict(trace: dict) -> dict:
    """Which event (collapse / logit blow-up / residual blow-up) came first, where, and how many steps before
    the divergence step; also the first non-finite layer of the diverging step itself."""
    records = trace["records"] + ([trace["at_divergence"]] if trace.get("at_divergence") else [])
    if not records:
        return {}
    start = records[0]
    events = _events(records, start)
    step = trace["divergence_step"]
    for ev in events.values():
        if ev is not None:
            ev["steps_before"] = step - ev["step"]
            ev["at_window_start"] = ev["step"] == start["step"]
    seen = {kind: ev["step"] for kind, ev in events.items() if ev is not None}
    earliest = min(seen.values()) if seen else None
    together = [kind for kind, st in seen.items() if st == earliest]  # events first seen at the same step
    return {"window": [start["step"], records[-1]["step"]], "events": events,
            "first": together[0] if together else None, "first_all": together}


def _where_text(ev: dict, kind: str, limit: int = 4) -> str:
    unit = {"collapse": "nats", "logit_blowup": "max logit", "resid_blowup": "resid norm"}[kind]
    parts = []
    for w in ev["where"][:limit]:
        name = f"L{w['layer']}" + (f"h{w['head']}" if w["head"] is not None else "")
        parts.append(f"{name} ({'non-finite' if w['value'] is None else format(w['value'], '.3g')} {unit})"
                     if kind != "collapse" else
                     f"{name} ({'NaN' if w['value'] is None else format(w['value'], '.3f')} {unit})")
    more = len(ev["where"]) - limit
    return ", ".join(parts) + (f" +{more} more" if more > 0 else "")


def verdict_line(trace: dict) -> str:
    """One line for the console, summary.json's diagnosis and the report."""
    v = trace.get("verdict") or verdict(trace)
    if not v:
        return ""
    names = {"collapse": "entropy collapse", "logit_blowup": "logit blow-up", "resid_blowup": "residual blow-up"}
    parts = []
    for kind in sorted((k for k, ev in v["events"].items() if ev is not None), key=lambda k: v["events"][k]["step"]):
        ev = v["events"][kind]
        when = (f"already at the window start, step {ev['step']} (>= {ev['steps_before']} steps before)"
                if ev["at_window_start"] and ev["steps_before"] > 0 else
                f"at step {ev['step']} ({ev['steps_before']} steps before)")
        parts.append(f"{names[kind]} {when}: {_where_text(ev, kind)}")
    window = f"steps {v['window'][0]}-{v['window'][1]}"
    body = "; ".join(parts) if parts else "no collapse or blow-up before the divergence step"
    return f"flight recorder ({window}, every {trace['every']}): {body}"


def read_trace(run_dir: Path) -> Optional[dict]:
    """RUN_DIR/flight_recorder.json, or None when the run has none (it never diverged)."""
    from privlm.validate import ANY, check_file, read_json
    path = Path(run_dir) / FLIGHT_FILE
    if not path.is_file():
        return None
    trace = read_json(path, ANY)  # size and depth bounded
    if isinstance(trace, dict) and trace.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flight-recorder trace (format {trace.get('format')!r}, "
                              f"expected {FORMAT!r})")
    return check_file(trace, path)  # the trace's schema, naming the field


def format_trace(trace: dict, last: int = 8) -> str:
    """The verdict and the last ``last`` records as per-layer tables (mean entropy / max logit / resid norm)."""
    lines = [verdict_line(trace)]
    recs = trace["records"] + ([trace["at_divergence"]] if trace.get("at_divergence") else [])
    recs = recs[-last:]
    if not recs:
        return lines[0]
    L = len(recs[0]["resid_norm"])

    def cell(x, fmt):
        return "nan" if x is None or not math.isfinite(x) else format(x, fmt)

    lines.append(f"last {len(recs)} recorded steps before the divergence at step {trace['divergence_step']} "
                 f"(per layer: mean head entropy nats | max logit | mean residual norm):")
    lines.append(" step       loss | " + " | ".join(f"{'L' + str(l):^26}" for l in range(L)))
    for r in recs:
        cells = []
        for l in range(L):
            ents = [_val(v) for v in r["head_entropy"][l]]
            mean_e = sum(ents) / len(ents)
            max_l = max((_val(v) for v in r["max_logit"][l]), key=lambda z: math.inf if math.isnan(z) else z)
            cells.append(f"{cell(mean_e, '.3f'):>8} {cell(max_l, '.3g'):>8} {cell(_val(r['resid_norm'][l]), '.3g'):>8}")
        mark = " <- diverged" if r["step"] >= trace["divergence_step"] else ""
        lines.append(f"{r['step']:>5} {cell(_val(r['loss']), '.6g'):>10} | " + " | ".join(cells) + mark)
    return "\n".join(lines)
