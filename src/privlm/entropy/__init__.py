"""Attention entropy: measurement and diagnosis (measure.py), the Algorithm 1 regularizer (regularizer.py),
the HF Trainer integration (hf.py) and the ``privlm entropy`` command (cli.py)."""
from privlm.entropy.measure import (
    BIN_LABELS,
    CollapseReport,
    EntropyBins,
    OverloadReport,
    causal_entropy_max,
    detect_collapse,
    detect_overload,
    diagnose,
    entropy_bins,
    entropy_history,
    entropy_max,
    head_entropy,
    layer_means,
    measure_model,
    normalized,
    row_entropy,
    shared_max,
)
from privlm.entropy.regularizer import REDUCTIONS, EntropyRegularizer, regularization_loss

__all__ = [
    "BIN_LABELS", "CollapseReport", "EntropyBins", "OverloadReport", "causal_entropy_max", "detect_collapse",
    "detect_overload", "diagnose", "entropy_bins", "entropy_history", "entropy_max", "head_entropy", "layer_means",
    "measure_model", "normalized", "row_entropy", "shared_max", "REDUCTIONS", "EntropyRegularizer",
    "regularization_loss",
]
