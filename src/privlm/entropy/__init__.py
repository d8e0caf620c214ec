"""Attention entropy: measurement and diagnosis (measure.py), the Algorithm 1 regularizer (regularizer.py),
the HF Trainer integration (hf.py) and the ``privlm entropy`` command (cli.py).
The names below are imported on first use (`privlm entropy --help` imports no torch)."""
from typing import TYPE_CHECKING

from privlm.lazy import lazy_exports

if TYPE_CHECKING:
    from privlm.entropy.measure import (
        BIN_LABELS,
        CollapseReport,
        Diagnosis,
        EntropyBins,
        OverloadReport,
        causal_entropy_max,
        compare_to_baseline,
        detect_collapse,
        detect_overload,
        diagnose,
        diagnosis,
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
    "BIN_LABELS", "CollapseReport", "Diagnosis", "EntropyBins", "OverloadReport", "causal_entropy_max",
    "compare_to_baseline", "detect_collapse", "detect_overload", "diagnose", "diagnosis", "entropy_bins", "entropy_history", "entropy_max", "head_entropy",
    "layer_means", "layer_verdicts", "measure_model", "near_uniform_heads", "normalized", "row_entropy", "shared_max",
    "verdict", "REDUCTIONS", "EntropyRegularizer",
    "regularization_loss",
]
_REGULARIZER = ("REDUCTIONS", "EntropyRegularizer", "regularization_loss")
lazy_exports(__name__, {name: "privlm.entropy.regularizer" if name in _REGULARIZER
                           else "privlm.entropy.measure" for name in __all__})
