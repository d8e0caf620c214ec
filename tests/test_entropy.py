"""privlm.entropy: measurement, bins/detectors and the Algorithm 1 regularizer against independent references."""
import math

import numpy as np
import pytest
import torch

from privlm.config import RegConfig, load_config
from privlm.entropy import (EntropyRegularizer, causal_entropy_max, detect_collapse, diagnose,
                            entropy_bins, entropy_history, entropy_max, head_entropy, layer_means, measure_model,
                            normalized, regularization_loss, shared_max)
from privlm.model.attention import attention_logits, causal_softmax, row_entropy
from privlm.model.gpt import GPT


def tiny_model(preset="SM(t)+ScFuFFN", T=16, **kw):
    over = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.vocab_size=61",
            f"data.seq_len={T}", f"model.block_size={T}"] + [f"{k}={v}" for k, v in kw.items()]
    cfg = load_config(preset, over)
    torch.manual_seed(0)
    return GPT(cfg.model), cfg


# ---------------------------------------------------------------------------------------------- measurement
@pytest.mark.parametrize("T", [1, 2, 7, 128])
def test_uniform_causal_attention_entropy_is_mean_log_i(T):
    expected = sum(math.log(i) for i in range(1, T + 1)) / T  # query i sees i keys uniformly
    probs = causal_softmax(torch.zeros(1, 1, T, T, dtype=torch.float64))
    got = row_entropy(probs).mean().item()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert causal_entropy_max(T) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert entropy_max(T) == pytest.approx(math.log(T))


def test_causal_max_is_the_mean_log_of_the_visible_key_counts():
    """docs/DECISIONS.md#head-entropy-eq-7: (1/T) sum_{i=1}^T log i, summed term by term here."""
    for T in (1, 2, 128, 256, 512, 1024):
        assert causal_entropy_max(T) == pytest.approx(math.fsum(math.log(i) for i in range(1, T + 1)) / T,
                                                      rel=1e-13, abs=1e-15)


def test_model_entropy_of_uniform_attention():
    """Zero query/key weights make every attention row uniform over its causal prefix: the model's
    in-attention entropy must then be the closed form for every layer, head and batch element."""
    model, _ = tiny_model("SM+LN+G", T=12)
    with torch.no_grad():
        for b in model.blocks:
            for lin in (b.attn.q_proj, b.attn.k_proj):
                lin.weight.zero_()
                lin.bias.zero_()
    out = model(torch.randint(0, 61, (3, 12)), output_entropy=True)
    assert out.entropy.shape == (2, 3, 4, 12)
    logs = torch.log(torch.arange(1, 13, dtype=torch.float32))
    torch.testing.assert_close(out.entropy, logs.expand(2, 3, 4, 12), rtol=1e-5, atol=1e-5)
    hm = head_entropy(out.entropy)
    torch.testing.assert_close(hm, torch.full((2, 4), causal_entropy_max(12)), rtol=1e-5, atol=1e-5)
    assert out.nan_counts.tolist() == [0, 0]


def test_one_hot_rows_have_zero_entropy():
    T = 6
    probs = torch.zeros(2, 3, T, T)
    for i in range(T):
        probs[..., i, i // 2] = 1.0  # each query attends to one allowed key
    assert torch.equal(row_entropy(probs), torch.zeros(2, 3, T))


def test_row_entropy_against_numpy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(9), size=(4, 5))
    ref = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(row_entropy(torch.tensor(p)).numpy(), ref, rtol=1e-12)


