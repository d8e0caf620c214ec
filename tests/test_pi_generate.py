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


def _neox(layers: int = 2):
    """A tiny random GPT-NeoX: parallel residual, a quarter of each head rotated (rotary_pct 0.25); weights of
    std 0.2 so that greedy choices are not near-ties."""
    import transformers as tf
    cfg = tf.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=POS, initializer_range=0.2)
    assert cfg.use_parallel_residual and cfg.rope_parameters["partial_rotary_factor"] == 0.25
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


HF_KINDS = {"llama": _llama, "gpt2": _gpt2, "neox": _neox}


@pytest.mark.parametrize("kind", ["SM+LN+G", "SM(t)+ScFuFFN", "llama", "gpt2", "neox"])
def test_cached_steps_equal_the_full_forward(kind):
    """Prefill + decode steps over the cache (the modules the traces are made of) give, at every step, the logits
    the unchanged model computes over the whole sequence so far."""
    hf = kind in HF_KINDS
    model = HF_KINDS[kind]() if hf else _privlm(kind)
    tokens, logits = cached_greedy(model, PROMPT, 10)
    seq = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        full = (model(input_ids=seq).logits if hf else model(seq).logits)[0]
    for j, lg in enumerate(logits):
        torch.testing.assert_close(lg, full[len(PROMPT) + j - 1], rtol=1e-4, atol=1e-5)


def _moved(model):
    """The model with every learned value moved (weights, SM(t)'s temperatures, Eq. 8's alpha/beta, leaky
    slopes, LayerNorm gains and biases)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 + 0.05 * torch.rand_like(p))
    return model


def _same_public_other_server(a, b) -> None:
    """Two GenerationTraces of models with different learned values: op graphs and public tensors equal (nothing
    learned is in what the client gets), every server tensor different."""
    for x, y in ((a.prefill, b.prefill), (a.decode, b.decode)):
        assert json.dumps(x.doc) == json.dumps(y.doc) and sorted(x.public) == sorted(y.public)
        assert all((x.public[k] == y.public[k]).all() for k in x.public)
        assert x.server and all(not (x.server[k] == y.server[k]).all() for k in x.server)


@pytest.mark.slow  # traces two models twice each (torch.export): seconds of CPU
def test_traces_name_architecture_only():
    """The decode program's inputs are the ids, three public position inputs and 2L secret cache tensors; its
    outputs the logits and the updated cache; the op graphs and public tensors of two models with different
    learned values are equal (nothing of the weights is in them) and the server's tensors differ."""
    a, b = trace_generation(_privlm("SM+LN+G", 0), 6, 15), trace_generation(_moved(_privlm("SM+LN+G", 1)), 6, 15)
    dec = a.decode.doc
    assert {k: v["kind"] for k, v in dec["inputs"].items()} == {
        "sel": "public", "slot": "public", "bias": "public", "k0": "secret", "v0": "secret", "k1": "secret",
        "v1": "secret"}
    assert dec["inputs"]["k0"]["shape"] == [1, 2, 15, 16] and len(dec["outputs"]) == 1 + 2 * 2
    assert len(a.prefill.doc["outputs"]) == 1 + 2 * 2 and dec["T"] == 1 and a.prefill.doc["T"] == 6
    _same_public_other_server(a, b)


@pytest.mark.slow  # four torch.export traces per model
@pytest.mark.parametrize("preset", ["SM(t)+ScFuFFN", "SM+LR(layer)"])
def test_public_files_hold_no_learned_value(preset):
    """The same for SM(t)'s temperatures, Eq. 8's beta (folded) and a learned leaky slope: none of them is in the
    op graphs or public tensors (what `pi export --max-new-tokens` gives the client)."""
    sizes = ["model.n_layer=1", *SMALL[1:]]
    _same_public_other_server(trace_generation(_privlm(preset, 0, sizes), 6, 9),
                              trace_generation(_moved(_privlm(preset, 0, sizes)), 6, 9))


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


