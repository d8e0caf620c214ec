"""Hugging Face causal LMs in `privlm entropy`, `privlm cost`, `privlm inspect`, and `privlm export-hf`.

Random tiny GPT-2, GPT-NeoX and LLaMA models built from configs and written with save_pretrained (no
download); a byte-level BPE trained on a few lines serves as their tokenizer.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig,
                          PreTrainedTokenizerFast)

from privlm.cli import main
from privlm.config import DataConfig, load_config, to_dict
from privlm.data import prepare_data
from privlm.data.tokenizer import train_bpe
from privlm.entropy.cli import entropy_report
from privlm.entropy.hf import hf_entropy
from privlm.hfexport import export_hf
from privlm.hfmodel import build_model, load_model
from privlm.model import GPT
from privlm.pi import census, predict

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n")
V, L, D, T = 300, 2, 16, 16
CONFIGS = {  # initializer_range 0.3: attention far from uniform, so the entropies differ by head
    "gpt2": GPT2Config(n_layer=L, n_head=2, n_embd=D, vocab_size=V, n_positions=64, initializer_range=0.3,
                       bos_token_id=0, eos_token_id=0),
    "neox": GPTNeoXConfig(num_hidden_layers=L, num_attention_heads=2, hidden_size=D, intermediate_size=64,
                          vocab_size=V, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0,
                          eos_token_id=0),
    "llama": LlamaConfig(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, hidden_size=D,
                         intermediate_size=40, vocab_size=V, max_position_embeddings=64, initializer_range=0.3,
                         bos_token_id=0, eos_token_id=0),
}


def _tokenizer():
    return train_bpe([TEXT * 3, TEXT.upper()], V)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="<|endoftext|>")
    out = {}
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    data = root / "data"
    data.mkdir()
    for i in range(3):
        (data / f"f{i}.py").write_text((TEXT.replace("add", f"add{i}") + f"# file {i}\n") * 12)
    out["data"] = f"files:{data}/*.py"
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVLM_CACHE", str(tmp_path / "cache"))


# --- census: hand counts per family ----------------------------------------------------------
def _ops(c):
    return {(o.op, o.where): (o.count, o.shape) for o in c.ops}


def test_llama_census_hand_counts(hf_dirs):
    c = census(str(hf_dirs["llama"]), T)
    H, Hkv, hd, I = 4, 2, D // 4, 40
    assert _ops(c) == {("softmax", "attention"): (L * H, (T, T)),
                       ("rmsnorm", "block"): (2 * L, (T, D)), ("rmsnorm", "final"): (1, (T, D)),
                       ("silu", "ffn"): (L, (T, I)), ("gate_product", "ffn"): (L, (T, I)),
                       ("rotary", "attention"): (L, (T, (H + Hkv) * hd))}
    assert c.flops == {"attn_proj": L * 2 * T * (D * D + 2 * D * Hkv * hd + D * D),  # Q, K, V (GQA), O
                       "attn_scores": L * 2 * 2 * T * T * H * hd, "ffn": L * 2 * T * 3 * D * I,
                       "lm_head": 2 * T * D * V, "embedding": 2 * T * V * D}
    assert c.n_kv_head == Hkv and c.nonlinear_label() == (
        f"SM:8×R^{{{T}×{T}}}, RMS:4×R^{{{T}×{D}}}, SiLU:2×R^{{{T}×40}}, ⊙:2×R^{{{T}×40}}")
    assert any("untied" in n for n in c.notes) and any("grouped-query" in n for n in c.notes)


def test_neox_census_hand_counts(hf_dirs):
    c = census(str(hf_dirs["neox"]), T)
    H, hd = 2, D // 2
    rot = int(hd * 0.25)  # GPT-NeoX's default rotary_pct: a quarter of each head is rotated
    assert _ops(c) == {("softmax", "attention"): (L * H, (T, T)),
                       ("layernorm", "block"): (2 * L, (T, D)), ("layernorm", "final"): (1, (T, D)),
                       ("gelu", "ffn"): (L, (T, 64)), ("rotary", "attention"): (L, (T, 2 * H * rot))}
    assert c.flops["ffn"] == L * 2 * T * 2 * D * 64 and c.flops["attn_proj"] == L * 2 * T * 4 * D * D


def test_gpt2_census_equals_privlm_baseline(hf_dirs):
    """HF's GPT-2 and privlm's SM+LN+G are the same architecture: two independent module trees, one census."""
    ours = census(load_config("SM+LN+G", [f"model.n_layer={L}", "model.n_head=2", f"model.n_embd={D}",
                                          f"model.vocab_size={V}", "model.block_size=64", "data.seq_len=64"]), T)
    theirs = census(str(hf_dirs["gpt2"]), T)
    assert theirs.ops == ours.ops and theirs.flops == ours.flops
    assert predict(theirs, "paper-fit").comm_gb == pytest.approx(predict(ours, "paper-fit").comm_gb, rel=1e-12)


@pytest.mark.parametrize("config_class", ["Qwen2Config", "MistralConfig"])
def test_llama_style_families_count_as_llama(config_class):
    import transformers

    sizes = dict(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, hidden_size=D,
                 intermediate_size=40, vocab_size=V, max_position_embeddings=64)
    other = census(build_model(getattr(transformers, config_class)(**sizes)), T)
    llama = census(build_model(LlamaConfig(**sizes)), T)
    assert other.ops == llama.ops and other.flops == llama.flops


def test_census_walks_a_loaded_model(hf_dirs):
    loaded = load_model(str(hf_dirs["llama"])).model
    assert census(loaded, T).ops == census(str(hf_dirs["llama"]), T).ops


# --- cost: unknown ops are reported, never zero ----------------------------------------------
def test_cost_of_llama_reports_unknown_ops(hf_dirs):
    c = census(str(hf_dirs["llama"]), T)
    cost = predict(c, "paper-fit", unknown="report")
    assert not cost.complete and sorted(cost.unknown) == ["gate_product", "rotary"]
    assert cost.breakdown["gate_product"] == {"gb": None, "min": None}
    ln = json.loads(Path("src/privlm/pi/profiles/paper-fit.json").read_text())["nonlinear"]["layernorm"]
    assert cost.breakdown["rmsnorm"]["gb"] == pytest.approx(2 * L * T * D * ln["bytes_per_element"] / 1e9)
    known = sum(v["gb"] for v in cost.breakdown.values() if v["gb"] is not None)
    assert cost.comm_gb == pytest.approx(known)
    assert any("lower bounds" in w for w in cost.warnings)
    with pytest.raises(Exception, match="no cost for nonlinear op 'gate_product'"):
        predict(c, "paper-fit")  # the library default stays strict


def test_cost_cli_on_hf_models(hf_dirs, capsys):
    assert main(["cost", str(hf_dirs["llama"]), str(hf_dirs["gpt2"]), "--T", str(T), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in rows] == ["llama", "gpt2"]
    assert rows[0]["complete"] is False and rows[1]["complete"] is True and rows[0]["n_kv_head"] == 2
    # the paper-fit profile has no RMSNorm/SiLU/gate/rotary figures: a lower bound; the measured one has them all
    assert main(["cost", str(hf_dirs["llama"]), "--T", str(T)]) == 0
    out = capsys.readouterr().out
    assert "≥" in out and "no figure for" in out and "RoPE" not in out.splitlines()[2]
    assert main(["cost", str(hf_dirs["llama"]), "--T", str(T), "--profile", "spu-cheetah-measured",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["complete"] is True


# --- entropy -----------------------------------------------------------------------------------
def _reference_head_entropy(model, ids: torch.Tensor) -> np.ndarray:
    """Eq. 7 from the attention probabilities, in numpy: -sum p log p per query, mean over queries/batch."""
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    out = []
    for a in att:
        p = a.double().numpy()
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        out.append((-plogp.sum(-1)).mean(axis=(0, 2)))
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_entropy_report_equals_reference(hf_dirs, family, tmp_path):
    rep = entropy_report(str(hf_dirs[family]), data_source=hf_dirs["data"], T=T, device="cpu", batch_size=4)
    tok_dir = str(hf_dirs[family])
    chunks = prepare_data(DataConfig(source=hf_dirs["data"], valid_fraction=0.0, tokenizer=tok_dir, seq_len=T)).train
    ids = torch.from_numpy(np.asarray(chunks, dtype=np.int64))
    ref = _reference_head_entropy(load_model(tok_dir).model, ids)
    assert rep["sequences"] == len(chunks) > 4 and rep["seq_len"] == T
    np.testing.assert_allclose(np.array(rep["head_entropy"]), ref, rtol=1e-5)
    assert np.ptp(ref) > 0.1  # heads differ: not a uniform-attention coincidence
    assert rep["causal_max"] == pytest.approx(sum(math.log(i) for i in range(1, T + 1)) / T)


def test_default_measurement_set_is_a_runs_validation_split():
    """The HF entropy default builds stdlib with one training document; the hash split leaves the
    validation split exactly that of a privlm run trained on stdlib."""
    from privlm.data.corpus import build_corpus

    full, one = build_corpus(DataConfig()), build_corpus(DataConfig(max_train_docs=1))
    assert one.train.n_docs == 1 and one.valid.n_docs == full.valid.n_docs > 10
    assert one.valid.sha256 == full.valid.sha256


def test_hf_entropy_shapes(hf_dirs):
    model = load_model(str(hf_dirs["llama"])).model
    ent, nans = hf_entropy(model, torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(0)))
    assert ent.shape == (L, 3, 4, 8) and nans.tolist() == [0, 0]
    # the first query sees one key: entropy 0, up to the fused path's float32 rounding of LSE - q'.k (~1e-7 |z|)
    assert torch.allclose(ent[:, :, :, 0], torch.zeros(()), atol=1e-5)


@pytest.mark.slow
def test_entropy_cli_json(hf_dirs, capsys):
    assert main(["entropy", str(hf_dirs["neox"]), "--data", hf_dirs["data"], "--T", str(T), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["head_entropy"]) == L and "overload" in rep and rep["preset"].startswith("GPT-NeoX")
    assert main(["entropy", str(hf_dirs["neox"]), "--data", hf_dirs["data"], "--T", str(T)]) == 0
    assert "entropic overload" in capsys.readouterr().out


# --- inspect -------------------------------------------------------------------------------------
def test_inspect_hf(hf_dirs, capsys):
    assert main(["inspect", str(hf_dirs["llama"]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    real = AutoModelForCausalLM.from_pretrained(str(hf_dirs["llama"]))
    assert rep["parameters"]["total"] == real.num_parameters()
    assert rep["gated_mlp"] and rep["rotary_dims"] == D // 4 and rep["shape"]["n_kv_head"] == 2
    assert main(["inspect", str(hf_dirs["gpt2"])]) == 0
    assert "tied LM head" in capsys.readouterr().out


# --- bad input: one line, exit != 0 -------------------------------------------------------------
def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and match in err and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs(hf_dirs, tmp_path, capsys, monkeypatch):
    not_model = tmp_path / "notes"
    not_model.mkdir()
    (not_model / "readme.txt").write_text("hello")
    for cmd in ("entropy", "cost", "inspect"):
        _one_line_error(capsys, [cmd, str(not_model)], "neither a privlm run directory (no config.yaml) nor a Hugging")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    for cmd in ("entropy", "cost", "inspect"):
        err = _one_line_error(capsys, [cmd, str(bert)], "unsupported architecture 'bert'")
        assert "llama (LLaMA)" in err and "gpt_neox (GPT-NeoX)" in err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in hf_dirs["llama"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # the header is checked against the file before the library reads it: the truncation is named
    _one_line_error(capsys, ["entropy", str(corrupt), "--data", hf_dirs["data"]], "outside the file's")
    weights.unlink()
    _one_line_error(capsys, ["entropy", str(corrupt), "--data", hf_dirs["data"]], "no *.safetensors")

    _one_line_error(capsys, ["entropy", str(hf_dirs["gpt2"]), "--T", "65"], "longer than the model's 64 positions")
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_eos / f).write_bytes((hf_dirs["gpt2"] / f).read_bytes())
    tok = _tokenizer()
    tok = type(tok).from_str(tok.to_str().replace("<|endoftext|>", "<|end|>"))
    tok.save(str(no_eos / "tokenizer.json"))
    _one_line_error(capsys, ["entropy", str(no_eos), "--data", hf_dirs["data"], "--T", "8"], "no end-of-text token")
    _one_line_error(capsys, ["cost", str(hf_dirs["gpt2"]), "model.n_layer=3"], "overrides")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(capsys, ["cost", "hf:privlm-tests/no-such-model"], "not in the local cache")


@pytest.mark.slow
def test_hub_id_loads_from_the_local_cache(hf_dirs, tmp_path):
    """hf:<id> resolves through huggingface_hub's cache layout (refs/main -> snapshots/<commit>)."""
    repo = tmp_path / "hub" / "models--tiny--llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in hf_dirs["llama"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "privlm.cli", "cost", "hf:tiny/llama", "--T", str(T),
                          "--format", "json"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)[0]
    assert row["arch"] == "hf:tiny/llama" and row["n_kv_head"] == 2


