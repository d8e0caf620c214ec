"""Attention-entropy measurement and diagnosis: head entropy (Eq. 7), its maxima, the paper's four
histogram bins, and the verdicts (entropic overload, entropy collapse, too early to judge).

Inputs may be torch tensors, numpy arrays or nested lists (e.g. ``head_entropy`` from metrics.jsonl).
The per-query entropies themselves are computed inside the attention from the probabilities it already
has (``privlm.model.attention.row_entropy``; ``GPT(...)(idx, output_entropy=True).entropy``).

The paper's bins ([0, max/4) ... [3max/4, max] with max the largest observed head entropy) are relative to
the run itself, so they cannot tell a young model whose heads are all still uniform from an overloaded one:
both put most heads in the top bin. They are kept as reported figures; the verdicts use absolute scales
(docs/DECISIONS.md, "Entropy verdicts", gives the reasoning and the paper's figures):
  * near-uniform head: entropy >= NEAR_UNIFORM x the causal maximum log(T!)/T (uniform attention over the
    visible keys; 0.95 x 3.878 = 3.684 nats at T=128);
  * entropic overload of a layer: >= half of its heads near-uniform while some layer of the model has left
    uniform attention (the paper's overload is early layers that stay uniform while the rest specialize);
  * too early to judge: every layer still has >= half of its heads near-uniform (nothing has been learnt
    yet that would make uniform attention abnormal); no overload verdict is given;
  * entropy collapse of a layer: >= half of its heads below COLLAPSE_NATS (0.1 nats: ~1.1 keys attended)
    or NaN, or any NaN in its attention;
  * against a baseline run (same depth and T): a layer is overloaded relative to it when its mean head
    entropy exceeds the baseline's same layer by >= OVERLOAD_EXCESS x the causal maximum.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from privlm.model.attention import row_entropy  # noqa: F401  (re-exported: entropy of attention rows)

NEAR_UNIFORM = 0.95  # head entropy >= this share of the causal maximum: (near) uniform attention
OVERLOAD_LAYER_SHARE = 0.5  # share of a layer's heads near-uniform at or above which the layer is overloaded
OVERLOAD_EXCESS = 0.10  # layer-mean excess over a baseline, as a share of the causal maximum (0.39 nats at T=128)
COLLAPSE_NATS = 0.1  # head entropy below this (nats) counts as collapsed
COLLAPSE_LAYER_SHARE = 0.5  # share of a layer's heads collapsed at or above which that layer is flagged
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
    """Entropic overload: layers whose heads stay at near-uniform attention while others have left it.

    ``top_bin_share`` is the paper's figure (share of heads in [3max/4, max], max = largest head entropy),
    reported alongside; it does not decide the verdict."""

    causal_max: float
    near_uniform: float  # threshold as a share of causal_max
    share: float  # share of all finite heads near-uniform
    layer_share: list[float]
    overloaded_layers: list[int]
    overloaded: bool
    too_early: bool  # no layer has left uniform attention: no overload verdict
    layer_threshold: float
    top_bin_share: float

    def to_dict(self) -> dict:
        return asdict(self)


def near_uniform_heads(head_matrix, T: int, near_uniform: float = NEAR_UNIFORM) -> np.ndarray:
    """Boolean [L, H]: heads whose entropy is at least ``near_uniform`` x the causal maximum (NaN: False)."""
    m = _matrix(head_matrix)
    return np.nan_to_num(m, nan=-np.inf) >= near_uniform * causal_entropy_max(T)


def detect_overload(head_matrix, T: int, near_uniform: float = NEAR_UNIFORM,
                    layer_threshold: float = OVERLOAD_LAYER_SHARE) -> OverloadReport:
    """Layers with >= ``layer_threshold`` of their finite heads near-uniform are overloaded, unless every
    layer is (then the model is too early to judge and no layer is called overloaded)."""
    m = _matrix(head_matrix)
    finite = ~np.isnan(m)
    uniform = near_uniform_heads(m, T, near_uniform)
    layer_share = (uniform.sum(axis=1) / np.maximum(finite.sum(axis=1), 1)).tolist()
    stays_uniform = [i for i, s in enumerate(layer_share) if s >= layer_threshold]
    too_early = len(stays_uniform) == m.shape[0]
    flagged = [] if too_early else stays_uniform
    return OverloadReport(causal_entropy_max(T), near_uniform, float(uniform.sum() / max(int(finite.sum()), 1)),
                          layer_share, flagged, bool(flagged), too_early, layer_threshold,
                          entropy_bins(m).shares[3])


def compare_to_baseline(head_matrix, baseline_matrix, T: int, excess: float = OVERLOAD_EXCESS) -> dict:
    """Per-layer mean head entropy minus the baseline's (nats and as a share of the causal maximum), and the
    layers whose excess is >= ``excess`` (overloaded relative to the baseline). Same depth required."""
    m, base = _matrix(head_matrix), _matrix(baseline_matrix)
    if m.shape[0] != base.shape[0]:
        raise ValueError(f"cannot compare {m.shape[0]} layers with a baseline of {base.shape[0]}")
    diff = layer_means(m) - layer_means(base)
    share = diff / causal_entropy_max(T)
    return {"excess_nats": [None if math.isnan(v) else float(v) for v in diff],
            "excess_share": [None if math.isnan(v) else float(v) for v in share],
            "overloaded_layers": [i for i, v in enumerate(share) if not math.isnan(v) and v >= excess],
            "threshold": excess}


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


def layer_verdicts(collapse: CollapseReport, overload: OverloadReport, n_layers: int) -> list[str]:
    """One word per layer: 'uniform' (model too early to judge), 'overload', 'collapse', 'both' or 'ok'."""
    collapsed, overloaded = set(collapse.collapsed_layers), set(overload.overloaded_layers)
    out = []
    for layer in range(n_layers):
        c, o = layer in collapsed, layer in overloaded
        out.append("both" if c and o else "collapse" if c else "overload" if o else
                   "uniform" if overload.too_early else "ok")
    return out


def verdict(collapse: CollapseReport, overload: OverloadReport) -> str:
    """The model's verdict in a few words, e.g. 'entropic overload (layers 0, 1)' or 'too early to judge'."""
    parts = []
    if collapse.collapsed:
        parts.append("entropy collapse (layers " + ", ".join(map(str, collapse.collapsed_layers)) + ")")
    if overload.overloaded:
        parts.append("entropic overload (layers " + ", ".join(map(str, overload.overloaded_layers)) + ")")
    if parts:
        return " + ".join(parts)
    if overload.too_early:
        return "too early to judge (no layer has left uniform attention)"
    return "healthy"