def test_head_entropy_accepts_torch_numpy_and_lists():
    rng = np.random.default_rng(1)
    e = rng.random((2, 3, 4, 5))
    ref = np.array([[e[l, :, h, :].mean() for h in range(4)] for l in range(2)])
    np.testing.assert_allclose(head_entropy(e), ref)
    np.testing.assert_allclose(head_entropy(e.tolist()), ref)
    np.testing.assert_allclose(head_entropy(torch.tensor(e)).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[L, B, H, T\]"):
        head_entropy(e[0])


def test_layer_means_and_normalization_ignore_nan_heads():
    m = [[1.0, 3.0], [None, 2.0]]  # as read back from metrics.jsonl (null for NaN)
    np.testing.assert_allclose(layer_means(m), [2.0, 2.0])
    np.testing.assert_allclose(normalized([[causal_entropy_max(8)]], 8), [[1.0]])
    np.testing.assert_allclose(normalized([[math.log(8)]], 8, causal=False), [[1.0]])


def test_bins_on_hand_made_matrix():
    m = np.array([[0.0, 0.9, 1.0, 2.0],
                  [2.9, 3.0, 4.0, np.nan]])  # max = 4: edges 0, 1, 2, 3, 4
    bins = entropy_bins(m)
    assert bins.max_value == 4.0 and bins.edges == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert bins.layer_counts == [[2, 1, 1, 0], [0, 0, 1, 2]]  # 1.0 -> [1,2), 3.0 and max -> top bin
    assert bins.counts == [2, 1, 2, 2] and bins.nan_heads == 1
    assert bins.shares == pytest.approx([2 / 7, 1 / 7, 2 / 7, 2 / 7])
    shared = entropy_bins(m, max_value=8.0)  # a shared max across runs moves everything down
    assert shared.counts == [3, 3, 1, 0]  # edges 0, 2, 4, 6, 8
    assert shared_max(m, [[8.0]]) == 8.0
    with pytest.raises(ValueError, match="below the largest head entropy"):
        entropy_bins(m, max_value=3.0)


def test_collapse_detector_counts_nan():
    m = [[2.0, 1.5, 1.8, 2.2], [0.05, 0.01, 1.0, 2.0], [0.02, 1.0, 1.2, 1.3]]
    rep = detect_collapse(m)
    assert rep.layer_share == [0.0, 0.5, 0.25] and rep.collapsed_layers == [1] and rep.collapsed
    assert rep.share == pytest.approx(3 / 12)
    ok = detect_collapse([[2.0, 1.5], [1.0, 0.5]], nan_counts=[0, 0])
    assert not ok.collapsed
    nan = detect_collapse([[2.0, 1.5], [1.0, 0.5]], nan_counts=[0, 12])  # NaN in layer 1's attention
    assert nan.collapsed_layers == [1] and nan.collapsed
    nan_head = detect_collapse([[2.0, float("nan")], [1.0, 0.5]])
    assert nan_head.layer_share == [0.5, 0.0] and nan_head.collapsed_layers == [0]


def test_diagnose_is_json_serializable():
    import json
    rep = diagnose([[1.0, float("nan")], [0.5, 1.5]], nan_counts=[0, 3], T=16)
    text = json.dumps(rep)
    assert "NaN" not in text and rep["collapse"]["collapsed"] and rep["causal_max"] == causal_entropy_max(16)
    assert json.loads(text)["verdict"] == rep["verdict"] == "entropy collapse (layers 0, 1)"


def test_measure_model_averages_over_all_queries():
    model, _ = tiny_model(T=8)
    data = torch.randint(0, 61, (5, 8))
    hm, nans, n = measure_model(model, [data[:2], data[2:]])
    ref = model.eval()(data, output_entropy=True).entropy.detach().double().mean(dim=(1, 3)).numpy()
    np.testing.assert_allclose(hm, ref, rtol=1e-6)
    assert n == 5 and nans.tolist() == [0, 0] and model.training is False


# ---------------------------------------------------------------------------------------------- regularizer
def algorithm1_loops(entropy, theta, T, gamma, reduction):
    """Independent reference: Algorithm 1 (paper) / entropy_regularization.py (released_code), one head at a
    time with Python floats."""
    L, B, H, Tq = entropy.shape
    e_max, tol = math.log(T), gamma * math.log(T)
    total = 0.0
    for l in range(L):
        layer = 0.0
        for h in range(H):
            if reduction == "paper":
                e = sum(float(entropy[l, b, h, i]) for b in range(B) for i in range(Tq)) / (B * Tq)
                d = e - float(theta[l, h]) * e_max
                layer += d * d if abs(d) > tol else 0.0
            else:
                for b in range(B):
                    for i in range(Tq):
                        d = float(entropy[l, b, h, i]) - float(theta[l, h]) * e_max
                        layer += d * d if abs(d) > tol else 0.0
        total += layer / H
    return total / L


def test_regularizer_hand_computed_small_case():
    # T=4: E_max = log 4, margin = 0.2 log 4 = 0.277; threshold 0.5 log 4 = 0.693
    ent = torch.tensor([1.2, 1.2, 0.8, 0.8]).view(1, 1, 1, 4).expand(1, 1, 2, 4).clone()
    ent[0, 0, 1] = torch.tensor([0.0, 0.5, 0.9, 1.0])  # head 1: mean 0.6, |delta| = 0.093 < margin
    theta = torch.full((1, 2), 0.5)
    lg4 = math.log(4)
    paper = ((1.0 - 0.5 * lg4) ** 2 + 0.0) / 2  # head 0: mean 1.0, delta = 0.307 > margin
    assert regularization_loss(ent, theta, 4, 0.2, "paper").item() == pytest.approx(paper, rel=1e-6)
    # released code: every query penalized on its own and summed; inside-margin queries contribute 0
    q = [(1.2 - 0.5 * lg4) ** 2] * 2 + [0.0] * 2 + [(0.0 - 0.5 * lg4) ** 2] + [0.0] * 2 + [(1.0 - 0.5 * lg4) ** 2]
    released = (sum(q[:4]) + sum(q[4:])) / 2
    assert regularization_loss(ent, theta, 4, 0.2, "released_code").item() == pytest.approx(released, rel=1e-6)


@pytest.mark.parametrize("reduction", ["paper", "released_code"])
def test_regularizer_matches_loop_reference(reduction):
    g = torch.Generator().manual_seed(3)
    ent = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64) * 2.5
    theta = torch.rand(3, 4, generator=g, dtype=torch.float64)
    got = regularization_loss(ent, theta, 5, 0.2, reduction).item()
    assert got == pytest.approx(algorithm1_loops(ent, theta, 5, 0.2, reduction), rel=1e-12)
    assert got > 0


