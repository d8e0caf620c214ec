"""Read a run directory (layout in docs/CONTRACTS.md) into one object the figures and tables share.

Only files are read: no model is built and no checkpoint is loaded, so a report over many runs is
cheap and works on runs that diverged, were interrupted, or were trained on another machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from privlm.config import Config
from privlm.errors import CheckpointError
from privlm.run import load_run_config
from privlm.flight_trace import read_trace
from privlm.validate import read_json, read_jsonl

# Optional file with a measured private-inference run (written by `privlm pi run --save`, issue 6).
PI_MEASURED_FILE = "pi_measured.json"


@dataclass
class RunData:
    path: Path
    cfg: Config
    summary: Optional[dict]
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    entropy: list[dict] = field(default_factory=list)
    final_entropy: Optional[dict] = None
    pi_measured: Optional[dict] = None
    flight: Optional[dict] = None  # flight_recorder.json of a diverged run (privlm.flight_trace)
    label: str = ""

    @property
    def preset(self) -> str:
        return (self.summary or {}).get("preset") or self.cfg.model.preset

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    @property
    def diverged(self) -> bool:
        return bool((self.summary or {}).get("diverged", False))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def final_ppl(self) -> float:
        """Final validation PPL; NaN when the run diverged or never evaluated."""
        if self.diverged:
            return math.nan
        ppl = (self.summary or {}).get("final_ppl")
        if ppl is None and self.eval:
            ppl = self.eval[-1].get("ppl")
        return float(ppl) if ppl is not None else math.nan

    @property
    def tokens_trained(self) -> Optional[int]:
        tokens = (self.summary or {}).get("tokens_trained")
        if tokens is None and self.train:
            tokens = self.train[-1].get("tokens")
        return int(tokens) if tokens is not None else None

    @property
    def divergence_step(self) -> Optional[int]:
        """The step whose update was refused as non-finite (None when the run did not diverge)."""
        if not self.diverged:
            return None
        if self.flight is not None:
            return int(self.flight["divergence_step"])
        return int((self.summary or {}).get("steps") or 0) + 1

    @property
    def params(self) -> Optional[int]:
        params = (self.summary or {}).get("params")
        return int(params) if params is not None else None

    def tokens_at(self, step: int) -> float:
        """Training tokens seen after ``step`` optimizer steps (eval records carry the number of
        *validation* tokens, so the x axis of a loss curve comes from the train records or the config)."""
        if self.train and self.train[-1].get("tokens") and self.train[-1].get("step"):
            return step * self.train[-1]["tokens"] / self.train[-1]["step"]
        t = self.cfg.train
        return float(step * t.batch_size * t.grad_accum * self.cfg.data.seq_len)

    def head_entropy(self) -> Optional[np.ndarray]:
        """Final per-head entropy [L, H] in nats (entropy.json, else the last telemetry record)."""
        if self.final_entropy and self.final_entropy.get("head_entropy") is not None:
            return _as_array(self.final_entropy["head_entropy"])
        if self.entropy:
            return _as_array(self.entropy[-1]["head_entropy"])
        return None

    def thresholds(self) -> Optional[np.ndarray]:
        """Learned θ [L, H] of the entropy regularizer, None for runs without it."""
        if self.final_entropy and self.final_entropy.get("thresholds") is not None:
            return _as_array(self.final_entropy["thresholds"])
        return None


def _as_array(value: Any) -> np.ndarray:
    # JSON has no NaN literal in every writer; None stands for a NaN entry.
    return np.array([[math.nan if v is None else v for v in row] for row in value], dtype=float)


def _read_json(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl. A torn last line (the writer was killed mid-line) is ignored;
    a bad line anywhere else means the file is corrupt."""
    return read_jsonl(path) if path.is_file() else []


def load_run(path: str | Path) -> RunData:
    """Read RUN_DIR's config, metrics, entropy and summary (CheckpointError if it is not a run dir)."""
    path = Path(path)
    cfg = load_run_config(path)
    records = read_metrics(path / "metrics.jsonl")
    by_kind: dict[str, list[dict]] = {"train": [], "eval": [], "entropy": []}
    for rec in records:
        if rec.get("kind") in by_kind:
            by_kind[rec["kind"]].append(rec)
    for recs in by_kind.values():
        recs.sort(key=lambda r: r.get("step", 0))
    run = RunData(path=path, cfg=cfg, summary=_read_json(path / "summary.json"),
                  train=by_kind["train"], eval=by_kind["eval"], entropy=by_kind["entropy"],
                  final_entropy=_read_json(path / "entropy.json"),
                  pi_measured=_read_json(path / PI_MEASURED_FILE), flight=read_trace(path))
    if run.summary is None and not records:
        raise CheckpointError(f"run directory '{path}' has neither summary.json nor metrics.jsonl records")
    return run


def load_runs(paths: list[str | Path]) -> list[RunData]:
    """Load several runs and give each a unique label (the preset, plus the directory name on clashes)."""
    if not paths:
        raise CheckpointError("no run directories given")
    runs = [load_run(p) for p in paths]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.preset] = counts.get(run.preset, 0) + 1
    for run in runs:
        run.label = run.preset if counts[run.preset] == 1 else f"{run.preset} [{run.path.name}]"
    return runs
