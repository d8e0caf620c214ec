"""The 2PC program: the op graph of a traced model (`privlm.trace`, format privlm-trace/1) as the list of steps
the parties execute.

`program_from_trace` interprets the graph with jax.numpy: one `Step` per op of the registry (`privlm.opregistry`)
that is not free — the embedding, every product with a weight, QK^T, the softmax and AV of each attention, every
norm, activation and gate product — each running the free ops (views, additions, products with public or
server-private values) that follow it, through the kernel the SPU profile names for its op. The plaintext forward
(`forward`) and the 2PC run (`privlm.spu.party`) execute exactly the same step functions in the same order; under
SPU each step is its own compiled executable, so the link counters between two steps measure that op alone and
the per-op breakdown needs no guessing.

Runs in the SPU environment: imports numpy and jax only (no torch).

Public vs secret (docs/DECISIONS.md#traced-program): every learned value — weights, biases, norm gains, SM(t)'s
temperatures, Eq. 8's alpha/beta, leaky slopes, materialized WN/SN weights — is a private input of the server
(colocated shares: the client builds its share from zeros of the public shape; nothing is shared up front); the
public constants (causal masks, rotary tables) depend on the architecture only.
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
from privlm.opschema import CONSTANTS_FILE, MASK_VALUE, SERVER_FILE, TRACE_FILE, TRACE_FORMAT
from privlm.spu.spu_profile import DEFAULT, load_spu_profile


@dataclass
class Step:
    """One op of the forward pass: ``outputs = fn(*inputs)`` over named tensors.

    kind: breakdown kind (one of `privlm.opschema.STEP_KINDS`). census: the census entry it is charged to: a nonlinear op type
    (`privlm.opschema.OP_TYPES`: softmax, layernorm, rmsnorm, gelu, relu, leaky_relu, silu, gate_product) or a FLOPs
    key (attn_proj, attn_scores, ffn, embedding, lm_head). elements: elements the nonlinear op evaluates (0 for
    matmuls); flops: 2·multiply-adds.
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
    meta: dict  # the op graph (program.json)
    T: int
    steps: list[Step]
    client_inputs: tuple[str, ...] = ("onehot",)
    server_inputs: tuple[str, ...] = field(default_factory=tuple)
    output: str = "logits"
    input_shapes: dict[str, tuple] = field(default_factory=dict)  # client and server inputs
    outputs: tuple[str, ...] = ()  # every output, the logits first (a traced program with several outputs)
    public_inputs: tuple[str, ...] = ()  # runtime inputs both parties know ('input:<name>' of kind public)


def causal_mask(T: int) -> np.ndarray:
    """M of Eq. 2 as a public boolean matrix: key j is visible to query i iff j <= i."""
    return np.tril(np.ones((T, T), dtype=bool))


def load_weights(path: Path | str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}


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
    """The server's secret inputs: the tensors of server.safetensors the program reads."""
    return {name: np.asarray(weights[name[len("server:"):]], np.float32) for name in program.server_inputs}