def official_entropy_regularization(attentions, thresholds, T, gamma):
    """Port of the official entropy_regularization.py (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1): per-head loop on attention matrices,
    nansum(A log(A + 1e-9)), penalty summed over batch and queries."""
    e_max = math.log(T)
    tol = gamma * e_max
    total = 0.0
    for l, A in enumerate(attentions):
        ent_val = -torch.nansum(A * torch.log(A + 1e-9), dim=-1)  # [B, H, T]
        layer = 0.0
        for h in range(A.shape[1]):
            delta = ent_val[:, h, :] - thresholds[l][h] * e_max
            layer = layer + torch.square(torch.where(delta.abs() > tol, delta, torch.zeros_like(delta))).sum()
        total = total + layer / A.shape[1]
    return total / len(attentions)


def test_released_code_reduction_matches_official_code_on_model_attentions():
    model, _ = tiny_model(T=16)
    idx = torch.randint(0, 61, (3, 16))
    out = model(idx, output_entropy=True, output_attentions=True)
    theta = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.9, 0.1, 0.5, 0.3]])
    ours = regularization_loss(out.entropy, theta, 16, 0.2, "released_code")
    ref = official_entropy_regularization(out.attentions, theta, 16, 0.2)
    assert ref.item() > 1.0
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_margin_zeroes_penalty_and_gradient():
    T, gamma = 32, 0.2
    e_max = math.log(T)
    theta = torch.tensor([[0.5, 0.5]], requires_grad=True)
    for reduction in ("paper", "released_code"):
        inside = torch.tensor([0.5 + 0.19, 0.5 - 0.19]).view(1, 1, 2, 1).expand(1, 2, 2, 3) * e_max
        loss = regularization_loss(inside, theta, T, gamma, reduction)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(theta.grad) == 0
        theta.grad = None
        outside = torch.tensor([0.5 + 0.21, 0.5 - 0.21]).view(1, 1, 2, 1).expand(1, 2, 2, 3) * e_max
        assert regularization_loss(outside, theta, T, gamma, reduction).item() > (0.2 * e_max) ** 2 / 2


