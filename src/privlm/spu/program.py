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

from privlm.spu.kernels import kernel
from privlm.opschema import EXPORT_FORMAT, MASK_VALUE  # noqa: F401 (MASK_VALUE: re-exported)
from privlm.spu.spu_profile import DEFAULT, load_spu_profile



@dataclass
class Step:
    """One op of the forward pass: ``outputs = fn(*inputs)`` over named tensors.

    kind: breakdown kind (one of `privlm.opschema.STEP_KINDS`). census: the census entry it is charged to: a nonlinear op type
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
def activation_fn(name: str, slope: Optional[float], gelu_kernel: str = "tanh") -> Callable:
    """The FFN nonlinearity of Eq. 4: GELU (GPT-2's tanh form, by the named kernel), exact GELU, ReLU or
    leaky ReLU."""
    if name == "gelu":
        return kernel("gelu", gelu_kernel)
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


def build_program(meta: dict, T: int, head: str = "all", chunks: int = 1,
                  matmul_block: Optional[int] = None, kernels: Optional[dict[str, str]] = None) -> Program:
    """The step list of a T-token forward pass of the exported model ``meta``.

    head: "all" computes the logits of every position (what the census counts and what the paper's
    one-token-after-T-prompt measurement includes); "last" only the next-token logits.
    chunks, matmul_block: bound the memory of one SPU run (CHEETAH needs ~17 GB for a single secret
    [128x768]x[768x3072] product with both parties on one host). ``chunks`` evaluates each softmax (split
    over heads) and each FFN activation (split over rows) as that many runs; ``matmul_block`` splits every
    product into blocks of at most that many input and output features (partial products are summed and
    concatenated locally, which costs no communication). The math is unchanged; small per-run overheads
    are added.
    kernels: the softmax/gelu/layernorm kernel names of an SPU profile (`privlm.spu.kernels`); default:
    the `default` profile's (the functions the PyTorch model computes, as SPU evaluates them).
    """
    kernels = {**load_spu_profile(DEFAULT).kernels, **(kernels or {})}
    softmax = kernel("softmax", kernels["softmax"])
    layer_norm = kernel("layernorm", kernels["layernorm"])
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be >= 1")
    if matmul_block is not None and matmul_block < 1:
        raise ValueError(f"matmul_block={matmul_block} must be >= 1")
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

    def matmul(name, kind, census, hs, h_of, w, b, pre, post, outputs, din, dout, rows, layer=None,
               transpose=False):
        """outputs = post(*pre, h_of(*hs) @ W + b), W = w or w.T; one step, or blocks + a local assembly."""
        n_pre, n_h = len(pre), len(hs)

        def weight(wv, k0, k1, c0, c1):
            return wv[c0:c1, k0:k1].T if transpose else wv[k0:k1, c0:c1]

        def bias(y, bv):
            return y if bv is None else y + bv
        if matmul_block is None or (din <= matmul_block and dout <= matmul_block):
            def fused(*a):
                y = h_of(*a[n_pre:n_pre + n_h]) @ weight(a[-2], 0, din, 0, dout)
                return post(*a[:n_pre], bias(y, a[-1]))
            add(name, kind, census, fused, (*pre, *hs, w, b), outputs, flops=2 * rows * din * dout, layer=layer)
            return
        kb, cb = _blocks(din, matmul_block), _blocks(dout, matmul_block)
        partial = []
        for i_k, (k0, k1) in enumerate(kb):
            for i_c, (c0, c1) in enumerate(cb):
                out = f"{name}.p{i_k}.{i_c}"
                add(out, kind, census,
                    lambda *a, _k=(k0, k1), _c=(c0, c1): h_of(*a[:-1])[..., _k[0]:_k[1]] @ weight(a[-1], *_k, *_c),
                    (*hs, w), (out,), flops=2 * rows * (k1 - k0) * (c1 - c0), layer=layer)
                partial.append(out)

        def assemble(*a, _nk=len(kb), _nc=len(cb)):
            parts = a[n_pre:n_pre + _nk * _nc]
            cols = [sum(parts[i_k * _nc + i_c] for i_k in range(_nk)) for i_c in range(_nc)]
            return post(*a[:n_pre], bias(jnp.concatenate(cols, axis=-1), a[-1]))
        add(name, kind, census, assemble, (*pre, *partial, b), outputs, flops=0, layer=layer)

    def ident(h):
        return h

    def keep(y):
        return y

    # secret token ids enter as a one-hot [T, V] matrix: the lookup becomes a [T,V]x[V,d] product
    matmul("embedding", "embedding", "embedding", ("onehot",), ident, "wte", None, ("wpe",),
           lambda wpe, y: y + wpe, ("x",), V, d, T)

    for i in range(L):
        p = f"h{i}."
        h = "x"
        if meta["norm"] == "layernorm":
            add(p + "ln1", "layernorm", "layernorm", lambda x, g, b: layer_norm(x, g, b, eps),
                ("x", p + "ln1.g", opt(p + "ln1.b")), (p + "h1",), elements=T * d, layer=i)
            h = p + "h1"

        def split_heads(y):
            y = y.reshape(T, 3, H, dk).transpose(1, 2, 0, 3)  # [3, H, T, dk]
            return y[0], y[1], y[2]
        matmul(p + "qkv", "matmul", "attn_proj", (h,), ident, p + "wqkv", opt(p + "bqkv"), (), split_heads,
               (p + "q", p + "k", p + "v"), d, 3 * d, T, layer=i)

        temp = meta["temperature"][i] if meta.get("temperature") is not None else None
        inv_t = None if temp is None else (1.0 / np.asarray(temp, np.float32)[:, :T])
        add(p + "scores", "matmul", "attn_scores", lambda q, k, _t=inv_t: attention_logits(q, k, _t),
            (p + "q", p + "k"), (p + "s",), flops=2 * H * T * T * dk, layer=i)
        parts = []
        for c, (lo, hi) in enumerate(_splits(H, chunks)):
            name = p + "softmax" + (f".{c}" if chunks > 1 else "")
            add(name, "softmax", "softmax", lambda s, _lo=lo, _hi=hi: softmax(s[_lo:_hi]), (p + "s",),
                (p + f"a{c}",), elements=(hi - lo) * T * T, layer=i)
            parts.append(p + f"a{c}")

        def av(*xs):
            a = jnp.concatenate(xs[:-1], axis=0)
            return jnp.einsum("hts,hsd->thd", a, xs[-1]).reshape(T, d)
        add(p + "av", "matmul", "attn_scores", av, (*parts, p + "v"), (p + "y",), flops=2 * H * T * T * dk, layer=i)
        matmul(p + "o_proj", "matmul", "attn_proj", (p + "y",), ident, p + "wo", opt(p + "bo"), ("x",),
               lambda x, y: x + y, ("x",), d, d, T, layer=i)

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
            matmul(p + "ffn", "matmul", "ffn", (h,), ident, p + "wf", opt(p + "bf"), ("x",), residual, ("x",),
                   d, d, T, layer=i)
            continue
        width = meta["ffn_width"]
        matmul(p + "fc_in", "matmul", "ffn", (h,), ident, p + "w1", opt(p + "b1"), (), keep, (p + "u",),
               d, width, T, layer=i)
        parts = [p + "u"]
        if meta["activation"] != "identity":
            slope = meta["leaky_slope"][i] if meta["activation"] == "leaky_relu" else None
            act = activation_fn(meta["activation"], slope, kernels["gelu"])
            parts = []
            for c, (lo, hi) in enumerate(_splits(T, chunks)):
                name = p + "act" + (f".{c}" if chunks > 1 else "")
                add(name, "activation", meta["activation"].replace("gelu_erf", "gelu"),
                    lambda u, _a=act, _lo=lo, _hi=hi: _a(u[_lo:_hi]), (p + "u",), (p + f"g{c}",),
                    elements=(hi - lo) * width, layer=i)
                parts.append(p + f"g{c}")
        matmul(p + "fc_out", "matmul", "ffn", tuple(parts), lambda *g: jnp.concatenate(g, axis=0), p + "w2",
               opt(p + "b2"), ("x",), residual, ("x",), width, d, T, layer=i)

    x = "x"
    if meta["ln_f"]:
        add("ln_f", "layernorm", "layernorm", lambda x, g, b: layer_norm(x, g, b, eps),
            ("x", "lnf.g", opt("lnf.b")), ("xf",), elements=T * d)
        x = "xf"
    rows = T if head == "all" else 1
    head_w = "head" if "head" in has else "wte"  # [V, d]: tied to wte, or the untied head
    matmul("head", "head", "lm_head", (x,), lambda x, _r=rows: x[-_r:], head_w, None, (), keep, ("logits",),
           d, V, rows, transpose=True)

    server = sorted({n for s in steps for n in s.inputs if n in has})
    return Program(meta=meta, T=T, steps=steps, server_inputs=tuple(server))


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most ``block`` covering 0..n."""
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


def _splits(n: int, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges cutting 0..n into min(chunks, n) nearly equal parts."""
    k = min(chunks, n)
    edges = [round(j * n / k) for j in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


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
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--matmul-block", type=int, default=None)
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    for d in map(Path, args.dirs):
        meta = load_meta(d / "public.json")
        ids = np.asarray(json.loads((d / "ids.json").read_text()))
        prog = build_program(meta, len(ids), chunks=args.chunks, matmul_block=args.matmul_block)
        np.save(d / f"jax_logits_c{args.chunks}_b{args.matmul_block}.npy", forward(prog, load_weights(d / "weights.safetensors"), ids))
    print(json.dumps({"mask_value": MASK_VALUE}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
