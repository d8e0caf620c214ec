"""`privlm pi measure` on a Hugging Face config: only the measured blocks and the vocabulary slice are built, and
the measured steps scale to the whole model as the GPT-2 cells do (bench/pi_measure.py's TinyLlama cells)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from privlm.cli import main
from privlm.hfmodel import build_model
from privlm.pi import census
from privlm.spu.calibrate import _measured_hf, measure

REPO = Path(__file__).resolve().parents[1]
TINYLLAMA = REPO / "bench" / "results" / "pi_tinyllama" / "TinyLlama-1.1B"
L, D, H, KV, F, V, T = 3, 32, 4, 2, 48, 256, 8
VM = 64  # the vocabulary slice measured: scaled by V / VM = 4


def tiny_llama(path: Path) -> Path:
    LlamaConfig(num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV,
                intermediate_size=F, vocab_size=V, max_position_embeddings=16, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


def test_only_the_measured_block_and_vocabulary_slice_are_built():
    """TinyLlama-1.1B's config: one block of 22 and 768 of 32000 vocabulary rows, never 1.1 B parameters."""
    shape, model = _measured_hf(str(TINYLLAMA), [], 128, 1, 768)
    assert shape["n_layer"] == 22 and shape["vocab_size"] == 32000 and shape["n_kv_head"] == 4
    assert shape["family"] == "LLaMA" and shape["preset"] == "TinyLlama-1.1B"
    assert len(model.model.layers) == 1
    assert tuple(model.model.embed_tokens.weight.shape) == (768, 2048)
    assert tuple(model.lm_head.weight.shape) == (768, 2048)
    d, kv, ffn = 2048, 4 * 64, 5632
    block = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d  # q, o; k, v; gate, up, down; two RMSNorm gains
    assert sum(p.numel() for p in model.parameters()) == block + 2 * 768 * d + d  # + embedding, head, final norm


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    path = tiny_llama(tmp_path_factory.mktemp("llama") / "tiny")
    doc = measure(str(path), [], T, 1, VM, "cheetah", chunks=1, matmul_block=None)
    return path, doc


@pytest.mark.slow  # one 2PC run of a tiny model (~20-40 s on 2 cores)
def test_measured_steps_scale_to_the_whole_model(measured):
    """One measured block x L and the embedding/head x V/VM give the whole model's census op for op (elements of
    RMSNorm, SiLU, gate product, rotary, softmax; FLOPs of every product), the total is the scaled steps plus the
    logits' share, and the document has every field of a GPT-2 cell."""
    path, doc = measured
    assert (doc["n_layer"], doc["layers_measured"], doc["vocab_size"], doc["vocab_measured"]) == (L, 1, V, VM)
    assert {s["layer"] for s in doc["steps"]} == {None, 0}  # one block built and run

    def scale(s):
        return L if s["layer"] is not None else V / VM if s["census"] in ("embedding", "lm_head") else 1

    full = census(build_model(LlamaConfig.from_pretrained(path)), T)  # the whole model, on the meta device
    for op in ("rmsnorm", "silu", "gate_product", "rotary", "softmax"):
        got = sum(s["elements"] * scale(s) for s in doc["steps"] if s["census"] == op)
        assert got == full.elements(op) > 0, op
    for key in ("attn_proj", "attn_scores", "ffn", "embedding", "lm_head"):
        got = sum(s["flops"] * scale(s) for s in doc["steps"] if s["census"] == key)
        assert got == full.flops[key] > 0, key
    steps = sum((s["send_bytes"] + s["recv_bytes"]) * scale(s) for s in doc["steps"])
    assert doc["share_bytes"] >= T * V * 8  # the logits' share: one 64-bit ring element per position and entry
    assert doc["comm_gb"] * 1e9 == pytest.approx(steps + doc["share_bytes"], rel=1e-12)
    for key in ("ops", "census_ops"):
        assert sum(v["bytes"] for v in doc[key].values()) == pytest.approx(steps, rel=1e-12)
    assert all(doc["census_ops"][op]["bytes"] > 0 for op in ("rmsnorm", "silu", "gate_product", "rotary"))
    gpt2_cell = json.loads((REPO / "bench" / "results" / "pi_gpt2" / "puma_SM+LN+G_T128.json").read_text())
    assert set(gpt2_cell) <= set(doc)


def test_bad_inputs_are_one_line(tmp_path, capsys):
    """Refused before anything is built or any 2PC work starts."""
    path = tiny_llama(tmp_path / "tiny")
    cases = [([str(path), "model.n_layer=2", "--T", "8"], "edit the config.json"),
             ([str(path), "--layers-measured", "4", "--T", "8"], "--layers-measured=4 must be in 1..3"),
             ([str(path), "--T", "17"], "longer than the model's 16 positions")]
    for args, msg in cases:
        capsys.readouterr()
        try:
            code = main(["pi", "measure", *args])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and msg in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
