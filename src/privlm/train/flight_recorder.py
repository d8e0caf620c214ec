"""Divergence flight recorder: the last K recorded training steps' per-head attention entropy, per-head
maximum attention logit, per-layer residual-stream norm, loss and gradient norm, kept in memory and written
to RUN_DIR/flight_recorder.json when training diverges, with a verdict: which layers/heads collapsed
(entropy toward zero) or blew up first, and how many steps before the divergence.

It observes the training forward and changes nothing: on recorded steps (every ``train.flight_every``-th
step, ``train.flight_steps`` of them kept; 0 turns the recorder off) it attaches forward hooks to each block's
``attn.hook_q``, ``attn.hook_k``, attention module and ``hook_resid_post``, and takes detached views of what
that forward computed; between recorded steps no hook is attached. Nothing recomputes a projection or runs a
module again (a spectral-norm projection would run another power iteration and change the weights). The
residual norm is read off the block output. The entropy is the attention's own when the loop asked for it
(telemetry or regularizer steps); otherwise it and the max logit come from the recorded q and k (with the
SM(t) temperature), without autograd, one block of queries at a time, on the first ``SEQUENCES`` sequences of
each micro-batch: a recorded step costs one q k^T product of those sequences per layer more than an unrecorded
one (bench/observer_overhead.py measures every observer together).

Verdict thresholds (ours, documented with the numbers they rest on):
  * collapse: head entropy below ``privlm.entropy.measure.COLLAPSE_NATS`` (the project's collapse threshold)
    or NaN;
  * logit blow-up: a head's max logit non-finite, or at least ``BLOWUP_FACTOR`` times its value in the oldest
    record of the window and at least ``LOGIT_FLOOR`` (a logit lead of 10 already gives one key >= 99% of the
    weight against 127 keys at 0, so smaller values are ordinary training, whatever their growth);
  * residual blow-up: a layer's mean residual norm non-finite or at least ``BLOWUP_FACTOR`` times its value in
    the oldest record of the window.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from privlm.entropy.measure import COLLAPSE_NATS, head_entropy, row_entropy
from privlm.fileio import atomic_write_json
from privlm.model.attention import attention_logits, causal_mask

FLIGHT_FILE = "flight_recorder.json"
FORMAT = "privlm-flight-recorder/1"
BLOWUP_FACTOR = 10.0
LOGIT_FLOOR = 10.0
QUERY_BLOCK = 128
# Sequences of each micro-batch the per-head statistics are taken on: the q k^T of the whole batch
# would cost 20-40% of a small model's training step on CPU; 4 sequences (512 queries at T=128) cost a quarter
# of that and still average every head over hundreds of queries.
SEQUENCES = 4


@torch.no_grad()
def attention_head_stats(q: torch.Tensor, k: torch.Tensor, temperature: Optional[torch.Tensor],
                         entropy: Optional[torch.Tensor],
                         query_block: int = QUERY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit [H], head entropy [H]) of one attention layer from its projections q, k [B, H, T, d_k] (as
    ``attn.hook_q`` / ``attn.hook_k`` see them: before 1/sqrt(d_k) and the temperature) and its SM(t)
    temperature [H, >= T] or None.

    The logits are Eq. 2's (with the SM(t) temperature), masked causally; the entropy is Eq. 7's head entropy
    (mean over batch and queries), taken from ``entropy`` [B, H, T] when the forward computed it. Pure: reads
    its arguments, in float32 whatever the training dtype."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.detach().float(), k.detach().float()
        t = None if temperature is None else temperature.detach().float()
        B, H, T, _ = q.shape
        max_logit = torch.full((H,), -math.inf, device=q.device)
        ent_sum = None if entropy is not None else torch.zeros(H, device=q.device)
        for s in range(0, T, query_block):
            e = min(s + query_block, T)
            logits = causal_mask(attention_logits(q[..., s:e, :], k[..., :e, :], None if t is None else t[:, s:e]))
            max_logit = torch.maximum(max_logit, logits.amax(dim=(0, 2, 3)))  # both propagate NaN
            if ent_sum is not None:
                ent_sum += row_entropy(logits.softmax(dim=-1)).sum(dim=(0, 2))
        # the attention's own entropy when it was computed; otherwise the same Eq. 7 mean, over query blocks
        head_ent = head_entropy(entropy.detach()[None])[0] if entropy is not None else ent_sum / (B * T)
    return max_logit, head_ent


class FlightRecorder:
    """Ring buffer of per-step measurements fed by forward hooks. ``begin(step)`` attaches the hooks for the
    forward passes of one recorded optimizer step (all micro-batches: max logit is the max, the rest the mean
    over them), ``end(loss, grad_norm, lr)`` removes them and files the record, ``dump(...)`` writes the window
    and returns the verdict. With ``capacity=0`` every call is a no-op."""

    def __init__(self, model: nn.Module, capacity: int, every: int = 1):
        self.capacity, self.every = int(capacity), max(1, int(every))
        # one more than kept: the diverging step's own record is split off by dump()
        self.records: deque[dict] = deque(maxlen=max(1, self.capacity) + 1)
        self._armed = False
        self._step = 0
        self._acc: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._qk: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list = []
        self.blocks = list(getattr(model, "blocks"))
        self.n_layer = len(self.blocks)

    @classmethod
    def for_training(cls, model: nn.Module, train_cfg) -> "FlightRecorder":
        return cls(model, train_cfg.flight_steps, train_cfg.flight_every)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    # -- hooks: detached views of what the forward computed ---------------------------------------
    def _attach(self) -> None:
        for i, block in enumerate(self.blocks):
            attn = block.attn
            self._handles += [
                attn.hook_q.register_forward_hook(lambda _m, _a, out, i=i: self._on_qk(i, "q", out)),
                attn.hook_k.register_forward_hook(lambda _m, _a, out, i=i: self._on_qk(i, "k", out)),
                attn.register_forward_hook(lambda mod, _a, out, i=i: self._on_attention(i, mod, out)),
                block.hook_resid_post.register_forward_hook(lambda _m, _a, out, i=i: self._on_residual(i, out)),
            ]

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._qk = {}

    def _on_qk(self, layer: int, which: str, out: torch.Tensor) -> None:
        self._qk.setdefault(layer, {})[which] = out.detach()[:SEQUENCES]

    def _on_attention(self, layer: int, attn: nn.Module, out) -> None:
        qk = self._qk.pop(layer, {})
        if "q" not in qk or "k" not in qk:
            return
        entropy = getattr(out, "entropy", None)
        with torch.no_grad():
            t = attn.temperatures()
        max_logit, ent = attention_head_stats(qk["q"], qk["k"], t,
                                              None if entropy is None else entropy[:SEQUENCES])
        acc = self._acc.setdefault(layer, {"max_logit": [], "entropy": [], "resid": []})
        acc["max_logit"].append(max_logit)
        acc["entropy"].append(ent)

    def _on_residual(self, layer: int, out: torch.Tensor) -> None:
        with torch.no_grad():
            norm = out.detach().float().norm(dim=-1).mean()
        self._acc.setdefault(layer, {"max_logit": [], "entropy": [], "resid": []})["resid"].append(norm)

    # -- the loop's three calls ----------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Attach the hooks when ``step`` (1-based, the step about to run) is a recorded one."""
        self._detach_hooks()  # a forward that raised may have left them attached
        self._acc = {}
        self._step = step
        self._armed = self.enabled and (step % self.every == 0 or not self.records)
        if self._armed:
            self._attach()

    def end(self, loss: float, grad_norm: float, lr: Optional[float] = None) -> None:
        if not self._armed:
            return
        self._armed = False
        self._detach_hooks()
        if len(self._acc) < self.n_layer or any(not a["max_logit"] or not a["resid"] for a in self._acc.values()):
            return  # e.g. a forward that raised: nothing consistent to file
        layers = [self._acc[i] for i in range(self.n_layer)]
        max_logit = torch.stack([torch.stack(a["max_logit"]).amax(0) for a in layers]).cpu()
        entropy = torch.stack([torch.stack(a["entropy"]).mean(0) for a in layers]).cpu()
        resid = torch.stack([torch.stack(a["resid"]).mean() for a in layers]).cpu()
        self.records.append({"step": self._step, "loss": _num(loss), "grad_norm": _num(grad_norm),
                             "lr": _num(lr) if lr is not None else None,
                             "head_entropy": _nested(entropy), "max_logit": _nested(max_logit),
                             "resid_norm": _nested(resid)})
        self._acc = {}

    def dump(self, run_dir: Optional[Path], step: int, loss: float, grad_norm: float, what: str) -> str:
        """Write the window to run_dir/flight_recorder.json (when run_dir is given, i.e. on rank 0) and return
        the one-line verdict (empty when the recorder is off or recorded nothing)."""
        if not self.enabled:
            return ""
        records = list(self.records)
        at_divergence = records.pop() if records and records[-1]["step"] >= step else None
        if not records and at_divergence is None:
            return ""
        trace = {"format": FORMAT, "divergence_step": step, "what": what, "loss": _num(loss),
                 "grad_norm": _num(grad_norm), "every": self.every, "capacity": self.capacity,
                 "thresholds": {"collapse_nats": COLLAPSE_NATS, "blowup_factor": BLOWUP_FACTOR,
                                "logit_floor": LOGIT_FLOOR},
                 "records": records, "at_divergence": at_divergence}
        trace["verdict"] = verdict(trace)
        line = verdict_line(trace)
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / FLIGHT_FILE, trace)
        return line

    def close(self) -> None:
        self._detach_hooks()
        self._armed = False


# ----------------------------------------------------------------------------------------------
def _num(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else (None if math.isnan(x) else math.copysign(1e308, x))


def _nested(t: torch.Tensor):
    """JSON-safe nested list: NaN -> null, +-inf -> +-1e308 (JSON has neither)."""
    if t.dim() == 0:
        return _num(t)
    return [_nested(row) for row in t]


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
    from privlm.errors import CheckpointError
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