def invalid_entropies(head_matrix, T: int) -> np.ndarray:
    """Mask of head entropies no attention distribution over at most T keys can have (below 0 or above log T,
    beyond float32 rounding). They come from attention logits so large that the fused entropy
    (logsumexp - sum p*s) cancels catastrophically: the attention is numerically broken, so the diagnosis
    treats them like NaN (a collapsed head), never as a huge or negative entropy."""
    m = _matrix(head_matrix)
    tol = 1e-3 * max(entropy_max(T), 1.0)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(m) & ((m < -tol) | (m > entropy_max(T) + tol))


@dataclass
class Diagnosis:
    """Everything ``privlm entropy`` reports about a head-entropy matrix (``diagnosis``); ``to_dict`` is the
    JSON document (`diagnose`)."""

    head_entropy: np.ndarray  # [L, H], impossible entropies as NaN
    invalid_heads: int
    layer_mean: list[float]   # NaN for a layer with no finite head
    bins: EntropyBins
    overload: OverloadReport
    collapse: CollapseReport
    seq_len: int
    vs_baseline: Optional[dict]
    layer_verdicts: list[str]
    verdict: str

    def to_dict(self) -> dict:
        m = self.head_entropy
        out = {"head_entropy": np.where(np.isnan(m), None, m).tolist(), "invalid_heads": self.invalid_heads,
               "layer_mean": [None if math.isnan(v) else v for v in self.layer_mean],
               "bins": self.bins.to_dict(), "overload": self.overload.to_dict(), "collapse": self.collapse.to_dict(),
               "seq_len": self.seq_len, "log_T": entropy_max(self.seq_len),
               "causal_max": causal_entropy_max(self.seq_len)}
        if self.vs_baseline is not None:
            out["vs_baseline"] = self.vs_baseline
        out["layer_verdicts"], out["verdict"] = self.layer_verdicts, self.verdict
        return out


def diagnosis(head_matrix, nan_counts: Optional[Sequence[float]], T: int, max_value: Optional[float] = None,
              baseline=None) -> Diagnosis:
    """The typed diagnosis. ``T`` (the context length the entropies were measured at) sets the causal maximum;
    ``baseline`` (head matrix of a baseline run at the same depth and T) adds the per-layer comparison."""
    if T < 1:
        raise ValueError(f"T={T}: the context length of the measurement is needed for the verdicts")
    m = _matrix(head_matrix)
    invalid = invalid_entropies(m, T)
    m = np.where(invalid, np.nan, m)
    overload, collapse = detect_overload(m, T), detect_collapse(m, nan_counts)
    return Diagnosis(m, int(invalid.sum()), layer_means(m).tolist(), entropy_bins(m, max_value), overload, collapse,
                     T, compare_to_baseline(m, baseline, T) if baseline is not None else None,
                     layer_verdicts(collapse, overload, m.shape[0]), verdict(collapse, overload))


def diagnose(head_matrix, nan_counts: Optional[Sequence[float]], T: int, max_value: Optional[float] = None,
             baseline=None) -> dict:
    """`diagnosis` as the JSON document ``privlm entropy --json`` prints."""
    return diagnosis(head_matrix, nan_counts, T, max_value, baseline).to_dict()


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
    from privlm.validate import read_jsonl
    records = []
    for rec in read_jsonl(path):
        if rec.get("kind") == "entropy":
            records.append({**rec, "head_entropy": _matrix(rec["head_entropy"])})
    return sorted(records, key=lambda r: r["step"])
