"""One typed result row per run: `RunRow`, shared by the report, the sweep, the demo and the claims.

A row holds the run's identity and training outcome, its entropy diagnosis (`EntropyDiagnosis`), the flight
recorder's first event when it diverged (`FlightSummary`) and its predicted PI cost (`privlm.pi.summary.
CostSummary`). Readers use attributes; ``results.json`` stores each row flat (``to_dict``: the same keys as
always, so every results file written before these types existed loads with ``from_dict``).

A leaf module: it imports only the standard library and `CostSummary`'s module.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from privlm.pi.summary import CostSummary


@dataclass(frozen=True)
class EntropyDiagnosis:
    """Final per-head entropies of a run, reduced (`privlm.entropy.diagnose`; docs/DECISIONS.md, "Entropy
    verdicts")."""
    bin_shares: tuple[float, ...]          # the paper's four relative bins (Fig. 2a), shares of heads
    bin_max: float                         # the max the bins are relative to (nats)
    layer_mean_entropy: tuple[Optional[float], ...]  # per layer (nats); None for broken layers
    deep_layer_min_entropy: float          # lowest layer mean of the deeper half
    nan_total: float                       # NaN entries of the attention over the whole run
    overloaded: bool
    overloaded_layers: tuple[int, ...]
    collapsed: bool
    collapsed_layers: tuple[int, ...]
    too_early: bool                        # no layer has left uniform attention yet
    near_uniform_share: float
    layer_verdicts: tuple[str, ...]        # "ok" / "overload" / "collapse" / "uniform" per layer
    verdict: str                           # one line: "healthy", "entropic overload (layers 0, 1)", ...
    excess_vs_baseline: Optional[tuple[Optional[float], ...]] = None  # nats above the baseline's layer
    overloaded_vs_baseline: Optional[tuple[int, ...]] = None

    @property
    def top_bin_share(self) -> float:
        return self.bin_shares[3]


@dataclass(frozen=True)
class FlightSummary:
    """The divergence flight recorder's first event before a NaN (`privlm.report.analysis.flight_summary`)."""
    first: Optional[str]              # "collapse" / "logit_blowup" / "resid_blowup"
    first_all: tuple[str, ...]        # every kind first seen at that same step
    event_step: Optional[int]
    steps_before: Optional[int]
    where: tuple[str, ...]            # "L5h0", "L3", ...
    line: str                         # the recorder's one-line verdict


_TUPLES = {"bin_shares", "layer_mean_entropy", "overloaded_layers", "collapsed_layers", "layer_verdicts",
           "excess_vs_baseline", "overloaded_vs_baseline", "first_all", "where"}


_DIAGNOSIS = tuple(f.name for f in dataclasses.fields(EntropyDiagnosis))


def _typed(cls, d: dict[str, Any]):
    kw = {}
    for f in dataclasses.fields(cls):
        v = d.get(f.name)
        kw[f.name] = tuple(v) if f.name in _TUPLES and v is not None else v
    return cls(**kw)


def _plain(obj) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


@dataclass(frozen=True)
class RunRow:
    """One run of a report or sweep: identity, training, PPL, diagnosis, flight summary, predicted cost."""
    name: str                          # run directory name
    label: str                         # what tables print ("SM+LN+G [sm-ln-g]")
    preset: str
    params: Optional[int] = None
    tokens_trained: Optional[int] = None
    steps: Optional[int] = None
    finished: bool = False
    diverged: bool = False
    diagnosis_summary: Optional[str] = None  # the trainer's one-line divergence diagnosis
    final_loss: Optional[float] = None
    unigram_ppl: Optional[float] = None      # the same tokenizer's unigram model on the validation split
    ppl: Optional[float] = None              # validation PPL; None when diverged or not evaluated
    lr: Optional[float] = None
    seed: Optional[int] = None
    max_steps: Optional[int] = None
    divergence_step: Optional[int] = None
    flight: Optional[FlightSummary] = None
    cost: Optional[CostSummary] = None
    spu_bytes: Optional[int] = None          # SPU-measured bytes of the run's private prediction, if any
    spu_protocol: Optional[str] = None
    diagnosis: Optional[EntropyDiagnosis] = None

    @property
    def ppl_or_inf(self) -> float:
        """PPL for comparisons: a diverged or unevaluated run is infinitely bad."""
        return math.inf if self.diverged or self.ppl is None else self.ppl

    @property
    def verdict(self) -> Optional[str]:
        return self.diagnosis.verdict if self.diagnosis else None

    def to_dict(self) -> dict[str, Any]:
        """The flat results.json row: identity and training keys, the cost's keys, the diagnosis's keys."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("flight", "cost", "diagnosis", "spu_bytes", "spu_protocol")}
        d["flight"] = _plain(self.flight) if self.flight else None
        if self.cost is not None:
            d.update(self.cost.to_dict())
        if self.spu_bytes is not None or self.spu_protocol is not None:
            d["spu_bytes"], d["spu_protocol"] = self.spu_bytes, self.spu_protocol
        if self.diagnosis is not None:
            diag = _plain(self.diagnosis)
            for k in ("excess_vs_baseline", "overloaded_vs_baseline"):
                if diag[k] is None:
                    del diag[k]
            d.update(diag)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRow":
        """A row of any results.json (older files included: missing keys read as None)."""
        kw = {f.name: d.get(f.name) for f in dataclasses.fields(cls)
              if f.name not in ("flight", "cost", "diagnosis", "finished", "diverged")}
        kw["finished"], kw["diverged"] = bool(d.get("finished")), bool(d.get("diverged"))
        kw["flight"] = _typed(FlightSummary, d["flight"]) if d.get("flight") else None
        kw["cost"] = CostSummary.from_dict(d)
        kw["diagnosis"] = _typed(EntropyDiagnosis, d) if any(d.get(k) is not None for k in _DIAGNOSIS) else None
        return cls(**kw)


def as_rows(rows) -> list[RunRow]:
    """Rows as `RunRow`s, whether given as rows or as results.json dicts."""
    return [r if isinstance(r, RunRow) else RunRow.from_dict(r) for r in rows]
