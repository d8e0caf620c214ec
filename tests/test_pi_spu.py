"""privlm pi: JAX export vs PyTorch, private inference under SPU (sim and 2 processes), privacy split,
calibrated profile vs direct measurement. The SPU side runs in .venv-spu (make spu-setup)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

from privlm.config import load_config, to_yaml
from privlm.model import GPT
from privlm.spu.export import save_export
from privlm.spu.launcher import SPUError, spu_python

REPO = Path(__file__).resolve().parents[1]
PRIVLM = [sys.executable, "-m", "privlm.cli"]
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.vocab_size=64", "model.block_size=16",
        "data.seq_len=16", "model.init_std=0.2"]
PROMPT = "w1 w5 w9 w3 w22 w7 w8 w40"


def _cli(*args, env=None, check=True):
    proc = subprocess.run([*PRIVLM, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"privlm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def _word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + [f"w{i}" for i in range(1, 64)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory in the docs/CONTRACTS.md layout: config.yaml, model.safetensors, tokenizer.json."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("SM+LN+G", TINY)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    (out / "config.yaml").write_text(to_yaml(cfg))
    save_model(model, str(out / "model.safetensors"))
    _word_tokenizer(out / "tokenizer.json")
    return out


# ---------------------------------------------------------------------------------------------------------
EXPORT_PRESETS = ["SM+LN+G", "SM+LN+R", "SM+LN+LR(0.1)", "SM+LR(layer)", "SM+R", "SM", "SM+ScFFN", "SM+ScFuFFN",
                  "SM(t)+ScFuFFN", "SM+ScFuFFN^i1", "SM+WN(qkvo+ffn)", "SM+SN(qk+ffn)", "SM+WN(qk)"]


def test_jax_forward_matches_pytorch_for_every_preset(tmp_path):
    """The pure-JAX step program (with the -100 causal mask) reproduces PyTorch's logits to 1e-4."""
    expected = {}
    for j, preset in enumerate(EXPORT_PRESETS):
        over = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.vocab_size=40",
                "model.block_size=16", "data.seq_len=16", "model.init_std=0.15"]
        if preset.startswith("SM(t)"):
            over.append("model.temperature_param=direct")
        cfg = load_config(preset, over)
        torch.manual_seed(j)
        model = GPT(cfg.model)
        with torch.no_grad():  # move every scalar/vector off its init so alpha, beta, t, slopes, LN all matter
            for name, p in model.named_parameters():
                if "temperature" in name:
                    p.copy_(0.3 + torch.rand_like(p))
                elif p.ndim < 2:
                    p.add_(0.2 * torch.randn_like(p))
        model.eval()
        if cfg.model.spectral_norm != "none":  # a few train-mode passes so the power-iteration vectors are not init
            model.train()
            for _ in range(3):
                model(torch.randint(0, 40, (1, 8)))
            model.eval()
        ids = torch.randint(0, 40, (1, 13))
        d = tmp_path / str(j)
        save_export(model, d)
        (d / "ids.json").write_text(json.dumps(ids[0].tolist()))
        with torch.no_grad():
            expected[d] = model(ids).logits[0].numpy()
    # chunks=3, block 12: softmax split over heads, activation over rows, every product in blocks of at most
    # 12 input and output features (the memory-bounded program of `privlm pi measure`): same logits
    for chunks, block in ((1, None), (3, 12)):
        extra = ["--chunks", str(chunks)] + (["--matmul-block", str(block)] if block else [])
        proc = subprocess.run([str(spu_python()), "-m", "privlm.spu.program", *map(str, expected), *extra],
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["mask_value"] == -100.0  # not -1e4 (SPU exp)
        for (d, ref), preset in zip(expected.items(), EXPORT_PRESETS):
            got = np.load(d / f"jax_logits_c{chunks}_b{block}.npy")
            assert got.shape == ref.shape
            assert np.abs(ref).max() > 0.1, preset  # logits of a real size, so 1e-4 is a meaningful bound
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{preset} chunks={chunks} block={block}")


def test_export_materializes_eq8_and_normalizations():
    """1/alpha is folded into the FFN output weights and WN is materialized as torch computes it."""
    from privlm.spu.export import export_model
    cfg = load_config("SM+ScFuFFN", ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.vocab_size=10",
                                     "model.block_size=4", "data.seq_len=4"])
    model = GPT(cfg.model)
    with torch.no_grad():
        model.blocks[0].alpha.fill_(4.0)
        model.blocks[0].beta.fill_(0.5)
    meta, w = export_model(model)
    np.testing.assert_allclose(w["h0.wf"], model.blocks[0].ffn.fc.weight.detach().numpy().T / 4.0, rtol=1e-6)
    assert meta["beta"] == [0.5] and meta["ffn"] == ["fused"] and "h0.w1" not in w
    wn = GPT(load_config("SM+WN(qk)", ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.vocab_size=10",
                                       "model.block_size=4", "data.seq_len=4"]).model)
    _, w2 = export_model(wn)
    a = wn.blocks[0].attn
    v, g = a.q_proj.parametrizations.weight.original1, a.q_proj.parametrizations.weight.original0
    by_hand = (g * v / v.norm(dim=1, keepdim=True)).detach().numpy()  # W = g V / ||V|| per output row
    np.testing.assert_allclose(w2["h0.wqkv"][:, :8], by_hand.T, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
def test_pi_run_sim_agrees_with_plaintext_and_calibrated_profile(tiny_run, tmp_path):
    """sim-mode CHEETAH run: same next token as plaintext, op counts equal to the census, and total bytes
    within 10 % of what a profile calibrated by `privlm pi calibrate` predicts through `privlm cost`."""
    doc = json.loads(_cli("pi", "run", str(tiny_run), "--prompt", PROMPT, "--json").stdout)
    assert doc["top1_agree"] is True
    assert doc["top1_agree_all_positions"] == 1.0
    assert doc["max_logit_err"] < 0.05  # 18-bit fixed point through softmax, LN and GELU
    for key, v in doc["census_check"].items():
        assert v["program"] == v["census"], key
    assert doc["bytes_total"] == doc["bytes_per_party"]["party0_sent"] + doc["bytes_per_party"]["party1_sent"]
    assert set(doc["ops"]) == {"setup", "embedding", "layernorm", "matmul", "softmax", "activation", "head"}
    assert sum(o["bytes"] for o in doc["ops"].values()) <= doc["bytes_total"]
    assert doc["ops"]["softmax"]["bytes"] > 0 and doc["ops"]["activation"]["bytes"] > 0

    profile = tmp_path / "quick.json"
    _cli("pi", "calibrate", "--quick", "--out", str(profile))
    prof = json.loads(profile.read_text())
    assert prof["format"] == "privlm-pi-cost-profile/1" and prof["provenance"]["spu_version"] == "0.9.5"
    cost = json.loads(_cli("cost", str(tiny_run), "--T", str(doc["T"]), "--profile", str(profile),
                           "--format", "json").stdout)
    cost = cost[0] if isinstance(cost, list) else cost
    predicted = cost["comm_gb"] * 1e9
    assert abs(predicted - doc["bytes_total"]) / doc["bytes_total"] < 0.10, (predicted, doc["bytes_total"])


def test_pi_run_two_processes_keeps_weights_and_prompt_apart(tiny_run, tmp_path):
    """2proc over brpc on loopback: correct token, same traffic as the simulator, and neither party process
    received the other's plaintext (command line, files opened, tensors held in the clear)."""
    keep = tmp_path / "keep"
    doc = json.loads(_cli("pi", "run", str(tiny_run), "--prompt", PROMPT, "--mode", "2proc", "--keep", str(keep),
                          "--json").stdout)
    assert doc["mode"] == "2proc" and doc["top1_agree"] is True
    assert doc["bytes_total"] > 30e6  # CHEETAH's OT/HE setup alone is ~34 MB

    weights = str((keep / "export" / "weights.safetensors").resolve())
    ids_file = str((keep / "ids.json").resolve())
    ids = json.loads(Path(ids_file).read_text())
    client = json.loads((keep / "audit_party0.json").read_text())
    server = json.loads((keep / "audit_party1.json").read_text())
    assert weights not in client["opened"] + client["loaded"] and weights not in " ".join(client["argv"])
    assert client["plaintext"] == ["onehot"]
    assert ids_file not in server["opened"] + server["loaded"] and ids_file not in " ".join(server["argv"])
    assert PROMPT not in " ".join(server["argv"]) and "onehot" not in server["plaintext"]
    assert "onehot" in server["received_shares"] and "onehot" not in client["received_shares"]
    assert "wte" in client["received_shares"] and "h0.wqkv" in client["received_shares"]
    assert len(ids) == doc["T"]


# ---------------------------------------------------------------------------------------------------------
def test_export_splits_client_bundle_from_server_weights(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    _cli("pi", "export", str(tiny_run), str(out))
    assert sorted(p.name for p in (out / "client").iterdir()) == ["public.json", "tokenizer.json"]
    assert (out / "server" / "weights.safetensors").is_file()
    meta = json.loads((out / "client" / "public.json").read_text())
    assert meta["weights"]["wte"] == [64, 32]  # names and shapes only: no values on the client side
    assert "not empty" in _cli("pi", "export", str(tiny_run), str(out), check=False).stderr


def test_missing_spu_environment_is_a_clear_error(tiny_run):
    env = {**os.environ, "PRIVLM_SPU_PYTHON": "/nonexistent/python"}
    proc = _cli("pi", "run", str(tiny_run), "--prompt", PROMPT, env=env, check=False)
    assert proc.returncode != 0
    assert "make spu-setup" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_inputs_are_one_line_errors(tiny_run, tmp_path):
    cases = [
        (["pi", "run", str(tiny_run), "--tokens", "1,2,999"], "outside the vocabulary"),
        (["pi", "run", str(tiny_run), "--tokens", "1,x"], "comma-separated integers"),
        (["pi", "run", str(tiny_run), "--tokens", ",".join(["1"] * 17)], "position table"),
        (["pi", "run", str(tmp_path / "nope"), "--prompt", "w1"], "does not exist"),
        (["pi", "run", str(tiny_run), "--prompt", "w1", "--peer", "127.0.0.1:1"], "--mode 2proc"),
        (["pi", "run", str(tiny_run), "--mode", "2proc", "--party", "1"], "--T"),
    ]
    for args, msg in cases:
        proc = _cli(*args, check=False)
        assert proc.returncode != 0, args
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_spu_python_error_names_the_fix(monkeypatch):
    monkeypatch.setenv("PRIVLM_SPU_PYTHON", "/nonexistent/python")
    with pytest.raises(SPUError, match="make spu-setup"):
        spu_python()


def test_committed_measured_profile_is_a_valid_cost_profile():
    """`privlm cost --profile spu-cheetah-measured` works: the calibration output parses in the cost issue's
    format, says where it was measured, and charges the one-hot/logit shares at 2 x 8 bytes per vocab entry."""
    from privlm.pi import census, load_profile, predict
    prof = load_profile("spu-cheetah-measured")
    assert prof.provenance["kind"] == "measured" and prof.provenance["spu_version"] == "0.9.5"
    assert prof.provenance["machine"] and prof.flop_convention == "dense" and prof.final_layernorm == "counted"
    assert set(prof.nonlinear) >= {"softmax", "layernorm", "gelu", "relu"}
    assert prof.per_token["bytes_per_vocab"] == 16.0
    costs = {p: predict(census(p, 128), prof).comm_gb for p in ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN")}
    assert costs["SM+LN+G"] > costs["SM+LN+R"] > costs["SM+ScFuFFN"] > 0
