"""Attention-entropy measurement and diagnosis (SPEC §2): head entropy (Eq. 7), its maxima, the paper's
four histogram bins, and the entropic-overload / entropy-collapse detectors.

Inputs may be torch tensors, numpy arrays or nested lists (e.g. ``head_entropy`` from metrics.jsonl).
The per-query entropies themselves are computed inside the attention from the probabilities it already
has (``privlm.model.attention.row_entropy``; ``GPT(...)(idx, output_entropy=True).entropy``).

Detector thresholds (ours; the paper gives none beyond "disproportionately large" / "near zero"):
  * entropic overload: a layer is overloaded when >= 50% of its heads lie in the top bin [3max/4, max];
    the model is overloaded when >= 25% of all heads do. The paper's well-behaved baselines have 3-8% of
    heads there, the overloaded SM+G 58% and SM 45% (SPEC §2), so 25% separates them with room either side.
  * entropy collapse: a head is collapsed when its mean entropy is below 0.1 nats (it attends to
    exp(0.1) ~ 1.1 keys on average; Fig. 3f's collapsed deep heads are at 0.03-0.06) or is NaN; a layer
    collapses when >= 50% of its heads do or its attention had any NaN entry; the model collapses when
    any layer does (the paper's collapse is a deep-layer phenomenon that ends in NaNs).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from privlm.model.attention import row_entropy  # noqa: F401  (re-exported: entropy of attention rows)

OVERLOAD_SHARE = 0.25  # share of all heads in the top bin above which the model is "overloaded"
OVERLOAD_LAYER_SHARE = 0.5  # share of a layer's heads in the top bin above which that layer is flagged
COLLAPSE_NATS = 0.1  # head entropy below this (nats) counts as collapsed
COLLAPSE_LAYER_SHARE = 0.5  # share of a layer's heads collapsed above which that layer is flagged
BIN_LABELS = ("[0, max/4)", "[max/4, max/2)", "[max/2, 3max/4)", "[3max/4, max]")


def to_numpy(x: Any) -> np.ndarray:
    """float64 numpy copy of a tensor / array / nested list (None entries of JSON become NaN)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    if isinstance(x, (list, tuple)):
        x = np.array(x, dtype=object)
        x = np.where(x == None, np.nan, x)  # noqa: E711  (JSON null)
    return np.asarray(x, dtype=np.float64)


def entropy_max(T: int) -> float:
    """E_max = log T, the entropy of a uniform distribution over T keys (Algorithm 1, line 2)."""
    return math.log(T)


def causal_entropy_max(T: int) -> float:
    """Largest possible Eq. 7 head entropy under the causal mask: (1/T) sum_{i=1}^T log i = log(T!)/T.

    Query i sees i keys, so its entropy is at most log i (uniform attention). T=128 gives 3.878 nats,
    the top of the paper's heatmaps.
    """
    return math.lgamma(T + 1) / T


def head_entropy(entropy):
    """Eq. 7: head entropy E^{(l,h)} = mean over query positions (and over the batch) of the per-query
    entropy. entropy: [L, B, H, T] -> [L, H]. A torch input gives a torch output (differentiable)."""
    if isinstance(entropy, torch.Tensor):
        if entropy.dim() != 4:
            raise ValueError(f"entropy must have shape [L, B, H, T], got {tuple(entropy.shape)}")
        return entropy.to(torch.promote_types(entropy.dtype, torch.float32)).mean(dim=(1, 3))
    arr = to_numpy(entropy)
    if arr.ndim != 4:
        raise ValueError(f"entropy must have shape [L, B, H, T], got {arr.shape}")
    return arr.mean(axis=(1, 3))


def _matrix(head_matrix) -> np.ndarray:
    m = to_numpy(head_matrix)
    if m.ndim != 2:
        raise ValueError(f"head entropy matrix must have shape [L, H], got {m.shape}")
    return m


