"""Attention entropy on fused kernels (privlm.model.entropy_attention) against an independent explicit reference,
the attention path choice (fused / fused + entropy / explicit probabilities) and the no-T x T-tensor guarantee."""

import json

import numpy as np
import pytest
import torch
from allocations import AllocationRecorder

from privlm.config import load_config
from privlm.entropy import EntropyRegularizer
from privlm.model import capture
from privlm.model.attention import EXPLICIT, FUSED, FUSED_ENTROPY, attention_path, scaled_queries
from privlm.model.entropy_attention import attention_with_entropy
from privlm.model.gpt import GPT


def reference(q, k, v, temperature=None, keep=None):
    """Explicit float64 attention and entropy with autograd's own softmax/log_softmax (no privlm code): masked
    logits are a finite -1e30, so 0 * log 0 never appears and every gradient is finite."""
    q, k, v = q.double(), k.double(), v.double()
    t = None if temperature is None else temperature.double()
    z = scaled_queries(q, t) @ k.transpose(-2, -1)
    T_q, T_k = z.shape[-2:]
    if keep is None:
        keep = torch.ones(T_q, T_k, dtype=torch.bool).tril()
    z = z.masked_fill(~keep, -1e30)
    p, log_p = z.softmax(-1), z.log_softmax(-1)
    entropy = -(p * log_p).sum(-1)
    y = p @ v
    return y, entropy


def fused(q, k, v, temperature=None, **kw):
    return attention_with_entropy(scaled_queries(q, temperature), k, v, **kw)


