"""Entropy verdicts (overload / collapse / too early to judge) on synthetic attention patterns whose Eq. 7
entropy is known in closed form, and on the recorded head entropies of real training runs
(tests/fixtures/entropy/, produced by the commands in its README)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from privlm.entropy import (causal_entropy_max, compare_to_baseline, detect_collapse, detect_overload, diagnose,
                            entropy_bins, layer_verdicts, near_uniform_heads, verdict)
from privlm.entropy.measure import COLLAPSE_NATS, NEAR_UNIFORM, OVERLOAD_EXCESS

FIXTURES = Path(__file__).parent / "fixtures" / "entropy"
T = 128


def window_entropy(k: int, T: int = T) -> float:
    """Eq. 7 entropy of a head that attends uniformly to the last k visible keys: mean_i log(min(i, k)).
    Computed from explicit attention rows with numpy, independently of privlm."""
    rows = []
    for i in range(1, T + 1):
        p = np.zeros(T)
        n = min(i, k)
        p[i - n:i] = 1.0 / n
        nz = p[p > 0]
        rows.append(-(nz * np.log(nz)).sum())
    return float(np.mean(rows))


UNIFORM = window_entropy(T)  # uniform causal attention
assert abs(UNIFORM - causal_entropy_max(T)) < 1e-12


def heads(*windows_per_layer):
    return [[window_entropy(k) for k in layer] for layer in windows_per_layer]


# --------------------------------------------------------------------------------------------- synthetic
def test_near_uniform_threshold_in_nats():
    # 0.95 x 3.878 = 3.684 nats: attending to the last 96 keys (3.69) is near-uniform, the last 64 (3.52) is not
    assert NEAR_UNIFORM * causal_entropy_max(T) == pytest.approx(3.684, abs=1e-3)
    m = heads([128, 96, 64, 1])
    assert near_uniform_heads(m, T).tolist() == [[True, True, False, False]]


def test_young_model_is_too_early_not_overloaded():
    # every head still (near) uniform, as at initialization: the paper's bins put 100% in the top bin
    m = heads([128, 127, 126, 125], [128, 120, 127, 110], [128, 128, 126, 127], [124, 128, 128, 127])
    assert entropy_bins(m).shares[3] == 1.0
    rep = detect_overload(m, T)
    assert rep.too_early and not rep.overloaded and rep.overloaded_layers == [] and rep.top_bin_share == 1.0
    diag = diagnose(m, None, T)
    assert diag["verdict"] == "too early to judge (no layer has left uniform attention)"
    assert layer_verdicts(detect_collapse(m), rep, 4) == ["uniform"] * 4 == diag["layer_verdicts"]


def test_trained_baseline_is_healthy_despite_its_top_bin():
    # specialized heads (windows of 4-48 keys) everywhere; one near-uniform head in layer 0, as in the paper's
    # trained baseline (layer 0 of its Fig. 3a has one head at 3.83 nats)
    m = heads([128, 24, 8, 16], [6, 12, 32, 4], [16, 48, 8, 24], [32, 12, 16, 6])
    rep = detect_overload(m, T)
    assert not rep.too_early and not rep.overloaded and rep.layer_share[0] == 0.25
    assert rep.top_bin_share >= 1 / 16  # the max head is in the top bin by definition: a figure, not a verdict
    assert diagnose(m, [0, 0, 0, 0], T)["verdict"] == "healthy"


def test_softmax_only_early_layers_at_uniform_are_overloaded():
    # SM's pattern: layers 0-1 stay at uniform attention while the deeper layers specialize
    m = heads([128, 128, 127, 110], [128, 126, 100, 24], [32, 16, 100, 8], [8, 4, 12, 16])
    rep = detect_overload(m, T)
    assert rep.layer_share == [1.0, 0.75, 0.25, 0.0] and rep.overloaded_layers == [0, 1]
    assert rep.overloaded and not rep.too_early and rep.share == pytest.approx(8 / 16)
    diag = diagnose(m, None, T)
    assert diag["verdict"] == "entropic overload (layers 0, 1)"
    assert diag["layer_verdicts"] == ["overload", "overload", "ok", "ok"]


def test_collapsed_deep_layers_and_nan():
    # the paper's SM: early layers uniform, deep heads near zero (Fig. 3f: 0.03-0.06 nats) and NaN attention
    one_hot = 0.0
    peaked = -(0.995 * math.log(0.995) + 0.005 * math.log(0.005))  # 0.031 nats: one key with 99.5%
    assert peaked < COLLAPSE_NATS
    m = heads([128, 128, 128, 126], [64, 16, 8, 32]) + [[peaked, one_hot, peaked, 2.0], [0.02, 0.05, 0.4, 0.01]]
    diag = diagnose(m, [0, 0, 0, 0], T)
    assert diag["collapse"]["collapsed_layers"] == [2, 3] and diag["overload"]["overloaded_layers"] == [0]
    assert diag["verdict"] == "entropy collapse (layers 2, 3) + entropic overload (layers 0)"
    assert diag["layer_verdicts"] == ["overload", "ok", "collapse", "collapse"]
    nan = diagnose(heads([64, 16], [32, 8]) + [[float("nan"), 1.0]], [0, 0, 5], T)
    assert nan["collapse"]["collapsed_layers"] == [2] and nan["verdict"] == "entropy collapse (layers 2)"


def test_comparison_with_a_baseline():
    base = heads([96, 24, 8, 16], [6, 12, 32, 4])
    run = heads([128, 128, 127, 110], [8, 10, 32, 6])
    cmp = compare_to_baseline(run, base, T)
    means_run, means_base = np.mean(run, axis=1), np.mean(base, axis=1)
    assert cmp["excess_nats"] == pytest.approx((means_run - means_base).tolist())
    assert cmp["excess_share"] == pytest.approx(((means_run - means_base) / UNIFORM).tolist())
    assert cmp["overloaded_layers"] == [0] and cmp["threshold"] == OVERLOAD_EXCESS
    assert diagnose(run, None, T, baseline=base)["vs_baseline"] == cmp
    with pytest.raises(ValueError, match="cannot compare 2 layers with a baseline of 1"):
        compare_to_baseline(run, base[:1], T)


def test_diagnose_needs_the_context_length():
    with pytest.raises(ValueError, match="context length"):
        diagnose([[1.0]], None, 0)


def test_verdict_words():
    m = heads([128, 128], [16, 8])
    diag = diagnose(m, None, T)
    assert verdict(detect_collapse(m), detect_overload(m, T)) == "entropic overload (layers 0)" == diag["verdict"]
    assert diag["layer_verdicts"] == ["overload", "ok"]


# ------------------------------------------------------------------------------------ recorded real runs
def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def fixture_matrix(fx: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in fx["head_entropy"]], dtype=float)


def test_papers_trained_baseline_layer0_is_not_overloaded():
    # layer 0 of the paper's trained SM+LN+G heatmap (GPT-2, 2.1B tokens): one head of 12 near-uniform
    layer0 = [2.16, 2.91, 3.83, 3.33, 3.55, 3.12, 3.00, 3.20, 2.68, 2.87, 3.04, 3.04]
    rep = detect_overload([layer0, [2.5] * 12], T)
    assert rep.layer_share[0] == pytest.approx(1 / 12) and not rep.overloaded and not rep.too_early


def test_recorded_young_baseline_is_too_early():
    fx = load_fixture("sm-ln-g-step40")  # SM+LN+G after 81,920 tokens: every head still near uniform
    diag = diagnose(fixture_matrix(fx), fx["nan_counts"], fx["seq_len"])
    assert diag["bins"]["shares"][3] == 1.0  # the paper's bins would call this 100% overloaded
    assert diag["overload"]["too_early"] and not diag["overload"]["overloaded"]
    assert diag["verdict"].startswith("too early to judge") and diag["layer_verdicts"] == ["uniform"] * 4


def test_recorded_softmax_only_model_overloads_its_early_layers():
    fx = load_fixture("sm-scfuffn-1m")  # SM+ScFuFFN after 983,040 tokens (lr 1e-3), validation split
    diag = diagnose(fixture_matrix(fx), fx["nan_counts"], fx["seq_len"])
    assert diag["overload"]["overloaded_layers"] == [0, 1] and not diag["collapse"]["collapsed"]
    assert diag["verdict"] == "entropic overload (layers 0, 1)"
    # the early layers sit within 1.5 % of uniform causal attention; the deepest has left it
    means = diag["layer_mean"]
    assert min(means[:2]) > 0.985 * causal_entropy_max(T) and means[3] < 0.75 * causal_entropy_max(T)


def test_recorded_collapse_of_a_normalization_free_model():
    fx = load_fixture("sm-lr1e-2-step50")  # SM at lr 1e-2, step 50: the paper's SM picture
    diag = diagnose(fixture_matrix(fx), fx["nan_counts"], fx["seq_len"])
    assert diag["collapse"]["collapsed_layers"] == [1, 2, 3] and diag["overload"]["overloaded_layers"] == [0]
    assert diag["layer_verdicts"] == ["overload", "collapse", "collapse", "collapse"]
    assert diag["verdict"] == "entropy collapse (layers 1, 2, 3) + entropic overload (layers 0)"


def test_recorded_demo_runs_trained_baseline_vs_softmax_only_vs_regularized():
    """The three runs of `privlm demo` (983,040 tokens each): the trained baseline is healthy although the
    paper's relative bins put most of its heads in the top bin; the softmax-only designs keep their first
    layers at uniform attention, also relative to the baseline."""
    base, fu, ereg = (load_fixture(f"demo-{n}") for n in ("sm-ln-g", "sm-scfuffn", "ereg-sm-t-scfuffn"))
    mb, mf, me = (fixture_matrix(f) for f in (base, fu, ereg))
    d_base = diagnose(mb, base["nan_counts"], T)
    assert d_base["verdict"] == "healthy" and d_base["overload"]["share"] == 0.0
    assert d_base["bins"]["shares"][3] >= 0.5  # max-relative bins: "overloaded" by the paper's reading
    d_fu = diagnose(mf, fu["nan_counts"], T, baseline=mb)
    assert d_fu["verdict"] == "entropic overload (layers 0, 1)"
    assert d_fu["vs_baseline"]["overloaded_layers"] == [0, 1, 2]  # the deepest layer is level with the baseline
    assert abs(d_fu["vs_baseline"]["excess_nats"][3]) < OVERLOAD_EXCESS * causal_entropy_max(T)
    d_ereg = diagnose(me, ereg["nan_counts"], T, baseline=mb)
    assert d_ereg["overload"]["overloaded_layers"][:2] == [0, 1] and not d_ereg["collapse"]["collapsed"]
    assert base["final_ppl"] < fu["final_ppl"]  # the price of removing LayerNorm and GELU at this budget


def test_impossible_entropies_are_broken_attention_not_huge_ones():
    # a diverged run's fused entropy (logsumexp - sum p*s) at logits ~1e5 cancels into values no distribution
    # over 128 keys has (the stability map's SM at lr 1e-2 recorded 28542 and -9.2 nats): they count as NaN
    log_T = math.log(T)
    m = heads([64, 16], [32, 8]) + [[28542.0, -9.2], [log_T + 0.5, 1.0]]
    diag = diagnose(m, [0, 0, 0, 0], T)
    assert diag["invalid_heads"] == 3
    assert diag["head_entropy"][2] == [None, None] and diag["head_entropy"][3] == [None, 1.0]
    assert diag["collapse"]["collapsed_layers"] == [2, 3]  # layer 3: one of two heads broken = half
    assert diag["bins"]["max_value"] == pytest.approx(max(window_entropy(64), window_entropy(32)))
    assert diag["layer_mean"][3] == 1.0
    exact = diagnose(heads([128, 1]) + [[log_T, 0.0]], [0, 0], T)  # the bounds themselves are possible
    assert exact["invalid_heads"] == 0
