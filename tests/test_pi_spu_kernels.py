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
from privlm.spu.spu_profile import UnknownSPUProfile, available_spu_profiles, load_spu_profile


def test_profiles_are_data_and_name_their_kernels():
    assert {"default", "bumblebee"} <= set(available_spu_profiles())
    for name in available_spu_profiles():
        prof = load_spu_profile(name)
        for op, kernel in prof.kernels.items():
            assert kernel in K.KERNELS[op], (name, op)
            assert (op, kernel) in K.ERROR_BOUNDS, (name, op)
        assert prof.description
    with pytest.raises(UnknownSPUProfile, match="known: bumblebee, default"):
        load_spu_profile("paper")


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
    visible = s[s > -100]
    assert visible.max() == K.INPUT_RANGES["softmax"]["max"] and visible.min() == K.INPUT_RANGES["softmax"]["min"]
    (u,), _ = K.kernel_inputs("gelu")
    assert u.min() < K.GELU_ZERO_BELOW - 5 and u.max() > K.GELU_IDENTITY_ABOVE + 5  # every GELU segment


@pytest.mark.slow
def test_every_kernel_of_every_profile_is_within_its_error_bound_under_2pc():
    """Each profile's softmax, GELU and LayerNorm run under CHEETAH (both parties in one process) with the
    profile's runtime settings and compiler options; max |2PC - numpy float64| <= the kernel's bound over
    2^18 elements each (with enable_mul_lsb_error, bumblebee failed this now and then by orders of magnitude)."""
    names = available_spu_profiles()
    proc = subprocess.run([str(spu_python()), "-m", "privlm.spu.kernels", *names], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        for op, r in res[name].items():
            assert r["kernel"] == load_spu_profile(name).kernels[op]
            assert r["max_abs_err"] <= r["bound"] == K.ERROR_BOUNDS[(op, r["kernel"])], (name, op, r)
            assert r["max_abs_err"] > 0  # fixed point: a real computation, not a copy of the reference
            # enough elements that a rarely-but-badly failing protocol setting shows (see KERNEL_TEST_ELEMENTS)
            assert r["elements"] == K.KERNEL_TEST_ELEMENTS, (name, op)
