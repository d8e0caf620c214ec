"""What a model feeds each SPU kernel (privlm.spu.ranges) and the ranges its bounds are tested on
(privlm.spu.kernels.ranges_tested), against independent computations: torch's softmax, the embedding sum, the
test inputs' construction. Plaintext only (no SPU)."""
from __future__ import annotations

import numpy as np
import torch

from privlm.config import load_config
from privlm.model import GPT
from privlm.opschema import MASK_VALUE
from privlm.spu.kernels import INPUT_RANGES, kernel_quantities, ranges_tested
from privlm.spu.ranges import measure_model, model_kernel_inputs, op_points

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.vocab_size=61", "model.block_size=16",
        "data.seq_len=16"]


def tiny(preset: str) -> GPT:
    torch.manual_seed(0)
    return GPT(load_config(preset, TINY).model).eval()


def test_softmax_quantities_match_torch_softmax_with_masks_at_the_programs_fill():
    torch.manual_seed(1)
    s = torch.randn(3, 5, 5) * 4
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    q = kernel_quantities("softmax", [s.numpy()])
    p = torch.softmax(s.double(), -1)
    # sum_j exp(s_j - max) = 1 / p_argmax, and the masked entries enter the exponential at MASK_VALUE - rowmax
    np.testing.assert_allclose(q["row_sum"], (1.0 / p.max(-1).values).numpy().ravel(), rtol=1e-12)
    z = q["exp_input"].reshape(3, 5, 5)
    rowmax = s.max(-1).values.double().numpy()
    assert np.allclose(z[:, 0, 1:], MASK_VALUE - rowmax[:, :1])
    assert z.max() == 0.0


def test_ranges_tested_are_those_of_the_kernel_tests_inputs():
    r = ranges_tested("softmax")
    # the tests' peaked rows hold the largest logit and the causal fill: z reaches MASK_VALUE - max
    assert r["exp_input"] == (MASK_VALUE - INPUT_RANGES["softmax"]["max"], 0.0)
    assert r["row_sum"][0] == 1.0  # the first query sees one key
    # flat rows: near-uniform causal rows, as trained models' (row sums up to 128 at T = 128) have
    assert r["row_sum"][1] >= 100
    g = ranges_tested("gelu")["input"]
    assert INPUT_RANGES["gelu"]["min"] <= g[0] < g[1] <= INPUT_RANGES["gelu"]["max"]
    for op in ("layernorm", "rmsnorm"):
        # trained models' LayerNorm variances: 6.7e-4 (a layer 0) to 5.0e3 (a GPT-2-size ln_f), |x| up to 226
        lo, hi = ranges_tested(op)["variance"]
        assert 0 < lo <= 1e-3 and hi >= 1e3, op
        x = ranges_tested(op)["input"]
        assert x[0] <= -226 and x[1] >= 226, op


def test_measured_ranges_of_a_model_against_independent_computations():
    model = tiny("SM+LN+G")
    with torch.no_grad():  # a residual stream far below the tested variances (an initialized model's is inside)
        model.wte.weight.mul_(1e-3)
        model.wpe.weight.mul_(1e-3)
    ids = torch.randint(0, 61, (5, 16), generator=torch.Generator().manual_seed(2))
    ops = measure_model(model, ids)
    assert set(ops) == {"softmax", "layernorm", "gelu"}
    with torch.no_grad():
        out = model(ids, output_attentions=True)
        row_sums = torch.cat([1.0 / p.max(-1).values.flatten() for p in out.attentions])
        x0 = (model.wte(ids) + model.wpe(torch.arange(16))).double()  # block 0's LN1 input
    rs = ops["softmax"]["row_sum"]
    assert rs["values"] == 2 * 5 * 2 * 16  # layers x sequences x heads x queries
    assert abs(rs["max"] - row_sums.max().item()) < 1e-4 * rs["max"]
    var0 = x0.var(-1, unbiased=False)
    lo, hi = ops["layernorm"]["variance"]["layers"]["0.ln_1"]
    assert abs(lo - var0.min().item()) < 1e-9 and abs(hi - var0.max().item()) < 1e-9
    v = ops["layernorm"]["variance"]
    assert v["values"] == 5 * 16 * 5  # LN1, LN2 per layer and ln_f, one value per row
    assert var0.max().item() < v["tested"][0]  # every row of block 0's LN1 is below the tested variances
    assert 5 * 16 <= v["outside"] <= v["values"]
    g = ops["gelu"]["input"]
    assert g["values"] == 2 * 5 * 16 * 4 * 32 and g["outside"] == 0


def test_kernel_inputs_of_a_model_are_the_furthest_layers_values():
    model = tiny("SM(t)+ScFuFFN")
    with torch.no_grad():  # heads of distinct sharpness (an initialized model's rows are all near uniform)
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(30.0)
            block.attn.k_proj.weight.mul_(30.0)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    ops = measure_model(model, ids)
    assert set(ops) == {"softmax"} and set(op_points(model.config).values()) == {("softmax", "0", None),
                                                                               ("softmax", "1", None)}
    arrays, chosen = model_kernel_inputs(model, ids, ops, max_elements=16 * 16)
    s = arrays["softmax.0"]
    assert s.shape == (1, 16, 16) and s[0, 0, 1] == MASK_VALUE  # one whole head, masks at the fill
    with torch.no_grad():
        probs = model(ids[:1], output_attentions=True).attentions[int(chosen["softmax"])][0].double()
    # all inside the tested ranges: the head taken is the one whose row sums come nearest the tested maximum
    # (sum exp(z) = 1 / p_max)
    head = int((1.0 / probs.max(-1).values).max(-1).values.argmax())
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(s[0]).double(), -1).numpy(), probs[head].numpy(),
                               atol=1e-6)