def layer_means(head_matrix) -> np.ndarray:
    """Mean head entropy per layer [L] (NaN heads ignored; a layer of only NaN heads gives NaN)."""
    m = _matrix(head_matrix)
    count = np.sum(~np.isnan(m), axis=1)
    total = np.nansum(m, axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def normalized(head_matrix, T: int, causal: bool = True) -> np.ndarray:
    """Head entropies as a fraction of the causal maximum (default) or of log T (the regularizer's scale)."""
    return _matrix(head_matrix) / (causal_entropy_max(T) if causal else entropy_max(T))


def shared_max(*head_matrices) -> float:
    """Largest head entropy over several runs, for comparing their histograms on the same bins."""
    values = [np.nanmax(_matrix(m)) for m in head_matrices if np.any(~np.isnan(_matrix(m)))]
    if not values:
        raise ValueError("no finite head entropy in any matrix")
    return float(max(values))


@dataclass
class EntropyBins:
    """Fig. 2a / Fig. 7 histogram: heads in [0, max/4), [max/4, max/2), [max/2, 3max/4), [3max/4, max]."""

    max_value: float
    edges: list[float]
    counts: list[int]  # finite heads per bin
    shares: list[float]  # counts / number of finite heads
    layer_counts: list[list[int]]  # [L][4]
    nan_heads: int

    def to_dict(self) -> dict:
        return asdict(self)


def bin_index(head_matrix, max_value: float) -> np.ndarray:
    """Bin (0..3) of every head; -1 for NaN heads. The top bin is closed at max."""
    m = _matrix(head_matrix)
    idx = np.full(m.shape, -1, dtype=np.int64)
    finite = ~np.isnan(m)
    if max_value <= 0:
        idx[finite] = 0
        return idx
    idx[finite] = np.clip(np.floor(4.0 * np.maximum(m[finite], 0.0) / max_value), 0, 3).astype(np.int64)
    return idx


def entropy_bins(head_matrix, max_value: Optional[float] = None) -> EntropyBins:
    """The paper's head histogram. max_value = largest observed head entropy (default) or a shared max
    (``shared_max`` of the runs being compared); it must not be below any head entropy."""
    m = _matrix(head_matrix)
    finite = ~np.isnan(m)
    observed = float(np.nanmax(m)) if finite.any() else 0.0
    if max_value is None:
        max_value = observed
    elif observed > max_value * (1 + 1e-9):
        raise ValueError(f"max_value={max_value:.6g} is below the largest head entropy {observed:.6g}")
    idx = bin_index(m, max_value)
    layer_counts = [[int(np.sum(row == b)) for b in range(4)] for row in idx]
    counts = [int(np.sum(idx == b)) for b in range(4)]
    n = max(int(finite.sum()), 1)
    return EntropyBins(float(max_value), [max_value * k / 4 for k in range(5)], counts,
                       [c / n for c in counts], layer_counts, int((~finite).sum()))


@dataclass
class OverloadReport:
    """Entropic overload: share of heads in the top bin [3max/4, max], overall and per layer."""

    max_value: float
    share: float
    layer_share: list[float]
    overloaded_layers: list[int]
    overloaded: bool
    share_threshold: float
    layer_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def detect_overload(head_matrix, max_value: Optional[float] = None, share_threshold: float = OVERLOAD_SHARE,
                    layer_threshold: float = OVERLOAD_LAYER_SHARE) -> OverloadReport:
    bins = entropy_bins(head_matrix, max_value)
    layer_share = [lc[3] / max(sum(lc), 1) for lc in bins.layer_counts]
    flagged = [i for i, s in enumerate(layer_share) if s >= layer_threshold]
    return OverloadReport(bins.max_value, bins.shares[3], layer_share, flagged,
                          bins.shares[3] >= share_threshold or bool(flagged), share_threshold, layer_threshold)


@dataclass
class CollapseReport:
    """Entropy collapse: share of heads with near-zero (or NaN) entropy per layer, and NaN counts."""

    share: float
    layer_share: list[float]
    nan_counts: Optional[list[float]]
    collapsed_layers: list[int]
    collapsed: bool
    near_zero: float
    layer_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def detect_collapse(head_matrix, nan_counts: Optional[Sequence[float]] = None, near_zero: float = COLLAPSE_NATS,
                    layer_threshold: float = COLLAPSE_LAYER_SHARE) -> CollapseReport:
    """A head collapses when its entropy is < near_zero nats or NaN; a layer when >= layer_threshold of its
    heads do or its attention produced NaNs (``nan_counts`` [L], as the model / metrics.jsonl report)."""
    m = _matrix(head_matrix)
    dead = np.isnan(m) | (m < near_zero)
    layer_share = dead.mean(axis=1).tolist()
    nans = None if nan_counts is None else to_numpy(nan_counts).reshape(-1)
    if nans is not None and nans.shape[0] != m.shape[0]:
        raise ValueError(f"nan_counts has {nans.shape[0]} layers, the head matrix {m.shape[0]}")
    flagged = [i for i, s in enumerate(layer_share)
               if s >= layer_threshold or (nans is not None and (np.isnan(nans[i]) or nans[i] > 0))]
    return CollapseReport(float(dead.mean()), layer_share, None if nans is None else nans.tolist(), flagged,
                          bool(flagged), near_zero, layer_threshold)


def diagnose(head_matrix, nan_counts: Optional[Sequence[float]] = None, T: Optional[int] = None,
             max_value: Optional[float] = None) -> dict:
    """Everything ``privlm entropy`` reports, JSON-able."""
    m = _matrix(head_matrix)
    out = {
        "head_entropy": np.where(np.isnan(m), None, m).tolist(),
        "layer_mean": [None if math.isnan(v) else v for v in layer_means(m).tolist()],
        "bins": entropy_bins(m, max_value).to_dict(),
        "overload": detect_overload(m, max_value).to_dict(),
        "collapse": detect_collapse(m, nan_counts).to_dict(),
    }
    if T is not None:
        out.update(seq_len=T, log_T=entropy_max(T), causal_max=causal_entropy_max(T))
    return out


def privlm_entropy(model: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-query entropy [L, B, H, T], NaN entries of each layer's attention [L]) of a privlm GPT, taken
    inside its attention."""
    out = model(idx, output_entropy=True)
    return out.entropy, out.nan_counts


@torch.no_grad()
def measure_model(model: torch.nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu",
                  entropy_fn=privlm_entropy) -> tuple[np.ndarray, np.ndarray, int]:
    """Eq. 7 head entropies [L, H] averaged over every query of every sequence in ``batches`` (each
    [B, T] token ids), the summed NaN counts [L] and the number of sequences. One forward per batch;
    ``entropy_fn(model, idx) -> (entropy [L, B, H, T], nan_counts [L])`` runs it (``privlm_entropy`` for
    privlm models, ``privlm.entropy.hf.hf_entropy`` for Hugging Face ones)."""
    was_training = model.training
    model.eval()
    total = nan_total = None
    n_seq = 0
    try:
        for idx in batches:
            entropy, nans = entropy_fn(model, idx.to(device))
            s = entropy.double().sum(dim=(1, 3))  # [L, H]; divided by rows below
            total = s if total is None else total + s
            nan_total = nans.double() if nan_total is None else nan_total + nans.double()
            n_seq += idx.shape[0]
            T = idx.shape[1]
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("no batches to measure")
    return (total / (n_seq * T)).cpu().numpy(), nan_total.cpu().numpy(), n_seq


def entropy_history(run_dir_or_metrics) -> list[dict]:
    """The ``kind == "entropy"`` records of a run's metrics.jsonl, in step order, with ``head_entropy`` as a
    float [L, H] array (JSON nulls -> NaN). Accepts the run directory or the metrics.jsonl path."""
    path = Path(run_dir_or_metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not valid JSON") from None
        if rec.get("kind") == "entropy":
            records.append({**rec, "head_entropy": _matrix(rec["head_entropy"])})
    return sorted(records, key=lambda r: r["step"])
