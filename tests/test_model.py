"""The model zoo: every preset builds and trains a step, has exactly the modules its name implies,
matches HF GPT-2, fuses exactly, and its temperature behaves as docs/DECISIONS.md#learnable-temperature-smt says."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from privlm.config import load_config
from privlm.model import GPT, capture
from privlm.model.attention import temperature_from_param
from privlm.model.ffn import FFN, FusedFFN, GELUTanh, LeakyReLU
from privlm.presets import PAPER_PRESETS

TINY = ["model.n_layer=6", "model.n_embd=32", "model.n_head=4", "model.vocab_size=61", "model.block_size=16",
        "data.seq_len=16"]


def tiny(preset: str, *extra: str) -> GPT:
    torch.manual_seed(0)
    return GPT(load_config(preset, TINY + list(extra)).model)


def modules_of(model: nn.Module, kind) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_preset_runs_forward_and_backward(preset):
    model = tiny(preset)
    idx = torch.randint(0, 61, (2, 16))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, 61)
    # an untrained model is close to uniform over the vocabulary
    assert abs(out.loss.item() - math.log(61)) < 0.5
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN", "SM+WN(qkvo+ffn)", "SM+ScFuFFN^i2"])
def test_entropy_path_equals_sdpa_path(preset):
    """The manual softmax path (taken when entropy is asked) computes the same function as SDPA."""
    model = tiny(preset).eval()
    with torch.no_grad():  # make the temperature non-trivial so the fold into q is exercised
        for block in model.blocks:
            if block.attn.temperature is not None:
                block.attn.temperature.uniform_(-0.5, 2.0)
    idx = torch.randint(0, 61, (3, 16))
    fast = model(idx)
    slow = model(idx, output_entropy=True, output_attentions=True)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
    assert slow.entropy.shape == (6, 3, 4, 16)
    assert slow.nan_counts.tolist() == [0] * 6
    assert fast.entropy is None and fast.attentions is None
    # entropy of each row, recomputed independently from the returned probabilities
    p = slow.attentions[2].double()
    ref = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    assert torch.allclose(slow.entropy[2].double(), ref, atol=1e-5)
    # causal: query i attends to at most i+1 keys, entropy <= log(i+1)
    bound = torch.log(torch.arange(1, 17, dtype=torch.float64))
    assert (slow.entropy.double() <= bound + 1e-5).all()


def test_sm_has_no_layernorm_and_no_activation():
    model = tiny("SM")
    assert modules_of(model, nn.LayerNorm) == []
    for block in model.blocks:
        assert isinstance(block.ffn, FFN) and isinstance(block.ffn.act, nn.Identity)
        assert isinstance(block.ln_1, nn.Identity) and isinstance(block.ln_2, nn.Identity)
        assert block.alpha is None and block.beta is None
    assert isinstance(model.ln_f, nn.Identity)


def test_baseline_has_layernorms_and_gelu():
    model = tiny("SM + LN + G")  # spaces and case are ignored
    assert len(modules_of(model, nn.LayerNorm)) == 2 * 6 + 1
    assert len(modules_of(model, GELUTanh)) == 6
    assert modules_of(model, nn.ReLU) == []


def test_relu_variants():
    for preset, n_ln in (("sm+ln+r", 13), ("SM+R", 0)):
        model = tiny(preset)
        assert len(modules_of(model, nn.ReLU)) == 6 and modules_of(model, GELUTanh) == []
        assert len(modules_of(model, nn.LayerNorm)) == n_ln


def test_scfuffn_has_one_dxd_linear_and_eq8_scales():
    model = tiny("SM+ScFuFFN")
    for block in model.blocks:
        assert isinstance(block.ffn, FusedFFN)
        assert block.ffn.fc.weight.shape == (32, 32)
        assert [n for n, _ in block.ffn.named_modules() if n] == ["fc"]
        assert block.alpha.shape == () and block.beta.shape == ()
        assert block.attn.temperature is None
    assert modules_of(model, nn.LayerNorm) == []


def test_fuffn_is_the_fused_ffn_without_the_scaling():
    """SM+FuFFN (the stability map's control): SM+ScFuFFN's fused d x d FFN with a plain residual."""
    model = tiny("SM+FuFFN").eval()
    scaled = tiny("SM+ScFuFFN")
    assert [n for n, _ in model.named_parameters()] == \
        [n for n, _ in scaled.named_parameters() if not n.endswith((".alpha", ".beta"))]
    block = model.blocks[1]
    assert isinstance(block.ffn, FusedFFN) and block.alpha is None and block.beta is None
    idx = torch.randint(0, 61, (1, 16))
    with capture(model, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]) as acts:
        model(idx)
    x_sa = acts["blocks.1.hook_resid_mid"]
    assert torch.allclose(acts["blocks.1.hook_resid_post"], x_sa + block.ffn(x_sa), atol=1e-6)


def test_scaled_ffn_is_eq8():
    """X_out = beta * X_SA + FFN(X_SA) / alpha, checked through the hook points."""
    model = tiny("SM+ScFFN").eval()
    block = model.blocks[1]
    with torch.no_grad():
        block.alpha.fill_(2.5)
        block.beta.fill_(0.7)
    idx = torch.randint(0, 61, (1, 16))
    with capture(model, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]) as acts:
        model(idx)
    x_sa = acts["blocks.1.hook_resid_mid"]
    expected = 0.7 * x_sa + block.ffn(x_sa) / 2.5
    assert torch.allclose(acts["blocks.1.hook_resid_post"], expected, atol=1e-6)


def test_temperature_preset_shapes_and_parameterization():
    model = tiny("SM(t)+ScFuFFN")
    for block in model.blocks:
        assert block.attn.temperature.shape == (4, 16)  # t in R^{H x T} per layer
    t = model.blocks[0].attn.temperatures()
    assert torch.allclose(t, torch.full_like(t, 1.01))  # offset parameterization, p0 = 1e-2
    p = torch.tensor([-2.0, 0.0, 1.0])
    assert temperature_from_param(p, "offset", 1e-3).tolist() == pytest.approx([1e-3, 1.0, 2.0])
    assert temperature_from_param(p, "log", 1e-3).tolist() == pytest.approx([math.exp(-2), 1.0, math.e])
    assert temperature_from_param(p, "direct", 1e-3).tolist() == pytest.approx([1e-3, 1e-3, 1.0])


def test_temperature_limits_uniform_and_one_hot():
    """t -> large gives uniform causal attention (entropy log i); t -> small gives one-hot (entropy 0)."""
    model = tiny("SM(t)+ScFuFFN", "model.temperature_param=direct", "model.temperature_init=1.0",
                 "model.temperature_min=1e-12").eval()
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.temperature.fill_(1e6)
        out = model(idx, output_entropy=True, output_attentions=True)
    uniform_causal = torch.tril(torch.ones(16, 16)) / torch.arange(1, 17)[:, None]
    for probs in out.attentions:
        assert torch.allclose(probs, uniform_causal.expand_as(probs), atol=1e-4)
    assert torch.allclose(out.entropy, torch.log(torch.arange(1, 17.0)).expand_as(out.entropy), atol=1e-4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.temperature.fill_(1e-10)
        out = model(idx, output_entropy=True, output_attentions=True)
    for probs in out.attentions:
        assert torch.allclose(probs.max(-1).values, torch.ones_like(probs[..., 0]), atol=1e-4)
    assert out.entropy.abs().max() < 1e-3


def _norm_targets(model: GPT) -> set[str]:
    return {n.rsplit(".parametrizations", 1)[0] for n, _ in model.named_parameters() if "parametrizations" in n}


@pytest.mark.parametrize("placement,expected", [
    ("qk", {"attn.q_proj", "attn.k_proj"}),
    ("ffn", {"ffn.fc_in", "ffn.fc_out"}),
    ("qk+ffn", {"attn.q_proj", "attn.k_proj", "ffn.fc_in", "ffn.fc_out"}),
    ("qkv+ffn", {"attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.fc_in", "ffn.fc_out"}),
    ("qkvo+ffn", {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.fc_in", "ffn.fc_out"}),
])
@pytest.mark.parametrize("kind", ["WN", "SN"])
def test_weight_and_spectral_norm_hit_exactly_the_named_projections(kind, placement, expected):
    model = tiny(f"SM+{kind}({placement})")
    want = {f"blocks.{i}.{t}" for i in range(6) for t in expected}
    assert _norm_targets(model) == want
    name = "_WeightNorm" if kind == "WN" else "_SpectralNorm"
    for target in want:
        module = model.get_submodule(target)
        assert type(module.parametrizations.weight[0]).__name__ == name


@pytest.mark.slow
def test_spectral_norm_bounds_the_spectrum():
    model = tiny("SM+SN(ffn)")
    model.train()
    idx = torch.randint(0, 61, (2, 16))
    for _ in range(30):  # power iteration converges over training-mode forwards
        model(idx)
    sigma = torch.linalg.matrix_norm(model.blocks[0].ffn.fc_in.weight.detach(), ord=2)
    assert sigma == pytest.approx(1.0, abs=0.05)


def test_weight_norm_rows_have_norm_g():
    model = tiny("SM+WN(ffn)")
    lin = model.blocks[0].ffn.fc_in
    g = lin.parametrizations.weight.original0.detach()
    assert torch.allclose(lin.weight.detach().norm(dim=1, keepdim=True), g.abs(), atol=1e-5)


def test_fuse_equals_two_matrix_ffn():
    model = tiny("SM+ScFFN", "model.bias=true").eval()
    with torch.no_grad():  # move away from init so the check is not trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = model.fuse()
    assert all(isinstance(b.ffn, FusedFFN) for b in fused.blocks)
    assert fused.config.ffn == "fused" and fused.config.preset == "SM+ScFuFFN"
    idx = torch.randint(0, 61, (2, 16))
    assert torch.allclose(model(idx).logits, fused(idx).logits, atol=1e-5)
    with pytest.raises(ValueError, match="linear-only"):
        tiny("SM+LN+G").fuse()


def test_fuse_with_weight_norm_on_ffn():
    model = tiny("SM+ScFFN", "model.weight_norm=ffn").eval()
    fused = model.fuse()
    assert fused.config.weight_norm == "none"
    idx = torch.randint(0, 61, (2, 16))
    assert torch.allclose(model(idx).logits, fused(idx).logits, atol=1e-5)


def test_ffn_pruning_removes_the_deepest_ffns():
    model = tiny("SM+ScFuFFN^i2")
    assert [b.ffn is not None for b in model.blocks] == [True] * 4 + [False] * 2
    explicit = tiny("SM+ScFuFFN", "model.ffn_keep_layers=[0,2]")
    assert [b.ffn is not None for b in explicit.blocks] == [True, False, True, False, False, False]
    assert explicit.blocks[1].alpha is None  # no FFN, no Eq. 8 scale


def test_leaky_relu_slopes():
    fixed = tiny("SM+LN+LR(0.1)")
    acts = [m for m in fixed.modules() if isinstance(m, LeakyReLU)]
    assert len(acts) == 6 and all(a.slope.item() == pytest.approx(0.1) for a in acts)
    assert not any("slope" in n for n, _ in fixed.named_parameters())
    x = torch.tensor([-2.0, 3.0])
    assert acts[0](x).tolist() == pytest.approx([-0.2, 3.0])
    per_layer = tiny("SM+LR(layer)")
    assert sum("slope" in n for n, _ in per_layer.named_parameters()) == 6
    shared = tiny("SM+LR(global)")
    slopes = [n for n, _ in shared.named_parameters() if "slope" in n]
    assert slopes == ["leaky_slope"]
    idx = torch.randint(0, 61, (2, 16))
    shared(idx, idx).loss.backward()
    assert shared.leaky_slope.grad is not None and shared.leaky_slope.grad != 0


def test_ln_f_is_a_config_field():
    assert isinstance(tiny("SM+R").ln_f, nn.Identity)
    assert isinstance(tiny("SM+R", "model.ln_f=true").ln_f, nn.LayerNorm)
    assert isinstance(tiny("SM+LN+G", "model.ln_f=false").ln_f, nn.Identity)


def test_init_and_residual_scaling():
    model = tiny("SM+LN+G", "model.n_embd=256", "model.n_head=4")
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = tiny("SM+LN+G", "model.n_embd=256", "model.n_head=4", "model.residual_scaling=true")
    assert scaled.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.05)
    assert scaled.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.wte.weight  # tied head
    no_bias = tiny("SM+LN+G", "model.bias=false")
    assert all("bias" not in n for n, _ in no_bias.named_parameters())


def test_optimizer_groups_exclude_scales_temperatures_and_gains():
    model = tiny("SM(t)+ScFuFFN", "model.weight_norm=qk")
    decay, no_decay = model.optimizer_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert any(n.endswith("temperature") for n in no_decay_names)
    assert any(n.endswith(".alpha") for n in no_decay_names) and any(n.endswith(".beta") for n in no_decay_names)
    assert any(n.endswith("original0") for n in no_decay_names)  # WN gain g
    assert any(n.endswith("original1") for n in decay_names)  # WN direction v
    assert all(not n.endswith("bias") for n in decay_names)
    assert "wte.weight" in decay_names


@pytest.mark.parametrize("preset,extra", [(p, ()) for p in PAPER_PRESETS if "^i" not in p]
                         + [("SM+LN+G", ("model.weight_norm=qkvo+ffn",)), ("SM+R", ("model.spectral_norm=qkvo+ffn",)),
                            ("SM+LR(global)", ("model.weight_norm=ffn",))])
def test_weight_decay_falls_on_exactly_the_weight_matrices(preset, extra):
    # independent reference: the decayed tensors are the Linear / Embedding weights, which under WN are the
    # directions v (original1) and under SN the raw weights (original); everything else is a scale or offset
    model = tiny(preset, *extra)
    expected = set()
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            plist = getattr(mod, "parametrizations", None)
            weight = plist.weight if plist is not None and "weight" in plist else None
            if weight is None:
                expected.add(id(mod.weight))
            else:
                expected.add(id(weight.original1 if hasattr(weight, "original1") else weight.original))
    decay, no_decay = model.optimizer_groups(0.1)
    assert {id(p) for p in decay["params"]} == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not {id(p) for p in decay["params"]} & {id(p) for p in no_decay["params"]}


@pytest.mark.slow
def test_hf_gpt2_logits_match_both_ways():
    transformers = pytest.importorskip("transformers")  # a hard dependency; import for the API only
    from privlm.model.hf import config_from_hf, from_hf_state_dict, to_hf_state_dict

    hf_cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # randomize LayerNorms and biases too, so every mapping is exercised
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = from_hf_state_dict(hf.state_dict(), config_from_hf(hf_cfg)).eval()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx).logits
    assert (ref - got).abs().max().item() <= 1e-5

    torch.manual_seed(2)
    native = GPT(config_from_hf(hf_cfg)).eval()
    hf2 = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf2.load_state_dict(to_hf_state_dict(native), strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing)
    with torch.no_grad():
        assert (hf2(idx).logits - native(idx).logits).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="baseline"):
        to_hf_state_dict(tiny("SM+R"))


def test_sequence_longer_than_position_table_is_rejected():
    model = tiny("SM")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.slow
def test_generate_greedy_is_deterministic():
    model = tiny("SM+LN+G").eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert a.shape == (1, 23) and torch.equal(a, b)


# ------------------------------------------------------------------------------------------- hooks and cache
def _reference_forward(model: GPT, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every hook point's value computed by hand from the weights (Eq. 1-4, 8), and the logits."""
    cfg = model.config
    B, T = idx.shape
    H, d = cfg.n_head, cfg.n_embd
    dk = d // H
    acts = {}

    def lin(x, linear):
        return x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)

    def norm(x, ln):
        return x if isinstance(ln, nn.Identity) else nn.functional.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)

    def heads(x):
        return x.view(B, T, H, dk).transpose(1, 2)

    x = model.wte.weight[idx] + model.wpe.weight[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        p = f"blocks.{i}."
        acts[p + "hook_resid_pre"] = x
        h = norm(x, blk.ln_1)
        q, k, v = heads(lin(h, a.q_proj)), heads(lin(h, a.k_proj)), heads(lin(h, a.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dk)
        if a.temperature is not None:
            scores = scores / a.temperatures()[:, :T, None]
        scores = scores.masked_fill(~causal, -math.inf)
        probs = scores.softmax(-1)
        z = probs @ v
        attn_out = lin(z.transpose(1, 2).reshape(B, T, d), a.o_proj)
        mid = x + attn_out
        acts.update({p + "attn.hook_q": q, p + "attn.hook_k": k, p + "attn.hook_v": v,
                     p + "attn.hook_attn_scores": scores, p + "attn.hook_probs": probs,
                     p + "attn.hook_entropy": -(probs * probs.clamp_min(1e-300).log()).sum(-1),
                     p + "attn.hook_z": z, p + "hook_attn_out": attn_out, p + "hook_resid_mid": mid})
        x = mid
        if blk.ffn is not None:
            f_in = norm(mid, blk.ln_2)
            if isinstance(blk.ffn, FusedFFN):
                f_out = lin(f_in, blk.ffn.fc)
            else:
                pre = lin(f_in, blk.ffn.fc_in)
                post = nn.functional.gelu(pre, approximate="tanh")
                acts.update({p + "ffn.hook_pre_act": pre, p + "ffn.hook_post_act": post})
                f_out = lin(post, blk.ffn.fc_out)
            acts.update({p + "hook_mlp_pre": f_in, p + "hook_mlp_post": f_out})
            x = mid + f_out if blk.alpha is None else blk.beta * mid + f_out / blk.alpha
        acts[p + "hook_resid_post"] = x
    return acts, norm(x, model.ln_f) @ model.wte.weight.T


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN", "SM+ScFuFFN^i2"])
def test_cache_holds_what_a_by_hand_forward_computes(preset):
    model = tiny(preset).double().eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.temperature is not None:
                block.attn.temperature.uniform_(-0.5, 2.0)
            if block.alpha is not None:
                block.alpha.fill_(1.7), block.beta.fill_(0.6)  # Eq. 8 away from its init of 1
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(0))
    want, want_logits = _reference_forward(model, idx)
    with torch.no_grad():
        out, cache = model.run_with_cache(idx)
    assert sorted(cache) == sorted(want)  # every hook point fired (pruned blocks have no FFN hooks)
    for name, ref in want.items():
        torch.testing.assert_close(cache[name], ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(out.logits, want_logits, rtol=1e-9, atol=1e-10)
    # typed access by layer, negative layers, stacking over layers
    assert cache.q(2) is cache["blocks.2.attn.hook_q"] and cache.resid_post(-1) is cache["blocks.5.hook_resid_post"]
    assert cache.stack("entropy").shape == (6, 3, 4, 16)
    if "^i2" in preset:
        with pytest.raises(KeyError, match="pruned blocks"):
            cache.mlp_post(5)
    with pytest.raises(IndexError):
        cache.q(6)
    assert not any(m.requested for m in model.modules() if hasattr(m, "requested"))  # all removed


def test_path_neutral_hooks_leave_logits_bit_identical(monkeypatch):
    model = tiny("SM(t)+ScFuFFN").eval()
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    plain = model(idx).logits
    calls = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    neutral = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_q", "hook_k", "hook_v", "hook_z",
               "hook_attn_out", "hook_mlp_pre", "hook_mlp_post"]
    out, cache = model.run_with_cache(idx, names=neutral)
    assert torch.equal(out.logits, plain) and len(calls) == 6  # fused stays fused, in every layer
    assert len(cache) == 6 * len(neutral) and "blocks.0.attn.hook_probs" not in cache
    # hook_attn_scores is a request for the T x T scores: that layer takes the explicit path, as for hook_probs
    explicit, probs = model.run_with_cache(idx, names=["blocks.1.attn.hook_probs"])
    calls.clear()
    out, cache = model.run_with_cache(idx, names=["blocks.1.attn.hook_attn_scores"])
    assert torch.equal(out.logits, explicit.logits) and len(calls) == 5 and list(cache) == ["blocks.1.attn.hook_attn_scores"]
    assert not torch.equal(out.logits, plain)  # (the explicit path rounds differently: the check means something)
    scores = cache.attn_scores(1)
    assert torch.isneginf(scores[..., 0, 1:]).all()  # causally masked
    assert torch.equal(scores.softmax(-1), probs.probs(1))
    with pytest.raises(KeyError, match="hook_nope"):
        model.run_with_cache(idx, names=["hook_nope"])