def forward(program: Program, weights: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Plaintext forward with the same steps as the 2PC program; returns logits [rows, V]."""
    env: dict[str, object] = dict(server_tensors(weights, program))
    env["onehot"] = one_hot(ids, program.meta["vocab_size"])
    for step in program.steps:
        # op by op, not jit: each step runs once, and XLA compiling every step of a small program costs more
        # than the step itself
        outs = step.fn(*[env[n] for n in step.inputs])
        outs = outs if isinstance(outs, tuple) else (outs,)
        env.update(zip(step.outputs, outs))
    return np.asarray(env[program.output])


def main(argv: list[str] | None = None) -> int:
    """``python -m privlm.spu.program DIR ...``: plaintext JAX logits of traced exports (used by tests).

    Each DIR holds program.json, public.safetensors, server.safetensors and ids.json; the logits of every position
    and of the last one are written beside them (jax_logits_traced_{all,last}[_c<chunks>_b<block>].npy).
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m privlm.spu.program")
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--matmul-block", type=int, default=None)
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    for d in map(Path, args.dirs):
        doc, consts = load_trace(d)
        ids = np.asarray(json.loads((d / "ids.json").read_text()))
        cut = f"_c{args.chunks}_b{args.matmul_block}" if args.chunks > 1 or args.matmul_block else ""
        for head in ("all", "last"):
            prog = program_from_trace(doc, consts, head=head, chunks=args.chunks, matmul_block=args.matmul_block)
            np.save(d / f"jax_logits_traced_{head}{cut}.npy", forward(prog, load_weights(d / SERVER_FILE), ids))
    print(json.dumps({"mask_value": MASK_VALUE}))
    return 0


# --------------------------------------------------------------------------------------------------
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


def private_scale(a, b):
    """A secret times a server-private scale (SM(t)'s 1/t per head and query row; Eq. 8's beta where a LayerNorm
    keeps it from being folded). A scale constant along the last axis (shape [..., n, 1] or one value) runs as
    the product diag(s) @ x with a [n, n] diagonal built from the scale inside the program (eye x s: local):
    under CHEETAH a matrix product with the server's operand costs fewer bytes than the elementwise secret
    product (docs/DECISIONS.md#traced-program). Any other scale: the elementwise product."""
    out = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    for x, s in ((a, b), (b, a)):
        rows = jnp.size(s) == 1 or (jnp.ndim(s) >= 2 and jnp.shape(s)[-1] == 1)
        if jnp.ndim(x) >= 2 and jnp.shape(x)[-1] > 1 and jnp.size(s) < jnp.size(x) and rows:
            n = jnp.shape(x)[-2]
            diag = jnp.eye(n, dtype=jnp.float32) * (jnp.reshape(s, ()) if jnp.size(s) == 1 else s)
            y = jnp.matmul(diag, x)
            if y.shape == out:
                return y
    return a * b


def _free_ops() -> dict[str, Callable]:
    """ATen ops the registry marks free (local, no protocol): shape ops, additions, public products."""
    return {
        "aten.add.Tensor": lambda a, b, alpha=1: a + b * alpha,
        "aten.sub.Tensor": lambda a, b, alpha=1: a - b * alpha,
        "aten.neg.default": lambda a: -a,
        "aten.mul.Tensor": lambda a, b: a * b,
        "private_scale": private_scale, "rotary": lambda a, b: a * b,
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


def batched_matmul(a, b):
    """a @ b. A batch of one-row products (a [..., 1, k] @ b [..., k, m] over n > 1 batch elements: a decode
    step's q Kᵀ and AV, one per head) runs as one product: the n rows side by side [1, n·k] times the
    block-diagonal of b [n·k, n·m] (a select with a public pattern: local), whose n diagonal blocks are the n
    products. The same sums; under CHEETAH one HE product with the batch's rows in one vector instead of one HE
    product per batch element (docs/DECISIONS.md#private-generation)."""
    batch = a.shape[:-2]
    n = math.prod(batch)
    if a.ndim < 3 or a.shape[-2] != 1 or n < 2 or b.shape[:-2] != batch:
        return a @ b
    k, m = b.shape[-2:]
    blocks = jnp.broadcast_to(b.reshape(n, k, 1, m), (n, k, n, m))
    diagonal = np.eye(n, dtype=bool)[:, None, :, None]
    bd = jnp.where(diagonal, blocks, 0.0).reshape(n * k, n * m)
    return (a.reshape(1, n * k) @ bd).reshape(*batch, 1, m)


def _kernel_ops(kernels: dict[str, str]) -> dict[str, Callable]:
    """The registry's ops with an SPU kernel, each through the profile's kernel (privlm.spu.kernels)."""
    softmax = kernel("softmax", kernels["softmax"])
    layer_norm = kernel("layernorm", kernels["layernorm"])
    rms_norm = kernel("rmsnorm", kernels["rmsnorm"])
    gelu = kernel("gelu", kernels["gelu"])

    def sdpa_scores(q, k, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        k, _ = _gqa(q, k, k)
        s = batched_matmul(q, jnp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if is_causal:
            s = jnp.where(causal_mask(s.shape[-1])[-s.shape[-2]:], s, MASK_VALUE)
        if attn_mask is not None:
            s = s + _mask_bias(attn_mask)
        return s

    def sdpa_av(p, q, v, *_, **__):
        _, v = _gqa(q, v, v)
        return batched_matmul(p, v)

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
        "aten.matmul.default": batched_matmul, "aten.bmm.default": batched_matmul,
        "aten.mm.default": lambda a, b: a @ b, "aten.addmm.default": lambda b, x, w: b + x @ w,
        "embedding_onehot": lambda w, onehot, *_: onehot @ w,
        "sdpa_scores": sdpa_scores, "sdpa_softmax": softmax, "sdpa_av": sdpa_av,
        "aten.softmax.int": softmax_dim, "aten._softmax.default": lambda x, dim, half=False: softmax_dim(x, dim),
        "aten.layer_norm.default": lambda x, shape, w=None, b=None, eps=1e-5, *_: layer_norm(x, w, b, eps),
        "aten.rms_norm.default": lambda x, shape, w=None, eps=None: rms_norm(x, w, 1e-6 if eps is None else eps),
        "aten.gelu.default": gelu_op,  # the profile's kernel for tanh-GELU, jax's erf-GELU for the exact one
        "leaky_relu": lambda x, slope: jnp.where(x >= 0, x, x * slope),
    }


def activation_fn(op: str, kernels: Optional[dict[str, str]] = None, slope: float = 0.01) -> Callable:
    """The function the program runs for the census activation ``op`` (gelu: the profile's tanh-GELU kernel;
    relu; leaky_relu with ``slope``), for the micro-benchmarks of `privlm.spu.microbench`."""
    impl = _kernel_ops({**DEFAULT_KERNELS, **load_spu_profile(DEFAULT).kernels, **(kernels or {})})
    if op == "gelu":
        return lambda u: impl["aten.gelu.default"](u, approximate="tanh")
    if op == "relu":
        return impl["aten.relu.default"]
    if op == "leaky_relu":
        return lambda u: impl["leaky_relu"](u, slope)
    raise ValueError(f"activation '{op}' is not one the program runs as an FFN activation")


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
                       kernels: Optional[dict[str, str]] = None, chunks: int = 1,
                       matmul_block: Optional[int] = None) -> Program:
    """The Step list of a traced model (`privlm.trace`): one step per op of the registry that is not free
    (linear, embedding, QK^T / softmax / AV of each attention, norm, activation, gate product), each running
    the free ops that follow it. Public constants are compiled in; server tensors are step inputs.

    head: "all" computes every position's logits, "last" only the next-token logits (the client learns only
    what it asked for: the program's output is one row). kernels: the SPU profile's kernel names (default: the
    `default` profile's). chunks, matmul_block: bound the memory of one SPU run (CHEETAH needs ~17 GB for a
    single secret [128x768]x[768x3072] product with both parties on one host): ``chunks`` evaluates each softmax
    (cut over heads), activation and gate product (cut over rows) as that many runs; ``matmul_block`` cuts every
    product with a weight into blocks of at most that many input and output features, summed and concatenated
    locally (no communication) in the step that would have run the product. The math is unchanged.
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
    if chunks < 1:
        raise ValueError(f"chunks={chunks} must be >= 1")
    if matmul_block is not None and matmul_block < 1:
        raise ValueError(f"matmul_block={matmul_block} must be >= 1")
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

    def inputs_of(nodes: list[dict], exclude: set) -> list[str]:
        ins: list[str] = []
        for n in nodes:
            refs = [("ref", r) for r in _arg_refs([n["args"], list(n["kwargs"].values())], "ref") if r not in exclude]
            refs += [("server", s) for s in _arg_refs(n["args"], "server")]
            refs += [("onehot", "onehot")] * bool(_arg_refs(n["args"], "onehot"))
            refs += [("input", r) for r in _arg_refs([n["args"], list(n["kwargs"].values())], "input")]
            for kind, r in refs:
                key = {"ref": r, "server": "server:" + r, "onehot": "onehot", "input": "input:" + r}[kind]
                if key not in ins:
                    ins.append(key)
        return ins

    def lead_args(n, env):
        a = decode(n["args"], env)
        if last and n["name"] == out_name:
            a[0] = a[0][..., -1:, :]
        return a, {k: decode(v, env) for k, v in n["kwargs"].items()}

    measured = _measure_groups(groups, doc, head)
    steps: list[Step] = []
    for gi, g in enumerate(groups):
        names = {n["name"] for n in g}
        lead = g[0]
        rec = RECORDS.get(lead["op"])
        kind, census_key = _step_kind(lead, rec if rec is not None else RECORDS["aten.matmul.default"])
        elements, flops = measured[gi]
        outs = [n["name"] for n in g if n["name"] in needed_later[gi]]
        layer = lead.get("layer")
        # a product with a private weight cut into blocks, or a kernel op cut into chunks: the pieces are steps
        # of their own, and the group's step assembles them (local: no communication) and runs the rest
        pieces = _pieces(lead, doc, matmul_block, chunks)
        lead_ins = inputs_of([lead], set())
        assemble = None
        if pieces is not None:
            how, parts = pieces
            piece_names = []
            for j, (part, share) in enumerate(parts):
                pname = f"{lead['name']}.{how}{j}"
                piece_names.append(pname)

                def piece(*args, _lead=lead, _ins=tuple(lead_ins), _part=part, _how=how):
                    a, kw = lead_args(_lead, dict(zip(_ins, args)))
                    if _how == "b":
                        return _block_product(_lead["op"], a, *_part)
                    return impl[_lead["op"]](*_chunk_args(_lead, a, *_part), **kw)
                steps.append(Step(pname, kind, census_key, piece, tuple(lead_ins), (pname,),
                                  elements * share[0] // share[1], flops * share[0] // share[1], layer))
            elements = flops = 0
            rest_ins = [i for i in inputs_of([lead], set()) if how == "b" and _is_bias(lead, i)]
            ins = piece_names + rest_ins + [i for i in inputs_of(g[1:], names) if i not in rest_ins]

            def assemble(env, _lead=lead, _how=how, _names=tuple(piece_names), _parts=tuple(p for p, _ in parts)):
                pieces_ = [env[n] for n in _names]
                if _how == "b":
                    bi = _WEIGHT_PRODUCTS[_lead["op"]][2]
                    has_b = bi is not None and bi < len(_lead["args"]) and _lead["args"][bi] is not None
                    return _block_assemble(pieces_, _parts, decode(_lead["args"][bi], env) if has_b else None)
                return jnp.concatenate(pieces_, axis=_parts[0][0])
        else:
            ins = inputs_of(g, names)

        def fn(*args, _g=g, _ins=tuple(ins), _outs=tuple(outs), _assemble=assemble):
            env = dict(zip(_ins, args))
            for i, n in enumerate(_g):
                if i == 0 and _assemble is not None:
                    env[n["name"]] = _assemble(env)
                    continue
                a, kw = lead_args(n, env)
                env[n["name"]] = impl[n["op"]](*a, **kw)
            # the logits [rows, V]; with head "last" one row, whatever follows the LM head in the graph
            res = tuple((env[o].reshape(-1, V)[-1:] if head == "last" else env[o].reshape(-1, V)) if o == out_name
                        else env[o] for o in _outs)
            return res if len(res) > 1 else res[0]

        steps.append(Step(lead["name"], kind, census_key, fn, tuple(ins), tuple(outs), elements, flops, layer))
    server = sorted({i for s in steps for i in s.inputs if i.startswith("server:")})
    shapes = {"onehot": (T, V), **{f"server:{k}": tuple(v) for k, v in doc["server"].items()},
              **{f"input:{k}": tuple(v["shape"]) for k, v in doc.get("inputs", {}).items()}}
    public_inputs = tuple(f"input:{k}" for k, v in doc.get("inputs", {}).items() if v["kind"] == "public")
    return Program(meta=doc, T=T, steps=steps, server_inputs=tuple(server), output=out_name,
                   input_shapes=shapes, outputs=tuple(all_outputs), public_inputs=public_inputs)


def _measure_groups(groups: list[list[dict]], doc: dict, head: str) -> list[tuple[int, int]]:
    """(elements, FLOPs) of each group's step, by the registry's rules over the node that leads it."""
    from privlm.opregistry import RECORDS, measure

    original = {n["name"]: n for n in doc["nodes"]}
    shapes = {n["name"]: n["shape"] for n in doc["nodes"]}
    out = []
    for g in groups:
        lead = g[0]
        part = lead.get("part")
        _, count, shape, flops = measure(doc, original[lead.get("of", lead["name"])], shapes)
        elements = count * int(np.prod(shape)) if shape is not None else 0
        if part is not None:  # SDPA: QK^T and AV share its FLOPs, the softmax its elements
            elements, flops = (elements, 0) if part == "softmax" else (0, flops // 2)
        if lead["op"] == "rotary":  # x·cos or rotate_half(x)·sin: half of a rotation (as the census counts it)
            elements //= 2
        rec = RECORDS.get(lead["op"])
        if head == "last" and lead["scope"] == "lm_head" and rec is not None and rec.flops is not None:
            flops //= doc["T"]
        out.append((elements, flops))
    return out


# Products with a server weight that --matmul-block cuts: op -> (index of the input, index of the weight,
# index of the bias or None, whether the weight is stored [out, in]).
_WEIGHT_PRODUCTS = {"aten.linear.default": (0, 1, 2, True), "aten.addmm.default": (1, 2, 0, False),
                    "embedding_onehot": (1, 0, None, False)}
# Kernel ops that --chunks cuts, and along which axis of their secret inputs: softmax over heads (the axis
# before the T x S matrix), elementwise activations and the gate product over rows.
_CHUNKED = {"sdpa_softmax": -3, "aten.softmax.int": -3, "aten._softmax.default": -3, "aten.gelu.default": -2,
            "aten.relu.default": -2, "aten.silu.default": -2, "leaky_relu": -2, "gate_product": -2}


def _weight_dims(lead: dict, doc: dict) -> tuple[int, int]:
    xi, wi, _, out_in = _WEIGHT_PRODUCTS[lead["op"]]
    w = doc["server"][lead["args"][wi]["server"]]
    return (w[1], w[0]) if out_in else (w[0], w[1])


def _pieces(lead: dict, doc: dict, matmul_block: Optional[int], chunks: int):
    """How the lead op of a step is cut: ("b", [((k0, k1, c0, c1), (share, whole)), ...]) for a weight product
    over more than ``matmul_block`` input or output features, ("c", [((axis, lo, hi), (share, whole)), ...]) for a
    kernel op and chunks > 1, or None."""
    op = lead["op"]
    if matmul_block is not None and op in _WEIGHT_PRODUCTS and isinstance(lead["args"][_WEIGHT_PRODUCTS[op][1]], dict) \
            and "server" in lead["args"][_WEIGHT_PRODUCTS[op][1]]:
        din, dout = _weight_dims(lead, doc)
        if din <= matmul_block and dout <= matmul_block:
            return None
        return "b", [((k0, k1, c0, c1), ((k1 - k0) * (c1 - c0), din * dout))
                     for k0, k1 in _blocks(din, matmul_block) for c0, c1 in _blocks(dout, matmul_block)]
    if chunks > 1 and op in _CHUNKED and lead["shape"] is not None:
        shape = lead["shape"]
        axis = _CHUNKED[op] if len(shape) >= -_CHUNKED[op] + 1 else -2
        n = shape[axis]
        if n < 2:
            return None
        return "c", [((axis, lo, hi), (hi - lo, n)) for lo, hi in _splits(n, chunks)]
    return None


def _is_bias(lead: dict, key: str) -> bool:
    bi = _WEIGHT_PRODUCTS[lead["op"]][2]
    args = lead["args"]
    return bi is not None and bi < len(args) and isinstance(args[bi], dict) and key == "server:" + args[bi].get("server", "")


def _block_product(op: str, a: list, k0: int, k1: int, c0: int, c1: int):
    """One block of a weight product: x[..., k0:k1] @ W[k0:k1, c0:c1] (W as [in, out])."""
    xi, wi, _, out_in = _WEIGHT_PRODUCTS[op]
    x, w = a[xi], a[wi]
    return x[..., k0:k1] @ (w[c0:c1, k0:k1].T if out_in else w[k0:k1, c0:c1])


def _block_assemble(pieces: list, parts: tuple, bias):
    """The blocks of a weight product summed over input blocks, concatenated over output blocks, plus the bias."""
    cols: dict[int, object] = {}
    for (k0, k1, c0, c1), p in zip(parts, pieces):
        cols[c0] = p if c0 not in cols else cols[c0] + p
    y = jnp.concatenate([cols[c] for c in sorted(cols)], axis=-1)
    return y if bias is None else y + bias


def _chunk_args(lead: dict, a: list, axis: int, lo: int, hi: int) -> list:
    """The lead op's arguments with its secret inputs (the node's refs) cut to [lo, hi) along ``axis``."""
    return [_slice(v, axis % v.ndim, lo, hi) if isinstance(arg, dict) and "ref" in arg else v
            for arg, v in zip(lead["args"], a)]


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


if __name__ == "__main__":
    raise SystemExit(main())