# CHEETAH (privlm's default: HE products, SPU's exp as products on decode-sized tensors) for the privlm family;
# the HF families' prefill and decode programs under SEMI2K, at a fraction of the cost (the same programs and
# kernels under additive sharing; CHEETAH's own paths are covered by the privlm case, the two-process test below
# and tests/test_pi_spu_kernels.py)
@pytest.mark.slow
@pytest.mark.parametrize("kind,new,protocol", [("SM+ScFuFFN", 16, "cheetah"), ("llama", 16, "semi2k"),
                                               ("neox", 5, "semi2k")])
def test_sim_greedy_equals_plaintext_greedy(kind, new, protocol, tmp_path):
    """16 new tokens under 2PC (sim) equal plaintext greedy generation (`privlm sample --temperature 0`
    for privlm runs, transformers' generate(do_sample=False) for LLaMA; 5 tokens for GPT-NeoX); a divergence is
    accepted only at a plaintext near-tie (top-2 gap below 0.01, the order of 18-bit fixed point's logit error
    through softmax)."""
    hf = kind in HF_KINDS
    if hf:
        model = HF_KINDS[kind](layers=1)
        target = tmp_path / kind
        model.save_pretrained(target)
        ref = None
    else:
        target = _run_dir(tmp_path / "run", kind)
        model = _privlm(kind, 0, ONE_LAYER)
        prompt = " ".join(f"w{i}" for i in PROMPT)
        ref = json.loads(_cli("sample", str(target), "--prompt", prompt, "--max-new-tokens", str(new),
                              "--temperature", "0", "--json").stdout)["new_tokens"]
    doc = json.loads(_cli("pi", "generate", str(target), "--tokens", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", str(new), "--protocol", protocol, "--json").stdout)
    assert doc["protocol"] == protocol and doc["greedy"] and doc["capacity"] == len(PROMPT) + new - 1 and len(doc["per_token"]) == new
    plain = doc["plaintext_tokens"]
    if ref is not None:
        assert plain == ref  # the CLI's plaintext reference is `privlm sample --temperature 0`
    else:  # ... and transformers' generate(do_sample=False), whatever the tokens (an EOS included)
        with torch.no_grad():
            hf_ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(PROMPT):].tolist()
        assert plain == hf_ref
    got = doc["new_tokens"]
    if got != plain:
        i = next(j for j in range(new) if got[j] != plain[j])
        margin = _margin(model, PROMPT + plain[:i], hf)
        assert margin < 0.01, (i, margin, got, plain)
    decode = [r for r in doc["per_token"] if r["program"] == "decode"]
    assert all(r["bytes"] > 0 and r["messages"] > 0 for r in doc["per_token"])
    assert doc["per_token"][0]["program"] == "prefill" and len(decode) == new - 1
    assert doc["totals"]["compile_seconds"] > 0


def _no_learned_tensor(bundle: Path, model) -> None:
    """The client bundle holds no file of the server's and no tensor with a value of any learned parameter that
    has more than one value (masks hold 0, 1 and -100; a constant LayerNorm gain at init would match trivially)."""
    from safetensors.torch import load_file

    names = sorted(str(f.relative_to(bundle)) for f in bundle.rglob("*") if f.is_file())
    assert names == ["decode/program.json", "decode/public.safetensors", "prefill/program.json",
                     "prefill/public.safetensors", "tokenizer.json"], names
    learned = [w.detach().flatten() for w in model.state_dict().values() if w.is_floating_point() and w.numel() > 1]
    learned = [w for w in learned if w.unique().numel() > 1]
    assert learned
    for f in bundle.rglob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            assert name not in model.state_dict(), (f, name)
            values = t.detach().float().flatten()
            for w in learned:
                assert not torch.isin(values, w).any(), (f, name)


@pytest.mark.slow
def test_two_processes_keep_cache_weights_and_prompt_apart(tmp_path):
    """The two-machine set-up on loopback, twice with different weights and prompts: `pi export --max-new-tokens 3`
    splits the model; the client runs `pi generate --party 0` from its bundle alone (no learned tensor in it: the
    bundles of the two models are byte for byte the same) and the server `--party 1` from the export's server half
    (first model, 2 of the 3 tokens) or from its run directory (second model, 3 tokens). The tokens equal plaintext
    greedy generation; the client receives only the shares of the token ids it is told (nothing of the logits or the
    cache), the server receives nothing; neither opens the other's files; the shares each party holds of the other's
    inputs do not depend on them."""
    from privlm.spu.launcher import free_ports

    runs, bundles = [], []
    for seed, prompt, new in ((0, "w1 w5 w9 w3", 2), (1, "w2 w6 w10 w4", 3)):
        run = _run_dir(tmp_path / f"run{seed}", "SM+LN+G", seed)
        out = tmp_path / f"export{seed}"
        P = len(prompt.split())
        _cli("pi", "export", str(run), str(out), "--T", str(P), "--max-new-tokens", "3")
        model = _privlm("SM+LN+G", seed, ONE_LAYER)
        _no_learned_tensor(out / "client", model)
        bundles.append({str(f.relative_to(out)): f.read_bytes() for f in (out / "client").rglob("*") if f.is_file()})
        keep_c, keep_s = tmp_path / f"keep{seed}c", tmp_path / f"keep{seed}s"
        peers = [a for port in free_ports(2) for a in ("--peer", f"127.0.0.1:{port}")]
        common = ["pi", "generate", "--mode", "2proc", "--max-new-tokens", str(new), *peers, "--peer-timeout", "60"]
        server_src = [str(out / "server")] if seed == 0 else [str(run), "--T", str(P)]
        server = subprocess.Popen([*PRIVLM, *common, "--party", "1", *server_src, "--keep", str(keep_s)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            client = _cli(*common, "--party", "0", str(out / "client"), "--prompt", prompt, "--keep", str(keep_c),
                          "--json")
            s_err = server.communicate(timeout=300)[1]
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert server.returncode == 0, s_err
        doc = json.loads(client.stdout)
        ids = [int(w[1:]) for w in prompt.split()]
        with torch.no_grad():
            plain = model.generate(torch.tensor([ids]), new, temperature=0)[0, P:].tolist()
        assert doc["mode"] == "2proc" and doc["new_tokens"] == plain and "agree" not in doc
        assert doc["capacity"] == P + 2 and doc["prompt_tokens"] == ids  # the bundle's tokenizer, its programs' C
        client = json.loads((keep_c / "audit_party0.json").read_text())
        server = json.loads((keep_s / "audit_party1.json").read_text())
        assert client["received_shares"] == ["token"] * new and server["received_shares"] == []
        assert client["plaintext"] == ["onehot"] and "onehot" not in server["plaintext"]
        ids_file = str((keep_c / "ids.json").resolve())
        assert ids_file not in server["opened"] + server["loaded"] and prompt not in " ".join(server["argv"])
        held = [out / "server", run] + ([keep_s / "export"] if seed == 1 else [])
        secret = [str(f.resolve()) for d in held for f in d.rglob("*") if f.is_file()]
        assert any(f.endswith("decode/server.safetensors") for f in secret)
        seen = " ".join(client["opened"] + client["loaded"] + client["argv"])
        assert not [f for f in secret if f in seen]
        # the client's share of the cache (keys of layer 0, prompt rows) read as fixed point is nothing like the
        # keys: ring elements spread over +-2^45, not values of order 1 (the masked share of a secret)
        with torch.no_grad():
            keys = model.run_with_cache(torch.tensor([ids]), names="hook_k")[1].k(0)[0]  # [H, P, dk]
        C = doc["capacity"]
        share = torch.tensor(client["cache_share_sample"]["input:k0"], dtype=torch.float64) / 2 ** 18
        H, dk = keys.shape[0], keys.shape[2]
        rows = share[: H * C * dk].view(H, C, dk)[:, :P] if share.numel() >= H * C * dk else None
        sample = share if rows is None else rows.reshape(-1)
        assert (sample.abs() < 1e3).float().mean() < 0.01
        if rows is not None:
            assert (rows - keys.double()).abs().median() > 1e6
        runs.append((client["share_digests"], server["share_digests"]))
    assert bundles[0] == bundles[1]  # nothing of the weights in the client's files
    (c1, s1), (c2, s2) = runs
    weights = [k for k in c1 if k.startswith("server:")]
    assert weights and all(c1[k] == c2[k] for k in weights)  # the client's shares of the weights: data-independent
    assert any(s1[k] != s2[k] for k in weights)
    assert s1["onehot"] == s2["onehot"] and c1["onehot"] != c2["onehot"]
