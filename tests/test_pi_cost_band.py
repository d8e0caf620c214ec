"""`privlm cost --spu-profile NAME|all`: the band of costs over SPU profiles, checked against sums computed by
hand from the profiles' own numbers (synthetic calibrated profiles in a private PRIVLM_HOME)."""
from __future__ import annotations

import json

import pytest

from privlm.cli import main
from privlm.opschema import COST_PROFILE_FORMAT

SIZE = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.vocab_size=100", "model.block_size=16", "data.seq_len=8"]
T = 8
# per SPU profile: bytes per element and per call of each op, seconds per softmax element, fixed bytes
NUMBERS = {"default": {"softmax": (3000.0, 100.0), "layernorm": (600.0, 50.0), "gelu": (2500.0, 10.0),
                       "sm_seconds": 2e-5, "fixed": 4.5e7},
           "puma": {"softmax": (1100.0, 0.0), "layernorm": (500.0, 20.0), "gelu": (1400.0, 0.0),
                    "sm_seconds": 1e-5, "fixed": 4.0e7}}


def _profile(name: str, n: dict) -> dict:
    ops = {op: {"bytes_per_element": n[op][0], "bytes_per_call": n[op][1], "seconds_per_element": 0.0,
                "seconds_per_call": 0.0} for op in ("softmax", "layernorm", "gelu")}
    ops["softmax"]["seconds_per_element"] = n["sm_seconds"]
    return {"format": COST_PROFILE_FORMAT, "name": name, "description": "synthetic", "provenance": {"kind": "test"},
            "network": {}, "conventions": {"flops": "dense", "final_layernorm": "counted"},
            "nonlinear": ops, "linear": {}, "per_token": {"bytes_per_vocab": 8.0}, "fixed": {"bytes": n["fixed"]}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVLM_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    for spu, cost in (("default", "spu-cheetah-measured"), ("puma", "spu-puma-measured")):
        (tmp_path / "profiles" / f"{cost}.json").write_text(json.dumps(_profile(cost, NUMBERS[spu])))
    return tmp_path


def hand_bytes(arch: str, n: dict) -> float:
    """L=2, H=2, d=32, FFN 4d=128, V=100, T=8: softmax L*H = 4 calls of T*T; SM+LN+G has 2L block LNs and ln_f
    (5 calls of T*d) and L GELUs of T*4d; the logits' share is T*V ring elements of 8 bytes."""
    b = 4 * T * T * n["softmax"][0] + 4 * n["softmax"][1] + T * 100 * 8 + n["fixed"]
    if arch == "SM+LN+G":
        b += 5 * T * 32 * n["layernorm"][0] + 5 * n["layernorm"][1] + 2 * T * 128 * n["gelu"][0] + 2 * n["gelu"][1]
    return b


def test_band_rows_are_the_hand_computed_sums(home, capsys):
    code = main(["cost", "SM+ScFuFFN", *SIZE, "--vs", "SM+LN+G", "--T", str(T), "--spu-profile", "all",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {(r["arch"], r["spu_profile"]): r for r in json.loads(out) if r["spu_profile"] in NUMBERS}
    assert set(rows) == {(a, p) for a in ("SM+LN+G", "SM+ScFuFFN") for p in NUMBERS}  # the baseline is shown too
    for spu, n in NUMBERS.items():
        base, fused = hand_bytes("SM+LN+G", n), hand_bytes("SM+ScFuFFN", n)
        r = rows[("SM+ScFuFFN", spu)]
        assert r["comm_gb"] == pytest.approx(fused / 1e9, rel=1e-12)
        assert rows[("SM+LN+G", spu)]["comm_gb"] == pytest.approx(base / 1e9, rel=1e-12)
        assert r["comm_savings"] == pytest.approx(base / fused, rel=1e-12)
        assert r["lat_min"] == pytest.approx(4 * T * T * n["sm_seconds"] / 60, rel=1e-12)
        assert r["bytes_per_element"] == {"softmax": n["softmax"][0]}
        assert rows[("SM+LN+G", spu)]["bytes_per_element"] == {op: n[op][0] for op in ("softmax", "layernorm", "gelu")}
        assert r["cost_profile"] == ("spu-cheetah-measured" if spu == "default" else "spu-puma-measured")
    # the savings differ across the band: that is the point of it
    assert rows[("SM+ScFuFFN", "default")]["comm_savings"] != pytest.approx(rows[("SM+ScFuFFN", "puma")]["comm_savings"])


@pytest.mark.slow  # privlm cost in an interpreter: seconds of CPU
def test_band_table_prints_per_op_bytes_and_savings(home, capsys):
    code = main(["cost", "SM+ScFuFFN", *SIZE, "--vs", "SM+LN+G", "--T", str(T), "--spu-profile", "all"])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["Network", "Arch.", "T", "SPU", "profile"] and "gelu B/el" in lines[0]
    puma = next(line for line in lines if line.startswith("SM+ScFuFFN") and " puma " in line)
    n = NUMBERS["puma"]
    assert "1100" in puma.split() and f"{hand_bytes('SM+LN+G', n) / hand_bytes('SM+ScFuFFN', n):.2f}×" in puma
    one = main(["cost", "SM+ScFuFFN", *SIZE, "--T", str(T), "--spu-profile", "puma", "--format", "json"])
    rows = json.loads(capsys.readouterr()[0])
    assert one == 0 and {r["spu_profile"] for r in rows} == {"puma"}


@pytest.mark.parametrize("argv, message", [
    (["--profile", "paper-fit", "--spu-profile", "all"], "not both"),
    (["--spu-profile", "nope"], "unknown SPU profile 'nope'"),
    (["--spu-profile", "bumblebee"], "now 'puma'"),
    (["--spu-profile", "all", "--table", "paper-t128"], "drop --spu-profile"),
])
def test_band_bad_input_is_one_line(home, capsys, argv, message):
    code = main(["cost", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


LLAMA_OPS = {"softmax": 900.0, "rmsnorm": 450.0, "silu": 1200.0, "gate_product": 60.0, "rotary": 12.0}


def test_band_of_a_hugging_face_llama_is_complete(tmp_path, monkeypatch, capsys):
    """A tiny random LLaMA (GQA, SwiGLU, RoPE, RMSNorm) from a save_pretrained directory: under a profile with
    every LLaMA op the row is complete (no 'unknown', no '≥'), and its bytes are Σ count·elements·B/el over the
    census entries of the row plus the logits' share and the setup, by hand."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=16,
                      intermediate_size=40, vocab_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    monkeypatch.setenv("PRIVLM_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    prof = _profile("spu-puma-measured", NUMBERS["puma"])
    for op, b in LLAMA_OPS.items():
        prof["nonlinear"][op] = {**prof["nonlinear"].get(op, {}), "bytes_per_element": b, "bytes_per_call": 0.0}
    (tmp_path / "profiles" / "spu-puma-measured.json").write_text(json.dumps(prof))
    code = main(["cost", str(tmp_path / "llama"), "--T", "8", "--spu-profile", "puma", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = next(r for r in json.loads(out) if r["arch"] == "llama")
    assert row["complete"] and not row["unknown"]
    ops = {o["op"] for o in row["nonlinear_ops"]}
    assert {"rmsnorm", "silu", "gate_product", "rotary", "softmax"} <= ops and "layernorm" not in ops
    by_hand = sum(o["count"] * o["shape"][0] * o["shape"][1] * LLAMA_OPS[o["op"]] for o in row["nonlinear_ops"]) \
        + 8 * 64 * 8 + NUMBERS["puma"]["fixed"]
    assert row["comm_gb"] == pytest.approx(by_hand / 1e9, rel=1e-12)
    assert row["bytes_per_element"] == {op: LLAMA_OPS[op] for op in ops}
    code = main(["cost", str(tmp_path / "llama"), "--T", "8", "--spu-profile", "puma"])
    text = capsys.readouterr()[0]
    assert code == 0 and "≥" not in text and "unknown" not in text and "rotary B/el" in text


def test_every_spu_profile_has_a_calibration_covering_llama_ops(monkeypatch, tmp_path):
    """The shipped calibrated cost profile of every SPU profile measures every op a privlm or LLaMA-family model
    has, under that very SPU profile: a TinyLlama-shaped model (22 layers, d 2048, 32 heads / 4 KV heads,
    SwiGLU 5632, vocabulary 32000) costs with no unknown op and no proxy under each."""
    from transformers import LlamaConfig

    from privlm.hfmodel import build_model
    from privlm.pi import census, load_profile, predict
    from privlm.spu.spu_profile import available_spu_profiles, cost_profile_name

    monkeypatch.setenv("PRIVLM_HOME", str(tmp_path))  # shipped profiles only
    cfg = LlamaConfig(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
    c = census(build_model(cfg), 128)
    for spu in available_spu_profiles():
        prof = load_profile(cost_profile_name(spu))
        assert prof.provenance["kind"] == "measured" and prof.provenance["spu_profile"]["name"] == spu, spu
        assert set(prof.nonlinear) >= {"softmax", "layernorm", "gelu", "relu", "rmsnorm", "silu", "gate_product",
                                       "rotary"}, spu
        cost = predict(c, prof, unknown="report")
        assert cost.complete and not any("charged at" in w for w in cost.warnings), (spu, cost.warnings)


def test_calibrate_ops_merges_into_the_existing_profile():
    """`privlm pi calibrate --ops rmsnorm,...`: the named ops' entries, fits and rounds come from the new
    measurement, every other entry (ops, linear costs, setup) stays; other SPU settings are refused."""
    from privlm.errors import PrivlmError
    from privlm.spu.calibrate import merge_ops

    settings = {"name": "puma", "runtime": {"field": "FM64"}, "compiler": {}, "kernels": {"softmax": "reciprocal"}}
    old = _profile("spu-puma-measured", NUMBERS["puma"])
    old["provenance"] = {"kind": "measured", "spu_profile": settings, "fit": {"softmax": {"x": 1}},
                         "rounds": [{"op": "softmax", "rounds": 60.0}]}
    new = _profile("spu-puma-measured", NUMBERS["default"])
    new["nonlinear"]["rmsnorm"] = {"bytes_per_element": 480.0}
    new["fixed"] = {"bytes": 1.0}
    new["provenance"] = {"kind": "measured", "spu_profile": {**settings, "kernels": {"rmsnorm": "rsqrt"}},
                         "fit": {"rmsnorm": {"y": 2}, "softmax": {"x": 9}}, "script": "privlm pi calibrate",
                         "rounds": [{"op": "rmsnorm", "rounds": 70.0}, {"op": "softmax", "rounds": 1.0}],
                         "date": "d", "machine": "m", "spu_version": "0.9.5", "load_average": [1.0, 1.0, 1.0],
                         "cpus": 2}
    got = merge_ops(old, new, ["rmsnorm"])
    assert got["nonlinear"]["rmsnorm"] == {"bytes_per_element": 480.0}
    assert got["nonlinear"]["softmax"] == old["nonlinear"]["softmax"] and got["fixed"] == old["fixed"]
    assert got["provenance"]["fit"] == {"softmax": {"x": 1}, "rmsnorm": {"y": 2}}
    assert got["provenance"]["rounds"] == [{"op": "softmax", "rounds": 60.0}, {"op": "rmsnorm", "rounds": 70.0}]
    assert got["provenance"]["merged"][0]["ops"] == ["rmsnorm"] and "rmsnorm" not in old["nonlinear"]
    new["provenance"]["spu_profile"] = {**settings, "runtime": {"field": "FM64", "fxp_div_goldschmidt_iters": 1}}
    with pytest.raises(PrivlmError, match="other SPU settings"):
        merge_ops(old, new, ["rmsnorm"])


def test_calibrate_rounds_only_merges_rounds_per_call():
    """`privlm pi calibrate --rounds-only`: each measured op's rounds per call is its rounds over its calls in the
    measured run; its bytes and seconds, the other ops' entries and the setup stay; the measurements replace the
    profile's earlier ones of those ops; other SPU settings are refused."""
    from privlm.errors import PrivlmError
    from privlm.spu.calibrate import merge_rounds
    from privlm.spu.spu_profile import load_spu_profile

    old = _profile("spu-puma-measured", NUMBERS["puma"])
    old["nonlinear"]["layernorm"]["rounds_per_call"] = 70.0
    old["provenance"] = {"kind": "measured", "spu_profile": load_spu_profile("puma").to_dict(),
                         "rounds": [{"op": "softmax", "rounds": 1.0, "calls": 1}, {"op": "setup", "rounds": 9.0},
                                    {"op": "layernorm", "rounds": 70.0, "calls": 1}]}
    rounds = [{"op": "setup", "calls": 1, "rounds": 250.0, "delay_ms": 40.0},
              {"op": "softmax", "calls": 4, "rounds": 230.0, "delay_ms": 40.0},
              {"op": "scores", "calls": 1, "rounds": 3.0, "delay_ms": 40.0}]
    got = merge_rounds(old, rounds, "puma")
    assert got["nonlinear"]["softmax"] == {**old["nonlinear"]["softmax"], "rounds_per_call": 57.5}
    assert got["nonlinear"]["layernorm"] == old["nonlinear"]["layernorm"] and got["fixed"] == old["fixed"]
    assert "rounds_per_call" not in old["nonlinear"]["softmax"]  # the profile read is left as it was
    assert got["provenance"]["rounds"] == [{"op": "layernorm", "rounds": 70.0, "calls": 1}, *rounds]
    merged = got["provenance"]["merged"][0]
    assert merged["rounds_of"] == ["scores", "softmax"] and merged["script"].endswith("--rounds-delay-ms 40")
    with pytest.raises(PrivlmError, match="other SPU settings"):
        merge_rounds(old, rounds, "default")
