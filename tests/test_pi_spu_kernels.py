"""The nonlinear kernels of the SPU profiles (privlm.spu.kernels): each within its error bound of the
numpy reference, under 2PC, over the input range a trained model produces; profiles as data."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from privlm.spu import kernels as K
from privlm.spu.launcher import spu_python
from privlm.spu.spu_profile import KERNEL_OPS, UnknownSPUProfile, available_spu_profiles, load_spu_profile


def test_profiles_are_data_and_name_their_kernels():
    assert {"default", "puma", "paper-era", "bumblebee-ring32"} <= set(available_spu_profiles())
    for name in available_spu_profiles():
        prof = load_spu_profile(name)
        for op, kernel in prof.kernels.items():
            assert kernel in K.KERNELS[op], (name, op)
            bits = int(prof.runtime_doc(op)["fxp_fraction_bits"])
            assert K.error_bound(op, kernel, bits) > 0, (name, op)
            if prof.ring_of(op) is not None:
                assert (op, kernel) in K.RING_STAGES, (name, op)
        assert prof.description and prof.why["corresponds to"]  # which published system, and what differs
    with pytest.raises(UnknownSPUProfile, match="known: bumblebee-ring32, default, paper-era, puma"):
        load_spu_profile("paper")


def test_renamed_profile_is_refused_with_its_new_name():
    with pytest.raises(UnknownSPUProfile, match="'bumblebee' is now 'puma'.*'bumblebee-ring32'"):
        load_spu_profile("bumblebee")
    from privlm.errors import PrivlmError
    from privlm.spu.spu_profile import check_spu_profile
    with pytest.raises(PrivlmError, match="now 'puma'") as e:
        check_spu_profile("bumblebee")
    assert "\n" not in str(e.value)


def test_ring32_profile_is_costed_per_op_not_run_whole():
    """SPU 0.9.5 has one ring per runtime: a profile with kernels in FM32 is refused by pi run/eval/measure with
    one line, and accepted where it is measured per op (calibrate)."""
    from privlm.errors import PrivlmError
    from privlm.spu.spu_profile import check_spu_profile
    prof = load_spu_profile("bumblebee-ring32")
    assert prof.runtime_doc("gelu")["field"] == "FM32" and prof.runtime_doc("gelu")["fxp_fraction_bits"] == 12
    assert prof.runtime_doc("layernorm")["field"] == "FM64" and prof.runtime_doc()["fxp_fraction_bits"] == 18
    with pytest.raises(PrivlmError, match="cannot convert shares between rings") as e:
        check_spu_profile("bumblebee-ring32")
    assert "\n" not in str(e.value)
    assert check_spu_profile("bumblebee-ring32", whole_program=False) == "bumblebee-ring32"
    assert prof.to_dict()["rings"]["gelu"]["field"] == "FM32"
    assert "rings" not in load_spu_profile("puma").to_dict()  # results of ring-free profiles stay current


def test_scaled_gelu_is_the_piecewise_polynomial_in_u_over_3():
    """The ring-safe GELU evaluates the same polynomials in v = u / 3: equal in float64, and every power and
    term it uses on its segments is small (a product in a 32-bit ring with 12 fraction bits must stay < 128)."""
    for coeffs, lo, hi in zip(K.piecewise_gelu_fit(), (K.GELU_ZERO_BELOW, K.GELU_SPLIT),
                              (K.GELU_SPLIT, K.GELU_IDENTITY_ABOVE)):
        q = K.scaled_coefficients(coeffs)
        u = np.linspace(lo, hi, 1001)
        v = u / K.GELU_SCALE
        np.testing.assert_allclose(np.polyval(q, v), np.polyval(coeffs, u), atol=1e-12)
        degree = len(q) - 1
        assert np.abs(v).max() ** degree < 128 and max(abs(c) for c in q) < 128


def test_piecewise_gelu_approximates_tanh_gelu_in_float64():
    """Without fixed point: the four-segment polynomial is within its bound of tanh-GELU everywhere and
    continuous enough at the breakpoints that no segment switch jumps by more than the bound."""
    cubic, sextic = K.piecewise_gelu_fit()
    x = np.linspace(-20, 20, 400001)
    pw = np.where(x < K.GELU_ZERO_BELOW, 0.0, np.where(x < K.GELU_SPLIT, np.polyval(cubic, x),
                                                      np.where(x <= K.GELU_IDENTITY_ABOVE, np.polyval(sextic, x), x)))
    err = np.abs(pw - K.gelu_reference(x)).max()
    assert err <= K.APPROXIMATION_BOUNDS[("gelu", "piecewise")]
    assert err > 1e-4  # it is an approximation (the bound is not vacuous)


def test_kernel_inputs_cover_the_stated_ranges():
    (s,), _ = K.kernel_inputs("softmax")
    r = K.INPUT_RANGES["softmax"]
    visible = s[s > -100]
    assert visible.max() == r["max"] and visible.min() == r["min"]
    causal = np.tril(np.ones(s.shape[-2:], bool))
    rows = s[0, causal.sum(-1) >= 96]  # rows that see at least 96 keys
    # the three row shapes: peaked (the largest logit twice), flat (a small std: row sums near the row length) and
    # one dominant key above a bulk (a gap between the largest and second largest logit)
    top2 = np.sort(np.where(causal[causal.sum(-1) >= 96], rows, -np.inf), -1)[:, -2:]
    peaked = top2[:, 1] == r["max"]
    sums = np.exp(rows - rows.max(-1, keepdims=True)).sum(-1) / causal[causal.sum(-1) >= 96].sum(-1)
    assert peaked.sum() >= 10 and (sums > 0.5).sum() >= 3 and ((top2[:, 1] - top2[:, 0]) > 5).sum() >= 3
    (u,), _ = K.kernel_inputs("gelu")
    assert u.min() < K.GELU_ZERO_BELOW - 5 and u.max() > K.GELU_IDENTITY_ABOVE + 5  # every GELU segment
    for op in ("layernorm", "rmsnorm"):
        x = K.kernel_inputs(op)[0][0].astype(np.float64)
        std = x.std(-1)
        ln = K.INPUT_RANGES["layernorm"]
        # row scales from std_min to std_max (both ends within a factor 2: stratified), outlier channels x10
        assert std.min() < 2 * ln["std_min"] and std.max() > ln["std_max"] / 2, op
        assert (np.abs(x[:, :4]).max(-1) > 5 * std).sum() >= 10, op


def _cases_by_profile() -> dict[str, tuple[str, ...]]:
    """The kernel cases each profile's process measures: every distinct `kernels.kernel_case` once, under the
    first profile (by name) that has it; a case shared by two profiles is the same program on the same inputs."""
    owner: dict[tuple, str] = {}
    for name in available_spu_profiles():
        for op in KERNEL_OPS:
            owner.setdefault(K.kernel_case(load_spu_profile(name), op), name)
    return {name: tuple(op for (op, *_), n in owner.items() if n == name) for name in available_spu_profiles()}


CASES = _cases_by_profile()


def test_every_kernel_case_of_every_profile_is_measured_once():
    """Each (profile, op) is measured by its own profile's process or by an earlier profile with the same case."""
    measured = {K.kernel_case(load_spu_profile(n), op) for n, ops in CASES.items() for op in ops}
    for name in available_spu_profiles():
        for op in KERNEL_OPS:
            assert K.kernel_case(load_spu_profile(name), op) in measured, (name, op)
    assert sum(map(len, CASES.values())) == len(measured)  # and none twice
    # cases differ where the profiles' settings differ: a profile's own kernels are measured under it
    assert {"softmax", "layernorm"} <= set(CASES["paper-era"]) and {"softmax", "gelu"} <= set(CASES["bumblebee-ring32"])