@pytest.mark.parametrize("reduction", ["paper", "released_code"])
def test_gradcheck_theta_and_entropy(reduction):
    g = torch.Generator().manual_seed(5)
    ent = (torch.rand(2, 2, 3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    theta = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # no deviation sits within finite-difference distance of the hinge
    dev = (ent.mean(dim=(1, 3)) if reduction == "paper" else ent) - (theta * math.log(4))[:, None, :, None] \
        if reduction != "paper" else ent.mean(dim=(1, 3)) - theta * math.log(4)
    assert ((dev.abs() - 0.2 * math.log(4)).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(lambda e, t: regularization_loss(e, t, 4, 0.2, reduction), (ent, theta))


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["paper", "released_code"])
def test_gradcheck_through_attention_logits(reduction):
    """d L_ent / d logits through the causal softmax and the in-attention entropy (float64 finite differences)."""
    g = torch.Generator().manual_seed(7)
    T = 5
    q = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64)  # [B, H, T, d]
    k = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64)
    logits = (3 * attention_logits(q, k, None)).requires_grad_()
    theta = torch.tensor([[0.9, 0.1, 0.6]], dtype=torch.float64)

    def f(z):
        return regularization_loss(row_entropy(causal_softmax(z))[None], theta, T, 0.05, reduction)

    assert f(logits).item() > 0
    assert torch.autograd.gradcheck(f, (logits,))


def test_regularizer_module_stats_and_schedule():
    cfg = RegConfig(enabled=True, theta_init=0.5, gamma=0.2, start_frac=0.1, stop_frac=0.6)
    reg = EntropyRegularizer(2, 2, 8, cfg)
    assert reg.theta.shape == (2, 2) and torch.all(reg.theta == 0.5)
    e_max = math.log(8)
    ent = torch.tensor([[0.5, 0.95], [0.1, 0.55]]).view(2, 1, 2, 1).expand(2, 3, 2, 8) * e_max
    l_ent = reg(ent)
    stats = reg.stats(ent, l_ent)
    ref = ((0.45 * e_max) ** 2 + (0.4 * e_max) ** 2) / 4
    assert l_ent.item() == pytest.approx(ref, rel=1e-5) and stats["l_ent"] == pytest.approx(ref, rel=1e-5)
    assert stats["outside_share"] == 0.5
    assert stats["mean_abs_dev"] == pytest.approx((0 + 0.45 + 0.4 + 0.05) / 4 * e_max, rel=1e-5)
    assert stats["theta_mean"] == 0.5 and stats["theta_std"] == 0.0
    assert [reg.active(p) for p in (0.0, 0.1, 0.59, 0.6, 1.0)] == [False, True, True, False, False]
    assert EntropyRegularizer(1, 1, 8, RegConfig()).active(1.0)
    # the term both trainers add: lambda (the RegConfig's, its one source) x L_ent while on, nothing while off
    term, l_on = reg.term(ent, 0.2)
    assert l_on.item() == pytest.approx(ref, rel=1e-5) and term.item() == pytest.approx(cfg.lambda_ * ref, rel=1e-5)
    assert reg.term(ent, 0.0) == (None, None)
    zero, none = reg.term(ent, 0.6, keep_in_graph=True)  # theta stays in the graph (DDP), with no gradient
    zero.backward()
    assert none is None and zero.item() == 0.0 and torch.all(reg.theta.grad == 0)