# --- export-hf -------------------------------------------------------------------------------------
def _run_dir(root: Path, preset: str) -> tuple[Path, GPT]:
    run = root / preset.replace("(", "_").replace(")", "_").replace("+", "_")
    run.mkdir()
    _tokenizer().save(str(run / "tokenizer.json"))
    cfg = load_config(preset, ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.block_size=32",
                               "data.seq_len=32", f"model.vocab_size={V}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # move the scalars off their init so a dropped one would show in the logits
        for name, p in model.named_parameters():
            if any(k in name for k in ("temperature", "alpha", "beta", "slope")):
                p.add_(0.2 * torch.randn_like(p))
    save_model(model, str(run / "model.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return run, model.eval()


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN", "SM+LR", "SM+WN(qk+ffn)", "SM+ScFFN^i1"])
def test_export_round_trip(tmp_path, preset):
    run, model = _run_dir(tmp_path, preset)
    out = tmp_path / "export"
    info = export_hf(run, out)
    baseline = preset == "SM+LN+G"
    assert info["trust_remote_code"] is not baseline
    assert (out / "modeling_privlm.py").is_file() is not baseline
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=not baseline).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if baseline else "PrivlmForCausalLM")
    idx = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx).logits, hf(input_ids=idx).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXT)["input_ids"] == _tokenizer().encode(TEXT).ids
    if baseline:  # the exported GPT-2 measured by the HF path = privlm's in-attention entropy
        rep_ids = idx[:, :16]
        ent_hf = hf_entropy(load_model(str(out)).model, rep_ids)[0]
        with torch.no_grad():
            ent_ours = model(rep_ids, output_entropy=True).entropy
        assert torch.allclose(ent_hf, ent_ours, atol=1e-5)


def test_export_never_overwrites(tmp_path, capsys):
    run, _ = _run_dir(tmp_path, "SM+ScFuFFN")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(capsys, ["export-hf", str(run), str(out)], "not an empty directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export-hf", str(run), str(tmp_path / "fresh")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    _one_line_error(capsys, ["cost", str(tmp_path / "fresh")], "exported with export-hf")
    assert not list(tmp_path.glob(".fresh.*"))  # no temporary left behind