@pytest.mark.slow
@pytest.mark.parametrize("name", available_spu_profiles())  # one SPU process per profile: xdist spreads them
def test_every_kernel_of_every_profile_is_within_its_error_bound_under_2pc(name):
    """Each kernel case of the profile (`CASES`) runs under CHEETAH (both parties in one process) with the
    profile's runtime settings and compiler options (a ring profile's ring kernels in their own ring);
    max |2PC - numpy float64| <= the kernel's bound over KERNEL_TEST_ELEMENTS elements each
    (bench/pi_kernel_tails.py hunts the rare tails at larger sizes)."""
    proc = subprocess.run([str(spu_python()), "-m", "privlm.spu.kernels", "--ops", ",".join(CASES[name]), name],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {name} and tuple(res[name]) == CASES[name]
    for op, r in res[name].items():
        assert r["kernel"] == load_spu_profile(name).kernels[op]
        assert r["max_abs_err"] <= r["bound"] == K.error_bound(op, r["kernel"], r["fraction_bits"]), (name, op, r)
        if op in ("layernorm", "rmsnorm"):  # the loose bound is the small variances'; ordinary rows stay tight
            assert r["ordinary_rows"] > 0 and r["max_abs_err_ordinary"] <= r["bound_ordinary"], (name, op, r)
        assert r["max_abs_err"] > 0  # fixed point: a real computation, not a copy of the reference
        # enough elements that a rarely-but-badly failing protocol setting shows (see KERNEL_TEST_ELEMENTS; the
        # softmax's inputs are whole 128 x 128 heads, at least one)
        assert r["elements"] >= K.KERNEL_TEST_ELEMENTS, (name, op)


SMALL_EXP_CHECK = r"""
import json
import numpy as np
import spu.utils.simulation as spsim
from privlm.spu import kernels as K
from privlm.spu.party import compile_step
from privlm.spu.simulator import pair_simulator
from privlm.spu.spu_profile import load_spu_profile

prof = load_spu_profile("puma")
iters = prof.taylor_exp_iters()
rng = np.random.default_rng(0)
s = rng.normal(0.0, 3.0, (4, 1, 67)).astype(np.float32)  # a decode step's scores: H heads x one row of C
s[..., :2], s[..., 2:4], s[..., -8:] = 30.0, -30.0, -100.0  # the largest and smallest logits, masked slots
u = rng.uniform(-12.0, 12.0, (1, 512)).astype(np.float32)  # one token's SiLU inputs
out = {"iters": iters}
for op, x, ref in (("softmax", s, K.softmax_reference(s.astype(np.float64))),
                   ("silu", u, K.silu_reference(u.astype(np.float64)))):
    fn = K.kernel(op, prof.kernels[op])
    code = {str(it): compile_step(fn, [x.shape], op, prof.compiler_options(), exp_iters=it).code.decode()
            for it in (None, iters)}
    with K.products_for_exp(iters):
        got = spsim.sim_jax(pair_simulator(prof.runtime_config("cheetah")), lambda a: fn(a),
                            copts=prof.compiler_options())(x)
    out[op] = {"err": float(np.abs(np.asarray(got, np.float64) - ref).max()), "bound": K.error_bound(op, prof.kernels[op]),
               "exp_in_spu": "exponential" in code["None"], "exp_in_products": "exponential" in code[str(iters)],
               "products": code[str(iters)].count("multiply") - code["None"].count("multiply")}
from privlm.spu.program import batched_matmul
q, k = rng.normal(size=(1, 4, 1, 32)).astype(np.float32), rng.normal(size=(1, 4, 32, 67)).astype(np.float32)
codes = [compile_step(f, [q.shape, k.shape], "qk", prof.compiler_options()).code.decode()
         for f in (batched_matmul, lambda a, b: a @ b)]
got = spsim.sim_jax(pair_simulator(prof.runtime_config("cheetah")), batched_matmul)(q, k)
out["qk"] = {"err": float(np.abs(np.asarray(got, np.float64) - q.astype(np.float64) @ k).max()),
             "batched_dot": ["dot_general" in c for c in codes], "shape": list(np.shape(got))}
print(json.dumps(out))
"""


@pytest.mark.slow  # one SPU process: ~35 s on a loaded 2-core machine
def test_small_exponentials_run_as_products_within_the_kernel_bound():
    """`program.batched_matmul` of one-row products is one product with a block-diagonal, equal to a @ b under 2PC.
    Inside an SPU compilation with the runtime's Taylor iterations (`compile_step(exp_iters=8)`, as pi run and
    pi generate compile), the exp of a decode-sized tensor is SPU's (1 + z/256)^256 written as 8 products instead
    of SPU's exp op (8 HE squarings under CHEETAH); under 2PC the puma softmax and SiLU stay within their bounds."""
    proc = subprocess.run([str(spu_python()), "-c", SMALL_EXP_CHECK], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["iters"] == 8  # puma leaves fxp_exp_iters at SPU's default
    for op in ("softmax", "silu"):
        r = res[op]
        assert r["exp_in_spu"] and not r["exp_in_products"], (op, r)
        assert r["products"] == 9, (op, r)  # z * 2^-8, then the 8 squarings as products
        assert 0 < r["err"] <= r["bound"], (op, r)
    # a decode step's per-head q Kᵀ (one row per head): one 2-D product with the block-diagonal, not a batched one
    r = res["qk"]
    assert r["batched_dot"] == [False, True] and r["shape"] == [1, 4, 1, 67], r
    assert 0 < r["err"] < 1e-3, r  # fixed point with 18 fraction bits, inputs of order 1, sums of 32 products