def inputs(T, dtype, logit_scale=1.0, seed=0, B=2, H=3, d=8, temperature=True):
    g = torch.Generator().manual_seed(seed)
    q = (logit_scale * torch.randn(B, H, T, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    t = (0.5 + torch.rand(H, T + 3, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if temperature else None
    return q, k, v, t


def grads(y, entropy, wrt, g_y, g_h):
    loss = (y.double() * g_y).sum() + (entropy.double() * g_h).sum()
    return [g.double() for g in torch.autograd.grad(loss, [x for x in wrt if x is not None])]


# ------------------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 7, 37, 130])
@pytest.mark.parametrize("temperature", [False, True], ids=["softmax", "SM(t)"])
def test_entropy_output_and_gradients_match_explicit_reference(dtype, T, temperature):
    """Entropy [B,H,T], output and d/d(q, k, v, t) within 1e-5 of float64 explicit attention; T not a multiple of
    any kernel block, T=1 (one-token rows)."""
    q, k, v, t = inputs(T, dtype, temperature=temperature, seed=T)
    y, h = fused(q, k, v, t)
    assert h.shape == (2, 3, T) and y.shape == (2, 3, T, 8)
    y_ref, h_ref = reference(q, k, v, t)
    torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    g_y, g_h = torch.randn(y.shape, generator=gen, dtype=torch.float64), torch.randn(h.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(grads(y, h, (q, k, v, t), g_y, g_h), grads(y_ref, h_ref, (q, k, v, t), g_y, g_h)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if T == 1:  # one visible key: the output is v, the entropy 0
        torch.testing.assert_close(y.double(), v.double(), rtol=0, atol=1e-6)
        assert h.abs().max() < 1e-6


@pytest.mark.parametrize("dtype,logit_scale", [(torch.float64, 50.0), (torch.float32, 8.0)])
def test_large_logits_near_one_hot_rows(dtype, logit_scale):
    """Logits up to ~300 (float64) / ~50 (float32): rows are nearly one-hot and H = LSE - sum p z is a difference
    of two large numbers. Values within 1e-5; gradients within 1e-5 in float64. In float32 the backward's
    z_j - zbar is the same difference, so its gradient error grows with max|z| (documented: relative to the
    gradient's size, below 1e-5 * max|z|; ~4e-4 at max|z| = 50, where the explicit path gets ~1e-5)."""
    q, k, v, t = inputs(33, dtype, logit_scale=logit_scale, seed=3)
    y, h = fused(q, k, v, t)
    y_ref, h_ref = reference(q, k, v, t)
    assert h_ref.min() < 1e-3  # the regime this test is about: some rows (almost) collapsed
    torch.testing.assert_close(h.double(), h_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=1e-5)
    z_max = (scaled_queries(q.double(), t.double()) @ k.double().transpose(-2, -1)).tril().abs().max().item()
    assert z_max > 40
    g_h = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for got, want in zip(grads(y, h, (q, k, t), 0.0, g_h), grads(y_ref, h_ref, (q, k, t), 0.0, g_h)):
        scale = want.abs().max().item()
        tol = 1e-5 * max(1.0, scale) if dtype == torch.float64 else 1e-5 * z_max * scale
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_float32_entropy_error_grows_with_the_largest_logit_only():
    """The float32 cancellation in LSE - sum p z: absolute error below 2e-7 * max|z| (documented bound)."""
    q, k, v, t = inputs(33, torch.float32, logit_scale=50.0, seed=3)
    _, h = fused(q, k, v, t)
    _, h_ref = reference(q, k, v, t)
    z_max = (scaled_queries(q.double(), t.double()) @ k.double().transpose(-2, -1)).tril().abs().max().item()
    assert z_max > 200
    assert (h.double() - h_ref).abs().max().item() < 2e-7 * z_max


def test_gradcheck_float64_including_temperature():
    q, k, v, t = inputs(6, torch.float64, seed=5, B=1, H=2, d=3)

    def fn(q, k, v, t):
        return fused(q, k, v, t)

    assert torch.autograd.gradcheck(fn, (q, k, v, t))
    # entropy alone and output alone (the backward skips the unused attention call)
    assert torch.autograd.gradcheck(lambda q, k, t: fused(q, k, v, t)[1], (q, k, t))
    assert torch.autograd.gradcheck(lambda q, k, v: fused(q, k, v)[0], (q, k, v))


def test_uniform_attention_entropy_is_log_of_visible_keys():
    """Zero logits: query i sees i + 1 keys uniformly, H_i = log(i + 1) (closed form)."""
    q = torch.zeros(1, 1, 9, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 9, 4, dtype=torch.float64)
    _, h = attention_with_entropy(q, k, k)
    np.testing.assert_allclose(h[0, 0].numpy(), np.log(np.arange(1, 10)), rtol=0, atol=1e-12)


def test_padding_mask_and_fully_masked_rows():
    """A boolean keep-mask (causal and left padding, as HF builds it): values and gradients match the reference;
    a query that sees no key gets y = 0 and entropy 0 with finite gradients."""
    q, k, v, _ = inputs(10, torch.float64, seed=7, temperature=False)
    keep = torch.ones(10, 10, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, :3] = False  # sequence 1 is left-padded by 3: its first three queries see nothing
    y, h = fused(q, k, v, attn_mask=keep)
    y_ref, h_ref = reference(q, k, v, keep=keep)
    visible = keep.any(-1)  # [B, 1, T]
    torch.testing.assert_close(h.masked_select(visible), h_ref.masked_select(visible))
    torch.testing.assert_close(y[1, :, 3:], y_ref[1, :, 3:])
    assert (h[1, :, :3] == 0).all() and (y[1, :, :3] == 0).all()
    g_h = visible.double().expand(h.shape)  # the padded queries do not enter the loss
    for got, want in zip(grads(y, h, (q, k), 0.0, g_h), grads(y_ref, h_ref, (q, k), 0.0, g_h)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_bf16_entropy_error_stays_within_the_documented_bound():
    q, k, v, _ = inputs(64, torch.float32, seed=9, temperature=False)
    _, h = attention_with_entropy(scaled_queries(q, None).bfloat16(), k.bfloat16(), v.bfloat16())
    _, h_ref = reference(q.bfloat16(), k.bfloat16(), v.bfloat16())  # same rounded inputs, exact arithmetic
    assert h.dtype == torch.float32
    z = scaled_queries(q.double(), None) @ k.double().transpose(-2, -1)
    bound = z.abs().amax(-1) * 2.0 ** -8 + 1e-3
    assert ((h.double() - h_ref).abs() <= bound).all()


# ------------------------------------------------------------------------------------- model paths
def tiny(preset, T=16):
    cfg = load_config(preset, ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.vocab_size=61",
                               f"data.seq_len={T}", f"model.block_size={T}", "reg.enabled=true"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # temperatures away from their init so that d/dt is not symmetric
        for block in model.blocks:
            if block.attn.temperature is not None:
                block.attn.temperature.uniform_(-0.4, 0.4)
    return model, cfg


def test_attention_path_is_chosen_from_what_was_asked():
    cpu = torch.device("cpu")
    assert attention_path(False, False, cpu) == FUSED
    assert attention_path(True, False, cpu) == FUSED_ENTROPY
    assert attention_path(True, True, cpu) == EXPLICIT
    assert attention_path(False, True, cpu) == EXPLICIT
    assert attention_path(True, False, torch.device("meta")) == EXPLICIT  # no fused kernel there


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN"])
def test_regularized_step_gradients_equal_on_fused_and_explicit_paths(preset):
    """CE + lambda * L_ent through the fused path vs the explicit-probabilities path (forced by a hook on
    hook_probs): same loss and same gradient for every parameter, temperatures and thresholds included."""
    model, cfg = tiny(preset)
    reg = EntropyRegularizer(2, 2, 16, cfg.reg)
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters()) + list(reg.parameters())

    def step():
        out = model(idx, idx, output_entropy=True)
        l_ent = reg(out.entropy)
        loss = out.loss + 10.0 * l_ent  # a large lambda: the entropy gradient must matter
        return loss, torch.autograd.grad(loss, params), out

    loss_f, g_f, out_f = step()
    with capture(model, lambda n: n.endswith("hook_probs")) as probs:
        loss_e, g_e, out_e = step()
    assert len(probs) == 2  # the hooks fired: this really was the explicit path
    torch.testing.assert_close(out_f.entropy, out_e.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(list(model.named_parameters()) + [("theta", None)], g_f, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_hooks_are_requests_and_capture_works_on_every_path():
    model, _ = tiny("SM(t)+ScFuFFN")
    attn = model.blocks[0].attn
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(idx, output_entropy=True, output_attentions=True)
    assert not attn.hook_entropy.requested
    with capture(model, lambda n: n.endswith("hook_entropy")) as acts:  # no output_entropy: the hook asks
        assert attn.hook_entropy.requested and not attn.hook_probs.requested
        out = model(idx)
    assert out.entropy is None  # not asked by the caller, but computed for the hook
    torch.testing.assert_close(acts["blocks.0.attn.hook_entropy"], ref.entropy[0], rtol=1e-5, atol=1e-6)
    assert not attn.hook_entropy.requested  # removed with the capture
    with capture(model, ["blocks.1.attn.hook_probs"]) as acts:
        model(idx)
    torch.testing.assert_close(acts["blocks.1.attn.hook_probs"], ref.attentions[1])
    handle = attn.hook_probs.register_forward_hook(lambda *a: None)
    handle.remove()
    handle.remove()  # removing twice withdraws the request once
    assert attn.hook_probs.n_hooks == 0


def test_nan_counts_agree_between_paths():
    model, _ = tiny("SM+LN+G")
    with torch.no_grad():
        model.blocks[1].attn.q_proj.bias[3] = float("nan")  # head 0 of layer 1: every query row NaN
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(2))
    fused_out = model(idx, output_entropy=True)
    explicit_out = model(idx, output_entropy=True, output_attentions=True)
    assert explicit_out.nan_counts.tolist() == [0, 2 * 16 * 16]
    assert fused_out.nan_counts.tolist() == explicit_out.nan_counts.tolist()


# ------------------------------------------------------------------------------------- no T x T tensor
def regularized_step_allocations(model, reg, idx, hook_probs=False):
    recorder = AllocationRecorder()
    with recorder:
        if hook_probs:
            with capture(model, lambda n: n.endswith("hook_probs")):
                out = model(idx, idx, output_entropy=True)
        else:
            out = model(idx, idx, output_entropy=True)
        l_ent = reg(out.entropy)
        (out.loss + 1e-2 * l_ent).backward()
    return recorder


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN"])
def test_regularized_step_allocates_nothing_of_t_by_t(preset):
    """Forward + backward of a regularized step at T=512, batch 1, 2 heads: no tensor with T*T elements or more
    (the [1, 2, T, T] attention would have 2 T^2); the same check flags the explicit path."""
    T = 512
    model, cfg = tiny(preset, T=T)
    reg = EntropyRegularizer(2, 2, T, cfg.reg)
    idx = torch.randint(0, 61, (1, T), generator=torch.Generator().manual_seed(3))
    recorder = regularized_step_allocations(model, reg, idx)
    assert any("flash_attention_for_cpu_backward" in op for op in recorder.ops())  # it sees the backward too
    assert recorder.at_least(T * T) == []
    model.zero_grad(set_to_none=True)
    assert regularized_step_allocations(model, reg, idx, hook_probs=True).at_least(T * T)


# ------------------------------------------------------------------------------------------- self-check
@pytest.fixture
def fresh_self_check():
    from privlm.model import entropy_attention as ea
    ea.reset_self_checks()
    yield ea
    ea.reset_self_checks()  # later tests check the real kernels again


def test_self_check_passes_once_per_device_and_leaves_random_streams_alone(fresh_self_check):
    ea = fresh_self_check
    state = torch.get_rng_state()
    check = ea.self_check(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # the check's inputs come from a private generator
    assert check.ok and check.device == "cpu" and 0 <= check.max_error <= 1 and "passed" in check.message
    assert ea.self_check(torch.device("cpu")) is check and ea.self_check_failures() == []
    assert attention_path(True, False, torch.device("cpu")) == FUSED_ENTROPY
    assert not ea.self_check(torch.device("meta")).ok  # no kernel there: nothing to check, explicit path


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["mismatch", "error"])
def test_failed_self_check_falls_back_to_the_explicit_path(fresh_self_check, monkeypatch, caplog, tmp_path, fault):
    ea = fresh_self_check
    real = ea._CPUFlash.forward

    def broken(q, k, v, mask, is_causal):
        if fault == "error":
            raise RuntimeError("no kernel image is available for execution on the device")
        out, lse, aux = real(q, k, v, mask, is_causal)
        return out, lse + 0.01, aux  # an entropy off by 0.01 nats: 100 x the float32 tolerance

    monkeypatch.setattr(ea._CPUFlash, "forward", staticmethod(broken))
    model, _ = tiny("SM(t)+ScFuFFN")
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger=ea.__name__):
        out = model(idx, output_entropy=True)
    check = ea.self_check(torch.device("cpu"))
    assert not check.ok and "using the explicit path" in check.message and "\n" not in check.message
    assert ("MISMATCH" in check.message) if fault == "mismatch" else ("RuntimeError: no kernel image" in check.message)
    assert [r.getMessage() for r in caplog.records] == [check.message]  # one warning line, once
    assert attention_path(True, False, torch.device("cpu")) == EXPLICIT
    with capture(model, lambda n: n.endswith("hook_probs")):  # the explicit path, asked for directly
        explicit = model(idx, output_entropy=True)
    assert torch.equal(out.entropy, explicit.entropy) and torch.equal(out.logits, explicit.logits)
    # attention_with_entropy itself (the Hugging Face path) computes explicitly too: right values, finite grads
    q, k, v, t = inputs(37, torch.float32)
    y, h = fused(q, k, v, t)
    y_ref, h_ref = reference(q, k, v, t)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    # a run records the fallback once in its telemetry (metrics.jsonl) and trains on
    from test_train import synthetic_data, tiny_cfg
    from privlm.train import train
    run = tmp_path / "run"
    train(tiny_cfg("train.max_steps=4", "train.entropy_every=1", "train.eval_every=4", "train.save_every=4"),
          run, quiet=True, data=synthetic_data(n_train=32, n_valid=8))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["message"] for r in lines if r["kind"] == "warning"] == [check.message]