def test_theta_gets_no_weight_decay_and_receives_gradient():
    model, cfg = tiny_model(T=16)
    reg = EntropyRegularizer(2, 4, 16, cfg.reg)
    groups = model.optimizer_groups(0.1, extra=reg)
    assert any(p is reg.theta for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert not any(p is reg.theta for p in groups[0]["params"])
    idx = torch.randint(0, 61, (2, 16))
    out = model(idx, idx, output_entropy=True)
    with torch.no_grad():
        reg.theta.fill_(0.05)  # far below every head: penalty fires
    l_ent = reg(out.entropy)
    (out.loss + 1e-3 * l_ent).backward()
    assert reg.theta.grad is not None and torch.all(reg.theta.grad < 0)  # thresholds pulled up toward E
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_regularizer_under_bf16_autocast_is_fp32():
    model, cfg = tiny_model(T=16)
    reg = EntropyRegularizer(2, 4, 16, cfg.reg)
    idx = torch.randint(0, 61, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, output_entropy=True)
        l_ent = reg(out.entropy)
    ref = regularization_loss(out.entropy.double(), reg.theta.double(), 16, 0.2, "paper")
    assert l_ent.dtype == torch.float32
    assert l_ent.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bad_shapes_and_reduction_are_rejected():
    with pytest.raises(ValueError, match=r"theta must have shape \[L, H\]"):
        regularization_loss(torch.ones(2, 1, 3, 4), torch.ones(3, 2), 4, 0.2)
    with pytest.raises(ValueError, match="reduction='mean'"):
        regularization_loss(torch.ones(1, 1, 1, 4), torch.ones(1, 1), 4, 0.2, "mean")
    from privlm.config import ConfigError
    with pytest.raises(ConfigError, match="reg.theta_init=1.5"):
        load_config("SM+LN+G", ["reg.theta_init=1.5"])


# ---------------------------------------------------------------------------------------------- fused path
def test_model_entropy_paths_agree_and_match_probability_entropy():
    """Fused (training) path vs the full-matrix path (attentions returned, or a probs hook attached), and
    vs -sum p log p of the returned attention matrices; gradients of a loss on the entropies agree as well."""
    from privlm.model.hooks import capture
    model, _ = tiny_model(T=16)
    idx = torch.randint(0, 61, (2, 16))
    out = model(idx, output_entropy=True, output_attentions=True)
    ref = torch.stack([-(a * torch.log(a.clamp_min(1e-30))).sum(-1) for a in out.attentions])
    torch.testing.assert_close(out.entropy, ref, rtol=1e-5, atol=1e-6)
    g_explicit = torch.autograd.grad(out.entropy.square().sum(), model.blocks[0].attn.q_proj.weight)[0]
    fused = model(idx, output_entropy=True)  # the training path: fused kernels, no T x T matrices
    torch.testing.assert_close(fused.entropy, out.entropy)
    torch.testing.assert_close(fused.logits, out.logits)
    g_fused = torch.autograd.grad(fused.entropy.square().sum(), model.blocks[0].attn.q_proj.weight)[0]
    torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-7)
    with capture(model, lambda n: n.endswith("hook_probs")):
        out2 = model(idx, output_entropy=True)
    torch.testing.assert_close(out2.entropy, out.entropy)
    g_hooked = torch.autograd.grad(out2.entropy.square().sum(), model.blocks[0].attn.q_proj.weight)[0]
    torch.testing.assert_close(g_explicit, g_hooked, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(g_explicit).all() and g_explicit.abs().sum() > 0


def test_entropy_history_reads_metrics_jsonl(tmp_path):
    import json
    lines = [{"kind": "train", "step": 1, "loss": 5.0},
             {"kind": "entropy", "step": 20, "head_entropy": [[1.0, None]], "layer_mean": [1.0], "nan_counts": [3],
              "seq_len": 8, "reg": None},
             {"kind": "entropy", "step": 10, "head_entropy": [[2.0, 0.05]], "layer_mean": [1.025],
              "nan_counts": [0], "seq_len": 8, "reg": {"l_ent": 0.1}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    hist = entropy_history(tmp_path)
    assert [h["step"] for h in hist] == [10, 20]
    np.testing.assert_array_equal(hist[0]["head_entropy"], [[2.0, 0.05]])
    assert np.isnan(hist[1]["head_entropy"][0, 1])
    assert detect_collapse(hist[1]["head_entropy"], hist[1]["nan_counts"]).collapsed  # NaN head + NaN counts
    assert detect_collapse(hist[0]["head_entropy"], hist[0]["nan_counts"]).layer_share == [0.5]


def test_theta_band_is_one_test_for_torch_and_numpy():
    from privlm.entropy.regularizer import outside_band, threshold_deviation
    T, gamma = 16, 0.2
    log_t = math.log(T)
    head = np.array([[0.5 * log_t, 0.75 * log_t], [0.2 * log_t, 0.69 * log_t]])
    theta = np.full((2, 2), 0.5)
    delta = threshold_deviation(head, theta, T)  # hand: 0, 0.25, -0.3, 0.19 times log T
    assert np.allclose(delta / log_t, [[0.0, 0.25], [-0.3, 0.19]])
    assert outside_band(delta, gamma, T).tolist() == [[False, True], [True, False]]
    t_delta = threshold_deviation(torch.tensor(head), torch.tensor(theta), T)
    assert outside_band(t_delta, gamma, T).tolist() == outside_band(delta, gamma, T).tolist()
