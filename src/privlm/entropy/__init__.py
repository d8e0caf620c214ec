"""Attention entropy: measurement and diagnosis (measure.py), the Algorithm 1 regularizer (regularizer.py),
the HF Trainer integration (hf.py) and the ``privlm entropy`` command (cli.py)."""
from privlm.entropy.measure import (
    BIN_LABELS,
    CollapseReport,
    EntropyBins,
    OverloadReport,
    causal_entropy_max,
    compare_to_baseline,
    detect_collapse,
    detect_overload,
    diagnose,
    entropy_bins,
    entropy_history,
    entropy_max,
    head_entropy,
    layer_means,
    layer_verdicts,
    measure_model,
    near_uniform_heads,
    normalized,
    row_entropy,
    shared_max,
    verdict,
)
from privlm.entropy.regularizer import REDUCTIONS, EntropyRegularizer, regularization_loss

__all__ = [
    "BIN_LABELS", "CollapseReport", "EntropyBins", "OverloadReport", "causal_entropy_max", "compare_to_baseline",
    "detect_collapse", "detect_overload", "diagnose", "entropy_bins", "entropy_history", "entropy_max", "head_entropy",
    "layer_means", "layer_verdicts", "measure_model", "near_uniform_heads", "normalized", "row_entropy", "shared_max",
    "verdict", "REDUCTIONS", "EntropyRegularizer",
    "regularization_loss",
]
