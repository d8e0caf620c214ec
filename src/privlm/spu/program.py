"""Pure-JAX forward pass of an exported privlm model, as the list of steps the 2PC program executes.

The forward pass is cut into one `Step` per op of the census (embedding, LayerNorm, the attention matmuls,
softmax, the FFN activation, the FFN matmuls, the LM head). The plaintext forward (`forward`) and the
2PC run (`privlm.spu.party`) execute exactly the same step functions in the same order; under SPU each
step is its own compiled executable, so the link counters between two steps measure that op alone and the
per-op breakdown needs no guessing.

Runs in the SPU environment: imports numpy and jax only (no torch).

Public vs secret (see docs/pi-measured.md): every matrix and vector of the model is a private input of the
server (colocated shares: the client builds its share from zeros of the public shape; nothing is shared up
front). In this hand-written program (`build_program`) the few scalars that the census treats as free
rescalings are compiled in and so known to both parties: Eq. 8's beta, the SM(t) temperatures and the
leaky-ReLU slopes (Eq. 8's 1/alpha is folded into the FFN output weights, so alpha stays secret). The traced
program (`program_from_trace`, `--program traced`) keeps those scalars private to the server too.
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

from privlm.spu.kernels import DEFAULT_KERNELS, kernel
from privlm.opschema import (CONSTANTS_FILE, EXPORT_FORMAT, MASK_VALUE, SERVER_FILE,  # noqa: F401 (re-exported)
                             TRACE_FILE, TRACE_FORMAT)
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
    input_shapes: dict[str, tuple] = field(default_factory=dict)  # client and server inputs (traced program)
    outputs: tuple[str, ...] = ()  # every output, the logits first (a traced program with several outputs)
    public_inputs: tuple[str, ...] = ()  # runtime inputs both parties know ('input:<name>' of kind public)


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
    if program.input_shapes:  # traced program: the server's tensors are exactly its inputs
        return {name: np.asarray(weights[name[len("server:"):]], np.float32) for name in program.server_inputs}
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
        if (d / TRACE_FILE).is_file():  # a traced export: the logits of every position and of the last one
            doc, consts = load_trace(d)
            ids = np.asarray(json.loads((d / "ids.json").read_text()))
            for head in ("all", "last"):
                prog = program_from_trace(doc, consts, head=head)
                np.save(d / f"jax_logits_traced_{head}.npy", forward(prog, load_weights(d / SERVER_FILE), ids))
            continue
        meta = load_meta(d / "public.json")
        ids = np.asarray(json.loads((d / "ids.json").read_text()))
        prog = build_program(meta, len(ids), chunks=args.chunks, matmul_block=args.matmul_block)
        np.save(d / f"jax_logits_c{args.chunks}_b{args.matmul_block}.npy", forward(prog, load_weights(d / "weights.safetensors"), ids))
    print(json.dumps({"mask_value": MASK_VALUE}))
    return 0



# ==================================================================================================
# The traced program: the op graph of `privlm.trace` (format privlm-trace/1) interpreted with jax.numpy,
# the registry's kernel for each op chosen by the SPU profile, cut into one Step per registry op.
def _slice(x, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    n = x.shape[dim]
    start = None if start is None else max(start, -n) if start < 0 else min(start, n)
    idx[dim] = slice(start, None if end is None or end >= n else end, step)
    return x[tuple(idx)]


def _mask_bias(m) -> np.ndarray:
    """A public attention mask (bool: keep; float: additive) as an additive bias fixed point can hold."""
    m = np.asarray(m)
    return np.where(m, 0.0, MASK_VALUE).astype(np.float32) if m.dtype == bool else np.maximum(m, MASK_VALUE)


def _expand(x, size):
    size = list(size)
    lead = len(size) - x.ndim
    return jnp.broadcast_to(x, [x.shape[i - lead] if v == -1 else v for i, v in enumerate(size)])


def _free_ops() -> dict[str, Callable]:
    """ATen ops the registry marks free (local, no protocol): shape ops, additions, public products."""
    return {
        "aten.add.Tensor": lambda a, b, alpha=1: a + b * alpha,
        "aten.sub.Tensor": lambda a, b, alpha=1: a - b * alpha,
        "aten.neg.default": lambda a: -a,
        "aten.mul.Tensor": lambda a, b: a * b,
        "private_scale": lambda a, b: a * b, "rotary": lambda a, b: a * b,
        "aten.div.Tensor": lambda a, b: a / b,
        "aten.mean.dim": lambda x, d, keepdim=False, **_: jnp.mean(x, tuple(d) if isinstance(d, list) else d,
                                                                    keepdims=keepdim),
        "aten.sum.dim_IntList": lambda x, d, keepdim=False, **_: jnp.sum(x, tuple(d) if isinstance(d, list) else d,
                                                                         keepdims=keepdim),
        "aten.view.default": lambda x, s: x.reshape(s), "aten.reshape.default": lambda x, s: x.reshape(s),
        "aten._unsafe_view.default": lambda x, s: x.reshape(s),
        "aten.permute.default": lambda x, p: jnp.transpose(x, p),
        "aten.transpose.int": lambda x, a, b: jnp.swapaxes(x, a, b), "aten.t.default": lambda x: x.T,
        "aten.unsqueeze.default": lambda x, d: jnp.expand_dims(x, d),
        "aten.squeeze.dim": lambda x, d: jnp.squeeze(x, d) if x.shape[d] == 1 else x,
        "aten.squeeze.dims": lambda x, d: jnp.squeeze(x, tuple(i for i in d if x.shape[i] == 1)),
        "aten.expand.default": _expand, "aten.slice.Tensor": _slice,
        "aten.select.int": lambda x, d, i: jnp.take(x, i, axis=d),
        "aten.cat.default": lambda xs, dim=0: jnp.concatenate(xs, axis=dim),
        "aten.split_with_sizes.default": lambda x, s, dim=0: tuple(jnp.split(x, np.cumsum(s)[:-1].tolist(), axis=dim)),
        "aten.split.Tensor": lambda x, s, dim=0: tuple(jnp.split(x, list(range(s, x.shape[dim], s)), axis=dim)),
        "aten.unbind.int": lambda x, dim=0: tuple(jnp.moveaxis(x, dim, 0)),
        "<built-in function getitem>": lambda xs, i: xs[i],
        "aten.repeat_interleave.self_int": lambda x, r, dim=None, **_: jnp.repeat(x, r, axis=dim),
        "aten.clone.default": lambda x, **_: x, "aten.alias.default": lambda x: x,
        "aten._to_copy.default": lambda x, **_: x, "aten.contiguous.default": lambda x, **_: x,
        "aten.dropout.default": lambda x, *_: x,
        "onehot_view": lambda onehot, s: onehot.reshape(list(s) + [onehot.shape[-1]]),
        # the predicate is public (a decode step's cache slot), fed as 0/1 like every SPU input
        "aten.where.self": lambda c, a, b: jnp.where(c if c.dtype == jnp.bool_ else c > 0.5, a, b),
    }


def _gqa(q, k, v):
    if k.shape[-3] != q.shape[-3]:
        r = q.shape[-3] // k.shape[-3]
        k, v = jnp.repeat(k, r, axis=-3), jnp.repeat(v, r, axis=-3)
    return k, v


def _kernel_ops(kernels: dict[str, str]) -> dict[str, Callable]:
    """The registry's ops with an SPU kernel, each through the profile's kernel (privlm.spu.kernels)."""
    softmax = kernel("softmax", kernels["softmax"])
    layer_norm = kernel("layernorm", kernels["layernorm"])
    rms_norm = kernel("rmsnorm", kernels["rmsnorm"])
    gelu = kernel("gelu", kernels["gelu"])

    def sdpa_scores(q, k, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        k, _ = _gqa(q, k, k)
        s = (q @ jnp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if is_causal:
            s = jnp.where(causal_mask(s.shape[-1])[-s.shape[-2]:], s, MASK_VALUE)
        if attn_mask is not None:
            s = s + _mask_bias(attn_mask)
        return s

    def sdpa_av(p, q, v, *_, **__):
        _, v = _gqa(q, v, v)
        return p @ v

    def softmax_dim(x, dim=-1, *_):
        return softmax(x) if dim in (-1, x.ndim - 1) else jnp.moveaxis(softmax(jnp.moveaxis(x, dim, -1)), -1, dim)

    def gelu_op(x, approximate="none"):
        return gelu(x) if approximate == "tanh" else jax.nn.gelu(x, approximate=False)

    from privlm.opregistry import RECORDS

    # an elementwise op of the registry runs its kernel family's kernel as the profile names it
    elementwise = {r.name: kernel(r.kernel, kernels[r.kernel]) for r in RECORDS.values()
                   if r.kind == "activation" and r.kernel is not None}
    return {
        **elementwise,
        "aten.linear.default": lambda x, w, b=None: x @ w.T + (0 if b is None else b),
        "aten.matmul.default": lambda a, b: a @ b, "aten.bmm.default": lambda a, b: a @ b,
        "aten.mm.default": lambda a, b: a @ b, "aten.addmm.default": lambda b, x, w: b + x @ w,
        "embedding_onehot": lambda w, onehot, *_: onehot @ w,
        "sdpa_scores": sdpa_scores, "sdpa_softmax": softmax, "sdpa_av": sdpa_av,
        "aten.softmax.int": softmax_dim, "aten._softmax.default": lambda x, dim, half=False: softmax_dim(x, dim),
        "aten.layer_norm.default": lambda x, shape, w=None, b=None, eps=1e-5, *_: layer_norm(x, w, b, eps),
        "aten.rms_norm.default": lambda x, shape, w=None, eps=None: rms_norm(x, w, 1e-6 if eps is None else eps),
        "aten.gelu.default": gelu_op,  # the profile's kernel for tanh-GELU, jax's erf-GELU for the exact one
        "leaky_relu": lambda x, slope: jnp.where(x >= 0, x, x * slope),
    }


def _expand_sdpa(nodes: list[dict]) -> list[dict]:
    """SDPA as three nodes, so that the link counters show QK^T, the softmax and AV apart (as the census does)."""
    out = []
    for n in nodes:
        if n["op"] != "aten.scaled_dot_product_attention.default":
            out.append(n)
            continue
        q, k, v, *rest = n["args"]
        s, p = n["name"] + ".scores", n["name"] + ".probs"
        of = n["name"]
        out += [{**n, "name": s, "op": "sdpa_scores", "args": [q, k, *rest], "part": "scores", "of": of},
                {**n, "name": p, "op": "sdpa_softmax", "args": [{"ref": s}], "kwargs": {}, "part": "softmax", "of": of},
                {**n, "op": "sdpa_av", "args": [{"ref": p}, q, v], "kwargs": {}, "part": "av", "of": of}]
    return out


def _arg_refs(a, kind: str) -> list[str]:
    if isinstance(a, dict):
        if kind in a:
            return [a[kind]]
        return [r for v in a.values() if isinstance(v, (list, dict)) for r in _arg_refs(v, kind)]
    if isinstance(a, list):
        return [r for x in a for r in _arg_refs(x, kind)]
    return []


def _step_kind(node: dict, rec) -> tuple[str, str]:
    """(breakdown kind, census entry) of the step a node starts."""
    part = node.get("part")
    if part in ("scores", "av"):
        return "matmul", "attn_scores"
    if part == "softmax":
        return "softmax", "softmax"
    if rec.census is not None:
        return rec.kind, rec.census
    scope = node["scope"]
    if scope == "embedding":
        return "embedding", "embedding"
    if scope == "lm_head":
        return "head", "lm_head"
    return "matmul", {"ffn": "ffn", "attn": "attn_proj"}.get(scope, "attn_proj")


def program_from_trace(doc: dict, public: dict[str, np.ndarray], head: str = "all",
                       kernels: Optional[dict[str, str]] = None) -> Program:
    """The Step list of a traced model (`privlm.trace`): one step per op of the registry that is not free
    (linear, embedding, QK^T / softmax / AV of each attention, norm, activation, gate product), each running
    the free ops that follow it. Public constants are compiled in; server tensors are step inputs.

    head: "all" computes every position's logits, "last" only the next-token logits (the client learns only
    what it asked for). kernels: the SPU profile's kernel names (default: the `default` profile's).
    """
    from privlm.opregistry import RECORDS, unknown_ops

    if doc.get("format") != TRACE_FORMAT:
        raise ValueError(f"not a privlm traced program (format {doc.get('format')!r}, expected {TRACE_FORMAT!r})")
    bad = unknown_ops(n["op"] for n in doc["nodes"])
    if bad:
        raise ValueError(f"model {doc.get('model')}: the op graph holds {', '.join(bad)}, which the op registry "
                         f"has no kernel for")
    if head not in ("all", "last"):
        raise ValueError(f"head='{head}' must be 'all' or 'last'")
    kernels = {**DEFAULT_KERNELS, **load_spu_profile(DEFAULT).kernels, **(kernels or {})}
    impl = {**_free_ops(), **_kernel_ops(kernels)}
    T, V = doc["T"], doc["vocab_size"]
    nodes = _expand_sdpa(doc["nodes"])
    out_name = doc["output"]["ref"]
    all_outputs = [o["ref"] for o in doc.get("outputs", [doc["output"]])]
    head_nodes = [n["name"] for n in nodes if n["scope"] == "lm_head" and n["op"] == "aten.linear.default"]
    # the logits of the last position only: slice the head's input, skip what reshapes its full output
    last = head == "last" and head_nodes and head_nodes[-1] == out_name

    # cut into steps
    groups: list[list[dict]] = []
    for n in nodes:
        rec = RECORDS.get(n["op"])
        starts = n["op"] in ("sdpa_scores", "sdpa_softmax", "sdpa_av") or (rec is not None and rec.starts_step)
        if starts or not groups:
            groups.append([n])
        else:
            groups[-1].append(n)
    produced_in = {n["name"]: gi for gi, g in enumerate(groups) for n in g}
    needed_later: dict[int, set] = {gi: set() for gi in range(len(groups))}
    for gi, g in enumerate(groups):
        for n in g:
            for r in _arg_refs([n["args"], list(n["kwargs"].values())], "ref"):
                if produced_in[r] != gi:
                    needed_later[produced_in[r]].add(r)
    for o in all_outputs:
        needed_later[produced_in[o]].add(o)

    def decode(a, env):
        if isinstance(a, dict):
            if "ref" in a:
                return env[a["ref"]]
            if "server" in a:
                return env["server:" + a["server"]]
            if "public" in a:
                return public[a["public"]]
            if "onehot" in a:
                return env["onehot"].reshape(1, T, V)
            if "input" in a:
                return env["input:" + a["input"]]
            return a
        if isinstance(a, list):
            return [decode(x, env) for x in a]
        return a

    steps: list[Step] = []
    for gi, g in enumerate(groups):
        names = {n["name"] for n in g}
        ins: list[str] = []
        for n in g:
            refs = [("ref", r) for r in _arg_refs([n["args"], list(n["kwargs"].values())], "ref") if r not in names]
            refs += [("server", s) for s in _arg_refs(n["args"], "server")]
            refs += [("onehot", "onehot")] * bool(_arg_refs(n["args"], "onehot"))
            refs += [("input", r) for r in _arg_refs([n["args"], list(n["kwargs"].values())], "input")]
            for kind, r in refs:
                key = {"ref": r, "server": "server:" + r, "onehot": "onehot", "input": "input:" + r}[kind]
                if key not in ins:
                    ins.append(key)
        outs = [n["name"] for n in g if n["name"] in needed_later[gi]]

        def fn(*args, _g=g, _ins=tuple(ins), _outs=tuple(outs)):
            env = dict(zip(_ins, args))
            for n in _g:
                a = decode(n["args"], env)
                if last and n["name"] == out_name:
                    a[0] = a[0][..., -1:, :]
                kw = {k: decode(v, env) for k, v in n["kwargs"].items()}
                env[n["name"]] = impl[n["op"]](*a, **kw)
            res = tuple(env[o].reshape(-1, V) if o == out_name else env[o] for o in _outs)  # logits [rows, V]
            return res if len(res) > 1 else res[0]

        lead = g[0]
        rec = RECORDS.get(lead["op"])
        kind, census_key = _step_kind(lead, rec if rec is not None else RECORDS["aten.matmul.default"])
        steps.append(Step(lead["name"], kind, census_key, fn, tuple(ins), tuple(outs), layer=lead.get("layer")))
    _account(steps, groups, doc, head)
    server = sorted({i for s in steps for i in s.inputs if i.startswith("server:")})
    shapes = {"onehot": (T, V), **{f"server:{k}": tuple(v) for k, v in doc["server"].items()},
              **{f"input:{k}": tuple(v["shape"]) for k, v in doc.get("inputs", {}).items()}}
    public_inputs = tuple(f"input:{k}" for k, v in doc.get("inputs", {}).items() if v["kind"] == "public")
    return Program(meta=doc, T=T, steps=steps, server_inputs=tuple(server), output=out_name,
                   input_shapes=shapes, outputs=tuple(all_outputs), public_inputs=public_inputs)


def _account(steps: list[Step], groups: list[list[dict]], doc: dict, head: str) -> None:
    """Elements and FLOPs of each step, by the registry's rules over the node that leads it."""
    from privlm.opregistry import measure

    original = {n["name"]: n for n in doc["nodes"]}
    shapes = {n["name"]: n["shape"] for n in doc["nodes"]}
    for s, g in zip(steps, groups):
        lead = g[0]
        part = lead.get("part")
        _, count, shape, flops = measure(doc, original[lead.get("of", lead["name"])], shapes)
        elements = count * int(np.prod(shape)) if shape is not None else 0
        if part is not None:  # SDPA: QK^T and AV share its FLOPs, the softmax its elements
            elements, flops = (elements, 0) if part == "softmax" else (0, flops // 2)
        if head == "last" and s.kind == "head":
            flops //= doc["T"]
        s.elements, s.flops = elements, flops



def load_trace(directory: Path | str) -> tuple[dict, dict[str, np.ndarray]]:
    """(op graph, public constants) of a traced export directory (both are public: the client loads them too)."""
    from safetensors.numpy import load_file

    d = Path(directory)
    doc = json.loads((d / TRACE_FILE).read_text())
    if doc.get("format") != TRACE_FORMAT:
        raise ValueError(f"{d / TRACE_FILE}: not a privlm traced program (format {doc.get('format')!r}, "
                         f"expected {TRACE_FORMAT!r})")
    consts = load_file(str(d / CONSTANTS_FILE)) if doc["public"] else {}
    return doc, consts


def is_trace(path: Path | str) -> bool:
    """Whether a public program file is a traced op graph (program.json) rather than a privlm-spu-export."""
    try:
        return json.loads(Path(path).read_text()).get("format") == TRACE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
