"""Pure-JAX forward pass of an exported privlm model, as the list of steps the 2PC program executes.

The forward pass is cut into one `Step` per op of the census (embedding, LayerNorm, the attention matmuls,
softmax, the FFN activation, the FFN matmuls, the LM head). The plaintext forward (`forward`) and the
2PC run (`privlm.spu.party`) execute exactly the same step functions in the same order; under SPU each
step is its own compiled executable, so the link counters between two steps measure that op alone and the
per-op breakdown needs no guessing.

Runs in the SPU environment: imports numpy and jax only (no torch).

Public vs secret (see docs/pi-measured.md): every matrix and vector of the model is secret (the server
secret-shares it). The few scalars that the census treats as free public rescalings are compiled into
the program and so known to both parties: Eq. 8's beta, the SM(t) temperatures and the leaky-ReLU slopes.
Eq. 8's 1/alpha is folded into the FFN output weights at export time, so alpha stays secret.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

EXPORT_FORMAT = "privlm-spu-export/1"
# Causal-mask constant. SPU's fixed-point exp evaluates exp(x) as (1 + x/2^n)^(2^n) and breaks for
# x far below -2^(n+1) (n = 8 by default: about -512); a mask of -1e4 therefore produced garbage
# attention. -100 is far enough below any real logit to give the masked keys exp(-100) ≈ 4e-44 weight
# (exactly 0 in float32 and in 18-bit fixed point) while staying in the range SPU's exp handles.
MASK_VALUE = -100.0

# breakdown kinds reported by `privlm pi run`, in display order
KINDS: tuple[str, ...] = ("setup", "embedding", "layernorm", "matmul", "softmax", "activation", "head")


@dataclass
class Step:
    """One op of the forward pass: ``outputs = fn(*inputs)`` over named tensors.

    kind: breakdown kind (one of KINDS). census: the census entry it is charged to: a nonlinear op type
    (softmax, layernorm, gelu, relu, leaky_relu) or a FLOPs key (attn_proj, attn_scores, ffn, embedding,
    lm_head). elements: elements the nonlinear op evaluates (0 for matmuls); flops: 2·multiply-adds.
    """

    name: str
    kind: str
    census: str
    fn: Callable
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    elements: int = 0
    flops: int = 0
    layer: Optional[int] = None


@dataclass
class Program:
    meta: dict
    T: int
    steps: list[Step]
    client_inputs: tuple[str, ...] = ("onehot",)
    server_inputs: tuple[str, ...] = field(default_factory=tuple)
    output: str = "logits"


# --------------------------------------------------------------------------------------------------
# the ops (each one paper equation / one census op)
def layer_norm(x, g, b, eps: float):
    """LayerNorm over the last axis (biased variance, as torch.nn.LayerNorm)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * g
    return y if b is None else y + b


def activation_fn(name: str, slope: Optional[float]) -> Callable:
    """The FFN nonlinearity of Eq. 4: GELU (tanh, GPT-2's), exact GELU, ReLU or leaky ReLU."""
    if name == "gelu":
        return lambda u: jax.nn.gelu(u, approximate=True)
    if name == "gelu_erf":
        return lambda u: jax.nn.gelu(u, approximate=False)
    if name == "relu":
        return jax.nn.relu
    if name == "leaky_relu":
        return lambda u: jnp.where(u >= 0, u, u * slope)
    raise ValueError(f"activation '{name}' has no nonlinear op (identity FFNs have no activation step)")


def causal_mask(T: int) -> np.ndarray:
    """M of Eq. 2 as a public boolean matrix: key j is visible to query i iff j <= i."""
    return np.tril(np.ones((T, T), dtype=bool))


def attention_logits(q, k, inv_temperature: Optional[np.ndarray]):
    """Eq. 2 logits q k^T / sqrt(d_k), divided by SM(t)'s t_i per head and query, causally masked.

    q, k: [H, T, d_k]; inv_temperature: public [H, T] (1/t) or None. The mask replaces the hidden logits
    with MASK_VALUE (see its comment) instead of -inf, which fixed point cannot represent.
    """
    T, dk = q.shape[1], q.shape[2]
    s = jnp.einsum("htd,hsd->hts", q, k) * (1.0 / math.sqrt(dk))
    if inv_temperature is not None:
        s = s * inv_temperature[:, :, None]
    return jnp.where(causal_mask(T)[None], s, MASK_VALUE)


