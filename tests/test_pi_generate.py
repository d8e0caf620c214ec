"""privlm pi generate: the prefill/decode programs with a KV cache (privlm.generate_trace) against the model's own
forward, greedy 2PC generation against plaintext greedy generation, the privacy split of a two-process run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from privlm.config import load_config, to_yaml
from privlm.generate_trace import cached_greedy, trace_generation
from privlm.model import GPT

REPO = Path(__file__).resolve().parents[1]
PRIVLM = [sys.executable, "-m", "privlm.cli"]
from tiny_run import word_tokenizer  # noqa: E402

V, POS = 64, 24
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", f"model.vocab_size={V}", f"model.block_size={POS}",
         f"data.seq_len={POS}", "model.init_std=0.2"]
PROMPT = [3, 17, 9, 40, 2, 33]


def _privlm(preset: str, seed: int = 0, sizes: list[str] = SMALL) -> GPT:
    torch.manual_seed(seed)
    return GPT(load_config(preset, sizes).model).eval()


def _llama(layers: int = 2):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, max_position_embeddings=POS,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _gpt2():
    import transformers as tf
    cfg = tf.GPT2Config(vocab_size=V, n_positions=POS, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _cli(*args, check=True):
    proc = subprocess.run([*PRIVLM, *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"privlm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("kind", ["SM+LN+G", "SM(t)+ScFuFFN", "llama", "gpt2"])
def test_cached_steps_equal_the_full_forward(kind):
    """Prefill + decode steps over the cache (the modules the traces are made of) give, at every step, the logits
    the unchanged model computes over the whole sequence so far."""
    hf = kind in ("llama", "gpt2")
    model = {"llama": _llama, "gpt2": _gpt2}[kind]() if hf else _privlm(kind)
    tokens, logits = cached_greedy(model, PROMPT, 10)
    seq = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        full = (model(input_ids=seq).logits if hf else model(seq).logits)[0]
    for j, lg in enumerate(logits):
        torch.testing.assert_close(lg, full[len(PROMPT) + j - 1], rtol=1e-4, atol=1e-5)


def test_traces_name_architecture_only():
    """The decode program's inputs are the ids, three public position inputs and 2L secret cache tensors; its
    outputs the logits and the updated cache; the op graphs of two differently initialized models are equal
    (nothing of the weights is in them) and the server's tensors differ."""
    a, b = trace_generation(_privlm("SM+LN+G", 0), 6, 15), trace_generation(_privlm("SM+LN+G", 1), 6, 15)
    dec = a.decode.doc
    assert {k: v["kind"] for k, v in dec["inputs"].items()} == {
        "sel": "public", "slot": "public", "bias": "public", "k0": "secret", "v0": "secret", "k1": "secret",
        "v1": "secret"}
    assert dec["inputs"]["k0"]["shape"] == [1, 2, 15, 16] and len(dec["outputs"]) == 1 + 2 * 2
    assert len(a.prefill.doc["outputs"]) == 1 + 2 * 2 and dec["T"] == 1 and a.prefill.doc["T"] == 6
    for x, y in ((a.prefill, b.prefill), (a.decode, b.decode)):
        assert json.dumps(x.doc) == json.dumps(y.doc)
        assert any(not (x.server[k] == y.server[k]).all() for k in x.server)


# ---------------------------------------------------------------------------------------------------------
ONE_LAYER = ["model.n_layer=1", *SMALL[1:]]  # the 2PC runs: one block keeps them short


def _run_dir(path: Path, preset: str, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    cfg = load_config(preset, ONE_LAYER)
    (path / "config.yaml").write_text(to_yaml(cfg))
    save_model(_privlm(preset, seed, ONE_LAYER), str(path / "model.safetensors"))
    word_tokenizer(path / "tokenizer.json")
    return path


def _margin(model, prefix: list[int], hf: bool) -> float:
    """The plaintext top-2 logit gap after ``prefix`` (how near a tie the next token is)."""
    with torch.no_grad():
        lg = (model(input_ids=torch.tensor([prefix])).logits if hf else model(torch.tensor([prefix])).logits)[0, -1]
    top = lg.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["SM+ScFuFFN", "llama"])
