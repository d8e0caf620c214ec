"""Eq. 8's scales folded into the server's weights for the 2PC program (privlm.model.fold): the folded model and
the interpreted traced program compute the model's logits; the folded graph multiplies no secret by a learned
scalar (only SM(t)'s per-position temperatures remain); the user's model is not touched; LayerNorm models keep
beta as a private product (the rule of docs/DECISIONS.md#traced-program)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from privlm.config import load_config
from privlm.model import GPT
from privlm.model.fold import FoldError, fold_scales
from privlm.spu.launcher import spu_python
from privlm.trace import save_trace, trace_model

T, V, L = 12, 48, 3
SMALL = ["model.n_layer=3", "model.n_embd=32", "model.n_head=2", f"model.block_size={T}", f"model.vocab_size={V}",
         f"data.seq_len={T}", "model.init_std=0.15"]
# the folded presets (LN-free with Eq. 8), a pruned one (a block without FFN keeps the running scale), and
# LayerNorm + Eq. 8 (not folded: beta stays a private product)
FOLDED = ["SM+ScFuFFN", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)", "SM+ScFFN", "SM+ScFuFFN^i1"]
LN_SCALED = "SM+LN+ScFFN"
IDS = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))


def _model(preset: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(load_config(preset, SMALL).model)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():  # alpha and beta far from 1 and from each other (one beta negative), so a wrong fold shows
        for i, block in enumerate(model.blocks):
            if block.alpha is not None:
                block.alpha.copy_(0.4 + 1.5 * torch.rand((), generator=g))
                block.beta.copy_((-1.0 if i == 1 else 1.0) * (0.5 + torch.rand((), generator=g)))
        for name, p in model.named_parameters():
            if "temperature" in name:
                p.copy_(0.3 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits[0].numpy()


@pytest.mark.parametrize("preset", FOLDED)
def test_folded_model_computes_the_models_logits_and_leaves_it_alone(preset):
    model = _model(preset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model)
    folded = fold_scales(model)
    assert folded is not model
    assert all(b.alpha is None and b.beta is None for b in folded.blocks)
    assert folded.lm_head.weight is not folded.wte.weight  # the head reads the rescaled stream: untied
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(_logits(folded), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    after = model.state_dict()  # the user's model: same tensors, same values, head still tied
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.lm_head.weight is model.wte.weight and all(b.alpha is not None for b in model.blocks if b.ffn)


@pytest.mark.slow  # torch.export traces: seconds of CPU
@pytest.mark.parametrize("preset", [p for p in FOLDED if not p.startswith("EReg")] + [LN_SCALED])  # EReg: same
def test_folded_graph_multiplies_no_secret_by_a_learned_scalar(preset):
    """No product or division of a secret by a server value in the traced graph, except SM(t)'s temperature
    (per head and query position: one product of the queries per layer) and, with LayerNorm, beta."""
    model = _model(preset)
    doc = trace_model(model, T).doc
    private = [n for n in doc["nodes"] if n["op"] in ("private_scale", "private_div")]
    want = []
    if model.config.attn_temperature:
        want += [("private_scale", "attn", i) for i in range(L)]
    if model.config.norm == "layernorm":  # beta on the residual stream; 1/alpha folded into the FFN output
        want += [("private_scale", "block", i) for i in range(L)]
    assert sorted((n["op"], n["scope"], n["layer"]) for n in private) == sorted(want)
    for n in private:
        shape = doc["server"][next(a["server"] for a in n["args"] if isinstance(a, dict) and "server" in a)]
        assert shape == ([model.config.n_head, T, 1] if n["scope"] == "attn" else [1])
    if model.config.norm == "none":  # alpha and beta live in the linear weights only
        assert not any("alpha" in k or "beta" in k for k in doc["server"])


def test_layernorm_models_are_not_folded_and_zero_beta_is_refused():
    model = _model(LN_SCALED)
    assert fold_scales(model) is model  # LN(c x) != LN(x) (eps): beta stays a private product, exact
    model = _model("SM+ScFuFFN")
    with torch.no_grad():
        model.blocks[1].beta.zero_()
    with pytest.raises(FoldError, match="beta is 0 in block 1"):
        fold_scales(model)


@pytest.mark.slow  # SPU environment: JAX compiles the interpreted programs (~20 s)
def test_interpreted_folded_program_matches_torch(tmp_path):
    """The traced, folded program interpreted in the SPU environment (numpy + jax, as the parties run it) gives the
    unfolded torch model's logits, every position and the last one, three blocks deep."""
    refs = {}
    for preset in ["SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)", "SM+ScFFN", LN_SCALED]:
        model = _model(preset)
        d = tmp_path / preset.replace("(", "").replace(")", "").replace("+", "_")
        save_trace(trace_model(model, T), d)
        (d / "ids.json").write_text(json.dumps(IDS[0].tolist()))
        refs[d] = _logits(model)
    proc = subprocess.run([str(spu_python()), "-m", "privlm.spu.program", *map(str, refs)], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for d, ref in refs.items():
        assert np.abs(ref).max() > 0.5, d.name
        np.testing.assert_allclose(np.load(d / "jax_logits_traced_all.npy"), ref, atol=2e-5 * np.abs(ref).max(),
                                   rtol=0, err_msg=d.name)
        np.testing.assert_allclose(np.load(d / "jax_logits_traced_last.npy"), ref[-1:],
                                   atol=2e-5 * np.abs(ref).max(), rtol=0, err_msg=d.name)


_JAXPR = """
import json, jax, numpy as np
from privlm.spu.program import private_scale
x, s, b = np.ones((1, 2, 12, 16), np.float32), np.ones((2, 12, 1), np.float32), np.ones((1,), np.float32)
out = {}
for name, args in {"temperature": (x, s), "scalar": (x[0, 0][None], b)}.items():
    eqns = jax.make_jaxpr(private_scale)(*args).jaxpr.eqns
    out[name] = [(e.primitive.name, list(e.outvars[0].aval.shape)) for e in eqns]
print(json.dumps(out))
"""


@pytest.mark.slow  # SPU environment (jax)
def test_row_scale_runs_as_a_product_with_a_diagonal():
    """SM(t)'s 1/t per query row (and a scalar beta) is not an elementwise secret x private product in the
    program: no full-size multiply, a dot_general with the diagonal eye x s (built from the scale alone)."""
    proc = subprocess.run([str(spu_python()), "-c", _JAXPR], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = {"temperature": ([1, 2, 12, 16], [2, 12, 12]), "scalar": ([1, 12, 16], [12, 12])}
    for name, (shape, diag) in cases.items():
        eqns = json.loads(proc.stdout)[name]
        assert not [e for e in eqns if e[0] == "mul" and e[1] == shape], (name, eqns)  # no elementwise product
        assert ["mul", diag] in eqns and any(e[0] == "dot_general" for e in eqns), (name, eqns)