def softmax(s):
    """Row softmax of Eq. 2 (max-subtracted, as every 2PC framework evaluates it)."""
    return jax.nn.softmax(s, axis=-1)


def scaled_ffn_residual(x_sa, ffn_out, beta: float):
    """Eq. 8: X_out = beta·X_SA + (1/alpha)·FFN(X_SA); 1/alpha is already folded into ffn_out's weights."""
    return beta * x_sa + ffn_out


# --------------------------------------------------------------------------------------------------
def load_meta(path: Path | str) -> dict:
    meta = json.loads(Path(path).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a privlm SPU export (format {meta.get('format')!r}, "
                         f"expected {EXPORT_FORMAT!r})")
    return meta


def load_weights(path: Path | str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}


def build_program(meta: dict, T: int, head: str = "all") -> Program:
    """The step list of a T-token forward pass of the exported model ``meta``.

    head: "all" computes the logits of every position (what the census counts and what the paper's
    one-token-after-T-prompt measurement includes); "last" only the next-token logits.
    """
    if not 1 <= T <= meta["block_size"]:
        raise ValueError(f"T={T} must be in 1..{meta['block_size']} (the model's position table)")
    if head not in ("all", "last"):
        raise ValueError(f"head='{head}' must be 'all' or 'last'")
    d, H, V, L = meta["n_embd"], meta["n_head"], meta["vocab_size"], meta["n_layer"]
    dk = d // H
    eps = float(meta["layer_norm_eps"])
    has = set(meta["weights"])
    steps: list[Step] = []

    def opt(name):  # optional tensors (biases, LN shifts) are passed as None when absent
        return name if name in has else None

    def add(name, kind, census, fn, inputs, outputs, elements=0, flops=0, layer=None):
        present = tuple(i for i in inputs if i is not None)
        mask = tuple(i is not None for i in inputs)

        def call(*args, _fn=fn, _mask=mask):
            it = iter(args)
            full = [next(it) if m else None for m in _mask]
            return _fn(*full)
        steps.append(Step(name, kind, census, call, present, tuple(outputs), elements, flops, layer))

    def embed(onehot, wte, wpe):
        # secret token ids enter as a one-hot [T, V] matrix: the lookup becomes a [T,V]x[V,d] product
        return onehot @ wte + wpe

    add("embedding", "embedding", "embedding", embed, ("onehot", "wte", "wpe"), ("x",), flops=2 * T * V * d)

    def linear(x, w, b):
        y = x @ w
        return y if b is None else y + b

    for i in range(L):
        p = f"h{i}."
        x = "x"
        h = x
        if meta["norm"] == "layernorm":
            add(p + "ln1", "layernorm", "layernorm", lambda x, g, b: layer_norm(x, g, b, eps),
                (x, p + "ln1.g", opt(p + "ln1.b")), (p + "h1",), elements=T * d, layer=i)
            h = p + "h1"

        def qkv(h, w, b):
            y = linear(h, w, b).reshape(T, 3, H, dk).transpose(1, 2, 0, 3)  # [3, H, T, dk]
            return y[0], y[1], y[2]
        add(p + "qkv", "matmul", "attn_proj", qkv, (h, p + "wqkv", opt(p + "bqkv")),
            (p + "q", p + "k", p + "v"), flops=2 * T * d * 3 * d, layer=i)

        temp = meta["temperature"][i] if meta.get("temperature") is not None else None
        inv_t = None if temp is None else (1.0 / np.asarray(temp, np.float32)[:, :T])
        add(p + "scores", "matmul", "attn_scores", lambda q, k, _t=inv_t: attention_logits(q, k, _t),
            (p + "q", p + "k"), (p + "s",), flops=2 * H * T * T * dk, layer=i)
        add(p + "softmax", "softmax", "softmax", softmax, (p + "s",), (p + "a",), elements=H * T * T, layer=i)
        add(p + "av", "matmul", "attn_scores", lambda a, v: jnp.einsum("hts,hsd->thd", a, v).reshape(T, d),
            (p + "a", p + "v"), (p + "y",), flops=2 * H * T * T * dk, layer=i)
        add(p + "o_proj", "matmul", "attn_proj", lambda x, y, w, b: x + linear(y, w, b),
            (x, p + "y", p + "wo", opt(p + "bo")), ("x",), flops=2 * T * d * d, layer=i)

        ffn = meta["ffn"][i]
        if ffn is None:  # AERO's pruned blocks: attention only
            continue
        h = "x"
        if meta["norm"] == "layernorm":
            add(p + "ln2", "layernorm", "layernorm", lambda x, g, b: layer_norm(x, g, b, eps),
                ("x", p + "ln2.g", opt(p + "ln2.b")), (p + "h2",), elements=T * d, layer=i)
            h = p + "h2"
        beta = meta["beta"][i] if meta.get("beta") is not None else None

        def residual(x, f, _beta=beta):
            return x + f if _beta is None else scaled_ffn_residual(x, f, _beta)
        if ffn == "fused":
            add(p + "ffn", "matmul", "ffn", lambda x, h, w, b, _r=residual: _r(x, linear(h, w, b)),
                ("x", h, p + "wf", opt(p + "bf")), ("x",), flops=2 * T * d * d, layer=i)
            continue
        width = meta["ffn_width"]
        add(p + "fc_in", "matmul", "ffn", linear, (h, p + "w1", opt(p + "b1")), (p + "u",),
            flops=2 * T * d * width, layer=i)
        u = p + "u"
        if meta["activation"] != "identity":
            slope = meta["leaky_slope"][i] if meta["activation"] == "leaky_relu" else None
            add(p + "act", "activation", meta["activation"].replace("gelu_erf", "gelu"),
                activation_fn(meta["activation"], slope), (u,), (p + "g",), elements=T * width, layer=i)
            u = p + "g"
        add(p + "fc_out", "matmul", "ffn", lambda x, g, w, b, _r=residual: _r(x, linear(g, w, b)),
            ("x", u, p + "w2", opt(p + "b2")), ("x",), flops=2 * T * width * d, layer=i)

    x = "x"
    if meta["ln_f"]:
        add("ln_f", "layernorm", "layernorm", lambda x, g, b: layer_norm(x, g, b, eps),
            ("x", "lnf.g", opt("lnf.b")), ("xf",), elements=T * d)
        x = "xf"
    rows = T if head == "all" else 1
    head_w = "head" if "head" in has else "wte"

    def lm_head(x, w, _rows=rows):
        x = x[-_rows:]
        return x @ w.T  # [rows, V]; w is [V, d] (tied to wte, or the untied head)
    add("head", "head", "lm_head", lm_head, (x, head_w), ("logits",), flops=2 * rows * d * V)

    server = sorted({n for s in steps for n in s.inputs if n in has})
    return Program(meta=meta, T=T, steps=steps, server_inputs=tuple(server))


def one_hot(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The client's secret input: token ids as a float32 one-hot [T, V] matrix."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}")
    out = np.zeros((ids.size, vocab_size), np.float32)
    out[np.arange(ids.size), ids] = 1.0
    return out


def server_tensors(weights: dict[str, np.ndarray], program: Program) -> dict[str, np.ndarray]:
    """The server's secret inputs, cut to the program (only the first T position embeddings are used)."""
    out = {}
    for name in program.server_inputs:
        w = weights[name]
        out[name] = w[: program.T] if name == "wpe" else w
    return out


def forward(program: Program, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Plaintext forward with the same steps as the 2PC program; returns logits [rows, V]."""
    env: dict[str, object] = dict(server_tensors(weights, program))
    env["onehot"] = one_hot(ids, program.meta["vocab_size"])
    for step in program.steps:
        outs = jax.jit(step.fn)(*[env[n] for n in step.inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        env.update(zip(step.outputs, outs))
    return np.asarray(env[program.output])


def main(argv: list[str] | None = None) -> int:
    """``python -m privlm.spu.program DIR ...``: plaintext JAX logits of exported models (used by tests).

    Each DIR holds public.json, weights.safetensors and ids.json; jax_logits.npy is written beside them.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m privlm.spu.program")
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    for d in map(Path, args.dirs):
        meta = load_meta(d / "public.json")
        ids = np.asarray(json.loads((d / "ids.json").read_text()))
        prog = build_program(meta, len(ids))
        np.save(d / "jax_logits.npy", forward(prog, load_weights(d / "weights.safetensors"), ids))
    print(json.dumps({"mask_value": MASK_VALUE}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
