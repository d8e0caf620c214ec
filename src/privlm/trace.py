"""One trace of a torch causal LM (privlm `GPT` or a Hugging Face causal LM) for the census and the 2PC program.

`trace_model` exports the model with ``torch.export`` at a fixed T (eval mode, no hooks, sdpa attention), keeps
the registry's ops whole (softmax, norms, activations, SDPA, linear, embedding: the rest is decomposed to core
ATen), and classifies every node by what it depends on:

``client``  depends on the token ids: emitted to the op graph (``Trace.doc``, format `TRACE_FORMAT`)
``server``  depends on learned parameters or persistent buffers only: folded to a tensor of the server's
            (``Trace.server``: weights, biases, norm gains, materialized WN/SN weights, SM(t)'s 1/t, Eq. 8's
            beta, learned leaky slopes); never written into the op graph
``public``  depends on the architecture only (positions, masks, rotary tables): folded to a public constant
            (``Trace.public``); additive masks below -1e4 are clamped to MASK_VALUE, which fixed point holds

Eq. 8's alpha and beta of an LN-free privlm model are folded into the server's linear weights before the export
(`privlm.model.fold.fold_scales`: the residual stream carried as a rescaled copy, exact); in any other model a
division of a linear's output by a server scalar (Eq. 8's 1/alpha) is folded into that linear's weight and bias on
the server side, exactly. Token ids reach only the embedding, which becomes a one-hot product.

The op graph names only architecture and shapes: its node names are deterministic, so a client can rebuild it
from the config with random weights and compare. Format (docs/ARCHITECTURE.md#traced-program)::

    {"format": "privlm-trace/1", "model": name, "T": T, "vocab_size": V,
     "nodes": [{"name", "op", "args", "kwargs", "shape", "scope", "layer"}, ...],
     "output": {"ref": name}, "server": {name: shape}, "public": {name: shape}}

An argument is ``{"ref": node}`` (a secret value), ``{"server": name}``, ``{"public": name}``, ``{"onehot": true}``
(the client's one-hot ids), a list of arguments or a literal. ``scope`` is where the node sits (``attn``, ``ffn``,
``lm_head``, ``embedding``, ``final``, ``block``), ``layer`` its block index or None.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from privlm.errors import PrivlmError
from privlm.opregistry import unknown_ops
from privlm.opschema import MASK_VALUE, TRACE_FORMAT

# Ops kept whole by the decomposition (each is one registry record with one SPU kernel).
KEEP = ("softmax", "_softmax", "layer_norm", "rms_norm", "gelu", "silu", "relu", "scaled_dot_product_attention",
        "linear", "embedding")
# privlm modules whose few ATen nodes are one registry op (fused pattern): class name -> record.
PATTERNS = {"LeakyReLU": "leaky_relu"}
_IGNORED = ("aten._assert_tensor_metadata.default",)


class UnsupportedOp(PrivlmError, ValueError):
    """The traced graph holds an op the registry lacks (the message names the op and the model)."""


@dataclass
class Trace:
    doc: dict  # the op graph (public)
    server: dict[str, np.ndarray]  # the server's private tensors (None values on the meta device)
    public: dict[str, np.ndarray]  # public constants


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, hf: bool):
        super().__init__()
        self.m, self.hf = model, hf

    def forward(self, idx):
        return self.m(input_ids=idx, use_cache=False).logits if self.hf else self.m(idx).logits


def _keep_table():
    table = torch.export.default_decompositions()
    for k in [k for k in table if k.name().split("::")[-1].split(".")[0] in KEEP]:
        del table[k]
    return table


def _is_hf(model) -> bool:
    return hasattr(getattr(model, "config", None), "model_type")


class _Normalized:
    """Within the block: HF formulas swapped for the one op the registry knows (RMSNorm written as
    pow/mean/rsqrt -> nn.RMSNorm; GPT-2's tanh-GELU formula -> nn.GELU(tanh)), sdpa attention; restored after."""

    def __init__(self, model):
        self.model, self.swaps, self.attn = model, [], None

    def __enter__(self):
        for name, mod in list(self.model.named_modules()):
            kind = type(mod).__name__
            new = None
            if kind.endswith("RMSNorm") and hasattr(mod, "weight"):
                eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
                new = nn.RMSNorm(mod.weight.shape, eps=eps, device=mod.weight.device, dtype=mod.weight.dtype)
                new.weight = mod.weight
            elif kind in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
                new = nn.GELU(approximate="tanh")
            elif kind == "GELUActivation":
                new = nn.GELU()
            elif kind == "SiLUActivation":
                new = nn.SiLU()
            if new is not None:
                parent, _, leaf = name.rpartition(".")
                owner = self.model.get_submodule(parent) if parent else self.model
                self.swaps.append((owner, leaf, mod))
                setattr(owner, leaf, new)
        cfg = self.model.config
        self.attn = getattr(cfg, "_attn_implementation", None)
        self.model.set_attn_implementation("sdpa")
        return self

    def __exit__(self, *exc):
        for owner, leaf, mod in reversed(self.swaps):
            setattr(owner, leaf, mod)
        if self.attn is not None:
            self.model.set_attn_implementation(self.attn)


def _scopes(model, hf: bool) -> tuple[str, str, str, str]:
    """(blocks prefix, attention leaf, mlp leaf, model name) of a privlm GPT or a supported HF family."""
    if hf:
        from privlm.hfmodel import family_of

        fam = family_of(model.config)
        return fam.blocks, fam.attn, fam.mlp, type(model).__name__
    return "blocks", "attn", "ffn", model.config.preset


def _where(path: str, blocks: str, attn: str, mlp: str, head_paths: set[str]) -> tuple[str, Optional[int]]:
    """Scope and layer of a module path (without the wrapper's 'm.')."""
    m = re.match(re.escape(blocks) + r"\.(\d+)(?:\.([^.]+))?", path)
    if m:
        part = {attn: "attn", mlp: "ffn"}.get(m.group(2) or "", "block")
        return part, int(m.group(1))
    if path in head_paths:
        return "lm_head", None
    return "final", None


def trace_model(model: nn.Module, T: int, name: Optional[str] = None) -> Trace:
    """The op graph of one forward pass of ``model`` over T tokens, with its server and public tensors.

    A model on the meta device gives the graph and shapes only (the census); its tensors are None."""
    hf = _is_hf(model)
    blocks, attn, mlp, default_name = _scopes(model, hf)
    name = name or default_name
    if hf:
        from privlm.hfmodel import check_length

        check_length(model.config, T)
        heads = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    else:
        if not 1 <= T <= model.config.block_size:
            raise UnsupportedOp(f"T={T} must be in 1..{model.config.block_size} (the position table "
                                f"model.block_size)")
        heads = {"lm_head"}
        from privlm.model.fold import fold_scales
        from privlm.model.hooks import HookPoint

        if any(isinstance(m, HookPoint) and m.requested for m in model.modules()):
            raise UnsupportedOp("trace: detach every hook first (a requested hook point changes the traced graph)")
        model = fold_scales(model)  # Eq. 8's alpha/beta into the server's weights (a copy; the user's model unchanged)
    device = next(model.parameters()).device
    meta = device.type == "meta"
    was_training = model.training
    model.eval()  # spectral norm runs power iterations in train mode; no dropout
    try:
        ctx = _Normalized(model) if hf else None
        if ctx is not None:
            ctx.__enter__()
        try:
            ids = torch.zeros(1, T, dtype=torch.long, device=device)
            with torch.no_grad(), warnings.catch_warnings():  # torch.export's own deprecation notices are not ours
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
                ep = torch.export.export(_Logits(model, hf), (ids,), strict=False).run_decompositions(_keep_table())
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    finally:
        model.train(was_training)
    return _to_doc(ep, ids, name, T, meta, lambda p: _where(p, blocks, attn, mlp, heads),
                   model.get_input_embeddings().num_embeddings if hf else model.config.vocab_size)


def is_hf_model(model) -> bool:
    """Whether ``model`` is a Hugging Face model (its config has a model_type) rather than a privlm `GPT`."""
    return _is_hf(model)


def hf_formulas(model):
    """Context manager: within it, HF formulas are swapped for the ops the registry knows and attention is sdpa
    (as `trace_model` does for the export); restored on exit."""
    return _Normalized(model)


def block_scopes(model) -> tuple[str, str, str, str]:
    """(blocks prefix, attention leaf, mlp leaf, model name) of a privlm GPT or a supported HF family."""
    return _scopes(model, _is_hf(model))


def export_trace(module: nn.Module, model: nn.Module, ids: torch.Tensor, name: str,
                 extra: Optional[list[tuple[str, str, torch.Tensor]]] = None) -> Trace:
    """`torch.export` of ``module`` (a wrapper holding ``model`` as its submodule ``m``, called with ``ids`` and the
    ``extra`` runtime inputs) with the registry's decomposition table, classified and written as `trace_model`
    does; T is the ids' length. ``extra``: (name, kind "secret" | "public", example) after the ids; with it the
    doc lists ``inputs`` and every output (`_to_doc`)."""
    hf = _is_hf(model)
    blocks, attn, mlp, _ = _scopes(model, hf)
    heads = ({n for n, m in model.named_modules() if m is model.get_output_embeddings()} if hf else {"lm_head"})
    vocab = model.get_input_embeddings().num_embeddings if hf else model.config.vocab_size
    args = (ids, *[x for _, _, x in (extra or [])])
    with torch.no_grad():
        ep = torch.export.export(module, args, strict=False).run_decompositions(_keep_table())
    return _to_doc(ep, ids, name, ids.shape[1], ids.device.type == "meta",
                   lambda p: _where(p, blocks, attn, mlp, heads), vocab, extra)


class _Recorder(torch.fx.Interpreter):
    def run_node(self, n):
        v = super().run_node(n)
        self.vals[n.name] = v
        return v


def _module_path(node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = path[2:] if path.startswith("m.") else ("" if path == "m" else path)
    return path, (kind if isinstance(kind, str) else kind.__name__).rpartition(".")[-1]


def _to_doc(ep, ids, name: str, T: int, meta: bool, where, vocab: int,
            extra: Optional[list[tuple[str, str, torch.Tensor]]] = None) -> Trace:
    """``extra``: the user inputs after the token ids, as (name, kind, example): kind ``secret`` (a secret
    runtime input, e.g. a KV cache kept in shares) or ``public`` (a public runtime input, e.g. the decode step's
    position). They are written as ``{"input": name}`` arguments and listed in ``doc["inputs"]``."""
    from torch.export.graph_signature import InputKind

    gm, sig = ep.graph_module, ep.graph_signature
    state = {**ep.state_dict, **ep.constants}
    cls: dict[str, str] = {}
    args = []
    user = iter([(None, "ids", ids), *(extra or [])])
    inputs: dict[str, tuple[str, str]] = {}  # placeholder -> (input name, kind) of the extra inputs
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            cls[spec.arg.name] = "client"
            in_name, kind, example = next(user)
            args.append(example)
            if kind != "ids":
                inputs[spec.arg.name] = (in_name, kind)
        else:  # parameters and persistent buffers (SN's u, v) are the server's; the rest is architecture
            mine = spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent)
            cls[spec.arg.name] = "server" if mine else "public"
            args.append(state[spec.target])
    vals: dict[str, Any] = {}
    if not meta:
        rec = _Recorder(gm, garbage_collect_values=False)
        rec.vals = vals
        with torch.no_grad():
            rec.run(*args)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            deps = {cls[a.name] for a in n.all_input_nodes}
            cls[n.name] = "client" if "client" in deps else "server" if "server" in deps else "public"

    server: dict[str, Any] = {}
    public: dict[str, Any] = {}
    shapes: dict[str, list[int]] = {}

    def value(node):
        if meta:
            v = node.meta.get("val")
            return v if not isinstance(v, torch.Tensor) else None
        return vals[node.name]

    def enc(a):
        if isinstance(a, torch.fx.Node):
            c = cls[a.name]
            if a.op == "placeholder" and c == "client":
                if a.name in inputs:
                    return {"input": inputs[a.name][0]}
                return {"onehot": True}  # the [B, T] ids: the client's one-hot [B, T, V] on the SPU side
            if c == "client":
                return {"ref": a.name}
            v = value(a)
            if v is not None and not isinstance(v, torch.Tensor):
                if c != "public":  # a weight-derived Python scalar would be written into the public graph
                    raise ValueError(f"trace: server value {a.name} would leak into the op graph")
                return v
            shape = list(a.meta["val"].shape)
            if c == "server" and not shape:  # a learned scalar (Eq. 8's beta): an SPU input of shape [1]
                shape = [1]
                v = None if v is None else v.reshape(1)
            if v is not None:
                v = v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().cpu().numpy()
                if c == "public" and v.dtype.kind == "f" and v.size and v.min() < -1e4:
                    v = np.maximum(v, MASK_VALUE).astype(v.dtype)  # -inf / finfo.min masks: fixed point can't hold them
            (server if c == "server" else public)[a.name] = v
            shapes[a.name] = shape
            return {c: a.name}
        if isinstance(a, (list, tuple)):
            return [enc(x) for x in a]
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return None
        return a

    nodes: list[dict] = []
    ids_nodes: set[str] = set()
    pattern_of: dict[str, tuple[str, str]] = {}  # node -> (module path, record) of a fused pattern
    for n in gm.graph.nodes:
        if n.op == "placeholder" and cls[n.name] == "client" and n.name not in inputs:
            ids_nodes.add(n.name)
        if n.op == "output":
            out = enc(n.args[0])
            outs = out if isinstance(out, list) else [out]
            out = outs[0]
            continue
        if n.op != "call_function" or cls[n.name] != "client" or str(n.target) in _IGNORED:
            continue
        path, kind = _module_path(n)
        scope, layer = where(path)
        op = str(n.target)
        node_args, kwargs = enc(list(n.args)), {k: enc(v) for k, v in n.kwargs.items()}
        if any(isinstance(a, torch.fx.Node) and a.name in ids_nodes for a in n.all_input_nodes):
            if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
                ids_nodes.add(n.name)  # a reshape of the ids: onehot.reshape(shape + [V]) on the SPU side
                op = "onehot_view"
            elif n.target == torch.ops.aten.embedding.default and n.args[1].name in ids_nodes:
                op, scope = "embedding_onehot", "embedding"
            else:
                raise UnsupportedOp(f"model {name}: the token ids reach {op}; only an embedding may read them")
        elif op == "aten.mul.Tensor" or op == "aten.div.Tensor":
            kinds = [next(iter(a)) if isinstance(a, dict) else "literal" for a in node_args]
            if kinds.count("ref") == 2 and op == "aten.mul.Tensor":
                op = "gate_product" if scope == "ffn" else "aten.mul.Tensor"
            elif "server" in kinds:
                op = "private_scale" if op == "aten.mul.Tensor" else "private_div"
            elif op == "aten.mul.Tensor" and scope == "attn" and "public" in kinds and "ref" in kinds:
                op = "rotary"  # q or k (or rotate_half of it) times a public cos/sin table
        if kind in PATTERNS:
            pattern_of[n.name] = (path, PATTERNS[kind])
        v = n.meta.get("val")
        rec = {"name": n.name, "op": op, "args": node_args, "kwargs": {k: v2 for k, v2 in kwargs.items() if v2 is not None},
               "shape": list(v.shape) if isinstance(v, torch.Tensor) else None, "scope": scope, "layer": layer}
        nodes.append(rec)
    nodes = _fuse_patterns(nodes, pattern_of)
    nodes = _fold_private_div(nodes, server, shapes, meta)
    for n in nodes:
        if n["op"] == "private_div":
            raise UnsupportedOp(f"model {name}: a division by a server value that does not fold into a linear "
                                f"({n['name']})")
    bad = unknown_ops(n["op"] for n in nodes)
    if bad:
        raise UnsupportedOp(f"model {name}: the traced graph holds {', '.join(bad)}, which the op registry "
                            f"(privlm.opregistry) has no kernel for")
    used = set()
    _collect(nodes, used)
    doc = {"format": TRACE_FORMAT, "model": name, "T": T, "vocab_size": vocab, "nodes": nodes, "output": out,
           "server": {k: shapes[k] for k in sorted(server) if k in used},
           "public": {k: shapes[k] for k in sorted(public) if k in used}}
    if extra is not None:  # runtime inputs beside the ids, and every output (the first is the logits)
        doc["inputs"] = {n: {"kind": k, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
                         for n, k, x in extra}
        doc["outputs"] = outs
    return Trace(doc, {k: server[k] for k in doc["server"]}, {k: public[k] for k in doc["public"]})


def _collect(a, used: set) -> None:
    if isinstance(a, dict):
        for k in ("server", "public"):
            if k in a:
                used.add(a[k])
        for v in a.values():
            if isinstance(v, (list, dict)):
                _collect(v, used)
    elif isinstance(a, list):
        for x in a:
            _collect(x, used)


def _refs(a) -> list[str]:
    if isinstance(a, dict):
        return [a["ref"]] if "ref" in a else [r for v in a.values() if isinstance(v, (list, dict)) for r in _refs(v)]
    if isinstance(a, list):
        return [r for x in a for r in _refs(x)]
    return []


def _fuse_patterns(nodes: list[dict], pattern_of: dict[str, tuple[str, str]]) -> list[dict]:
    """Replace the nodes of one module instance of a fused pattern (privlm's LeakyReLU: ge, mul, where) by one
    node of the pattern's record: args = the secret input, then the pattern's parameter (slope)."""
    out, i = [], 0
    while i < len(nodes):
        n = nodes[i]
        if n["name"] not in pattern_of:
            out.append(n)
            i += 1
            continue
        path, op = pattern_of[n["name"]]
        group = [n]
        while i + len(group) < len(nodes) and pattern_of.get(nodes[i + len(group)]["name"], (None,))[0] == path:
            group.append(nodes[i + len(group)])
        names = {g["name"] for g in group}
        inputs = [r for g in group for r in _refs(g["args"]) if r not in names]
        params = [a for g in group if g["op"] in ("private_scale", "aten.mul.Tensor") for a in g["args"]
                  if isinstance(a, dict) and ("server" in a or "public" in a) or isinstance(a, (int, float))]
        last = group[-1]
        out.append({**last, "op": op, "args": [{"ref": inputs[0]}, params[0] if params else 0.0], "kwargs": {}})
        i += len(group)
    return out


def _fold_private_div(nodes, server, shapes, meta) -> list[dict]:
    """x / s with s a server scalar and x the output of a linear used only here: scale that linear's weight and
    bias by 1/s on the server side (Eq. 8's 1/alpha), and the division becomes an alias."""
    users: dict[str, int] = {}
    for n in nodes:
        for r in _refs([n["args"], list(n["kwargs"].values())]):
            users[r] = users.get(r, 0) + 1
    by_name = {n["name"]: n for n in nodes}
    for n in nodes:
        if n["op"] != "private_div":
            continue
        x, s = n["args"]
        lin = by_name.get(x.get("ref")) if isinstance(x, dict) else None
        if lin is None or lin["op"] != "aten.linear.default" or users.get(lin["name"]) != 1 \
                or not isinstance(s, dict) or "server" not in s or np.prod(shapes[s["server"]]) != 1:
            continue
        new_args = list(lin["args"])
        for j in (1, 2):
            if j < len(new_args) and isinstance(new_args[j], dict) and "server" in new_args[j]:
                src = new_args[j]["server"]
                dst = f"{src}__div_{s['server']}"
                server[dst] = None if meta else (server[src] / server[s["server"]].reshape(())).astype(np.float32)
                shapes[dst] = shapes[src]
                new_args[j] = {"server": dst}
        lin["args"] = new_args
        n["op"], n["args"], n["kwargs"] = "aten.alias.default", [x], {}
    return nodes


def save_trace(trace: Trace, out_dir) -> None:
    """program.json and public.safetensors (public: both parties), server.safetensors (the server only)."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    from privlm.opschema import CONSTANTS_FILE, SERVER_FILE, TRACE_FILE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRACE_FILE).write_text(json.dumps(trace.doc))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in trace.server.items()}, str(out / SERVER_FILE))
    save_file({k: np.ascontiguousarray(v) for k, v in trace.public.items()}, str(out / CONSTANTS_FILE))