def test_sim_greedy_equals_plaintext_greedy(kind, tmp_path):
    """16 new tokens under 2PC (sim, CHEETAH) equal plaintext greedy generation (`privlm sample --temperature 0`
    for privlm runs, transformers' generate(do_sample=False) for LLaMA); a divergence is accepted only at a
    plaintext near-tie (top-2 gap below 0.01, the order of 18-bit fixed point's logit error through softmax)."""
    if kind == "llama":
        model = _llama(layers=1)
        target = tmp_path / "llama"
        model.save_pretrained(target)
        ref = None
    else:
        target = _run_dir(tmp_path / "run", kind)
        model = _privlm(kind, 0, ONE_LAYER)
        prompt = " ".join(f"w{i}" for i in PROMPT)
        ref = json.loads(_cli("sample", str(target), "--prompt", prompt, "--max-new-tokens", "16", "--temperature",
                              "0", "--json").stdout)["new_tokens"]
    doc = json.loads(_cli("pi", "generate", str(target), "--tokens", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", "16", "--json").stdout)
    assert doc["greedy"] and doc["capacity"] == len(PROMPT) + 15 and len(doc["per_token"]) == 16
    plain = doc["plaintext_tokens"]
    if ref is not None:
        assert plain == ref  # the CLI's plaintext reference is `privlm sample --temperature 0`
    got = doc["new_tokens"]
    if got != plain:
        i = next(j for j in range(16) if got[j] != plain[j])
        margin = _margin(model, PROMPT + plain[:i], kind == "llama")
        assert margin < 0.01, (i, margin, got, plain)
    decode = [r for r in doc["per_token"] if r["program"] == "decode"]
    assert all(r["bytes"] > 0 and r["messages"] > 0 for r in doc["per_token"])
    assert doc["per_token"][0]["program"] == "prefill" and len(decode) == 15
    assert doc["totals"]["compile_seconds"] > 0


@pytest.mark.slow
def test_two_processes_keep_cache_weights_and_prompt_apart(tmp_path):
    """2proc over loopback, twice with different weights and prompts: the client receives only the shares of the
    token ids it is told (nothing of the logits or the cache), the server receives nothing; neither opens the
    other's files; the shares each party holds of the other's inputs do not depend on them."""
    runs = []
    for seed, prompt in ((0, "w1 w5 w9 w3"), (1, "w2 w6 w10 w4")):
        run = _run_dir(tmp_path / f"run{seed}", "SM+LN+G", seed)
        keep = tmp_path / f"keep{seed}"
        doc = json.loads(_cli("pi", "generate", str(run), "--prompt", prompt, "--max-new-tokens", "2", "--mode",
                              "2proc", "--keep", str(keep), "--json").stdout)
        assert doc["mode"] == "2proc" and doc["agree"] is True
        client = json.loads((keep / "audit_party0.json").read_text())
        server = json.loads((keep / "audit_party1.json").read_text())
        assert client["received_shares"] == ["token"] * 2 and server["received_shares"] == []
        assert client["plaintext"] == ["onehot"] and "onehot" not in server["plaintext"]
        ids_file = str((keep / "ids.json").resolve())
        assert ids_file not in server["opened"] + server["loaded"] and prompt not in " ".join(server["argv"])
        for key in ("prefill", "decode"):
            w = str((keep / "export" / key / "server.safetensors").resolve())
            assert w not in client["opened"] + client["loaded"] and w not in " ".join(client["argv"])
        # the client's share of the cache (keys of layer 0, prompt rows) read as fixed point is nothing like the
        # keys: ring elements spread over +-2^45, not values of order 1 (the masked share of a secret)
        P = len(prompt.split())
        with torch.no_grad():
            keys = _privlm("SM+LN+G", seed, ONE_LAYER).run_with_cache(
                torch.tensor([[int(w[1:]) for w in prompt.split()]]), names="hook_k")[1].k(0)[0]  # [H, P, dk]
        C = P + 1
        share = torch.tensor(client["cache_share_sample"]["input:k0"], dtype=torch.float64) / 2 ** 18
        H, dk = keys.shape[0], keys.shape[2]
        rows = share[: H * C * dk].view(H, C, dk)[:, :P] if share.numel() >= H * C * dk else None
        sample = share if rows is None else rows.reshape(-1)
        assert (sample.abs() < 1e3).float().mean() < 0.01
        if rows is not None:
            assert (rows - keys.double()).abs().median() > 1e6
        runs.append((client["share_digests"], server["share_digests"]))
    (c1, s1), (c2, s2) = runs
    weights = [k for k in c1 if k.startswith("server:")]
    assert weights and all(c1[k] == c2[k] for k in weights)  # the client's shares of the weights: data-independent
    assert any(s1[k] != s2[k] for k in weights)
    assert s1["onehot"] == s2["onehot"] and c1["onehot"] != c2["onehot"]
