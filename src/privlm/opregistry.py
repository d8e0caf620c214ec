"""The op registry of private inference: one record per op (or fused pattern) a traced model may contain.

In the spirit of transformers' ``ACT2FN``: one table that everything reads, instead of an if-chain per consumer.
For every op of the traced graph (`privlm.trace`, format `TRACE_FORMAT`) a record says

* ``census``      the nonlinear op it is in the census (`privlm.opschema.OP_TYPES`), or None (linear, free, shape op)
* ``count``       the element-count rule: (instances, per-instance shape) from the node's shapes
* ``flops``       the FLOP rule (2 per multiply-add, dense), for linear records
* ``kind``        the SPU step kind it is reported under (`privlm.opschema.STEP_KINDS`)
* ``kernel``      the kernel family of `privlm.spu.kernels.KERNELS`; each SPU profile picks one kernel of it
                  (``profile.kernels[record.kernel]``), so the kernel per profile is one lookup
* ``cost key``    the cost-profile key: the census op for nonlinear records, the linear kind (by where the node
                  sits: ffn / attn / embed_head) for linear ones

A record whose ``census`` is None and ``flops`` is None is free under 2PC's cost model (views, adds, products
with public constants) or a product with a server-private value that the census treats as free (SM(t)'s
temperature; Eq. 8's beta where a LayerNorm keeps it from being folded: docs/DECISIONS.md#traced-program). An op of a trace that has no record is refused
before any 2PC work (`unknown_ops`).

Imports only the standard library: the SPU environment (no torch) and the torch model both read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable, Optional

# (input shapes, output shape, literal args) -> (count, per-instance shape)
CountRule = Callable[[list, list, list], tuple[int, tuple[int, ...]]]
FlopRule = Callable[[list, list, list], int]


@dataclass(frozen=True)
class OpRecord:
    name: str  # the op name in the trace JSON (an ATen overload or a privlm pattern name)
    kind: str = "matmul"  # SPU step kind (STEP_KINDS); "free" for ops that stay inside a neighbour's step
    census: Optional[str] = None  # nonlinear census op, None for linear/free ops
    count: Optional[CountRule] = None
    flops: Optional[FlopRule] = None
    kernel: Optional[str] = None  # kernel family in privlm.spu.kernels.KERNELS (chosen per SPU profile)
    doc: str = ""

    @property
    def starts_step(self) -> bool:
        """Whether the SPU program cuts a new step (its own executable and link counters) at this op."""
        return self.kind != "free"


def _rows(shape) -> int:
    return prod(shape[:-1])


def _per_row(ins, out, lit):  # norms and activations: one op over the input without its batch dimension
    return 1, tuple(ins[0][1:])


def _per_head(ins, out, lit):  # softmax over [B, H, T, S]: H instances of T x S
    return out[-3], tuple(out[-2:])


def _sdpa_softmax(ins, out, lit):  # q [B, H, T, dk], k [B, Hkv, S, dk]: one T x S softmax per query head
    return ins[0][-3], (ins[0][-2], ins[1][-2])


def _linear_flops(ins, out, lit):  # x [.., din] @ W[dout, din]^T
    return 2 * _rows(ins[0]) * ins[0][-1] * ins[1][0]


def _matmul_flops(ins, out, lit):  # [.., M, K] @ [.., K, N]
    return 2 * prod(out) * ins[0][-1]


def _sdpa_flops(ins, out, lit):  # QK^T and AV: 2 x 2·B·H·T·S·dk
    q, k = ins[0], ins[1]
    return 4 * prod(q[:-1]) * k[-2] * q[-1]


def _onehot_flops(ins, out, lit):  # one-hot [T, V] @ table [V, d]
    return 2 * _rows(out) * ins[0][0] * out[-1]


def _rotary_count(ins, out, lit):  # x [B, H, T, r]: one rotation of H x r values per position
    return 1, (ins[0][-2], ins[0][-3] * ins[0][-1])


_FREE_ATEN = (
    "aten.add.Tensor", "aten.sub.Tensor", "aten.neg.default", "aten.view.default", "aten.reshape.default",
    "aten._unsafe_view.default", "aten.permute.default", "aten.transpose.int", "aten.t.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default", "aten.slice.Tensor",
    "aten.select.int", "aten.cat.default", "aten.split_with_sizes.default", "aten.split.Tensor",
    "aten.unbind.int", "<built-in function getitem>", "aten.clone.default", "aten.alias.default",
    "aten._to_copy.default", "aten.contiguous.default", "aten.dropout.default", "aten.repeat_interleave.self_int",
    "aten.mean.dim", "aten.sum.dim_IntList",
)

RECORDS: dict[str, OpRecord] = {r.name: r for r in [
    # linear: secret x private (a weight of the server) or secret x secret (two activations)
    OpRecord("aten.linear.default", "matmul", flops=_linear_flops,
             doc="x @ W^T + b, W private to the server: CHEETAH's secret x private product"),
    OpRecord("aten.matmul.default", "matmul", flops=_matmul_flops, doc="secret x secret product (two activations)"),
    OpRecord("aten.bmm.default", "matmul", flops=_matmul_flops, doc="secret x secret batched product"),
    OpRecord("aten.mm.default", "matmul", flops=_matmul_flops, doc="2-D product"),
    OpRecord("aten.addmm.default", "matmul", flops=lambda ins, out, lit: 2 * prod(out) * ins[1][-1],
             doc="b + x @ W (GPT-2's Conv1D), W private to the server"),
    OpRecord("embedding_onehot", "embedding", flops=_onehot_flops,
             doc="token lookup with secret ids: one-hot [T, V] @ private table [V, d]"),
    # attention
    OpRecord("aten.scaled_dot_product_attention.default", "softmax", "softmax", _sdpa_softmax, _sdpa_flops,
             kernel="softmax", doc="decomposed on the SPU side: QK^T·scale, causal mask (public, -100), the "
             "profile's softmax kernel per head, AV; GQA repeats the K/V heads"),
    OpRecord("aten.softmax.int", "softmax", "softmax", _per_head, kernel="softmax",
             doc="softmax over the last axis; an additive public mask is clamped to -100 first"),
    OpRecord("aten._softmax.default", "softmax", "softmax", _per_head, kernel="softmax"),
    # norms
    OpRecord("aten.layer_norm.default", "layernorm", "layernorm", _per_row, kernel="layernorm",
             doc="LayerNorm over the last axis; gain and bias private"),
    OpRecord("aten.rms_norm.default", "layernorm", "rmsnorm", _per_row, kernel="rmsnorm",
             doc="RMSNorm (LLaMA, Qwen2, Mistral); gain private"),
    # activations
    OpRecord("aten.gelu.default", "activation", "gelu", _per_row, kernel="gelu",
             doc="GELU: approximate='tanh' (GPT-2) uses the profile's gelu kernel; 'none' (exact erf) jax's erf-GELU"),
    OpRecord("aten.relu.default", "activation", "relu", _per_row, kernel="relu", doc="ReLU: one comparison"),
    OpRecord("leaky_relu", "activation", "leaky_relu", _per_row,
             doc="where(x >= 0, x, slope·x): one comparison, slope private to the server when learned"),
    OpRecord("aten.silu.default", "activation", "silu", _per_row, kernel="silu", doc="SiLU x·sigmoid(x)"),
    OpRecord("gate_product", "activation", "gate_product", _per_row, kernel="gate_product",
             doc="SwiGLU's act(gate) ⊙ up: a secret x secret elementwise product"),
    OpRecord("rotary", "activation", "rotary", _rotary_count,
             doc="x·cos + rotate_half(x)·sin with public cos/sin tables: secret x public products (their "
                 "truncations are the traffic), a step of its own so that its bytes are counted apart"),
    # products with a server-private value the census treats as free rescalings
    OpRecord("private_scale", "free",
             doc="secret x server-private elementwise product: SM(t)'s 1/t per head and position, Eq. 8's beta "
                 "when a LayerNorm reads the residual stream (otherwise folded: privlm.model.fold), "
                 "norm gains outside a norm op; free in the census (docs/DECISIONS.md#traced-program)"),
    OpRecord("aten.mul.Tensor", "free", doc="product with a public constant (or between two public values)"),
    OpRecord("aten.div.Tensor", "free", doc="division by a public constant"),
    OpRecord("onehot_view", "free", doc="a reshape of the secret token ids, applied to their one-hot form"),
    OpRecord("aten.where.self", "free", doc="select with a public predicate (the decode step writing its key/value "
             "row into the cache slot of a public position): local, no truncation"),
    *[OpRecord(n, "free") for n in _FREE_ATEN],
]}


@dataclass(frozen=True)
class Activation:
    """An FFN activation of privlm's config (``model.activation``) as the registry op the torch FFN computes."""

    op: str  # registry record
    kwargs: tuple[tuple[str, str], ...] = ()


# model.activation -> the op the torch FFN computes (None: linear FFN without activation). model/ffn.py
# builds its activation module from this table; the census and the SPU program read the traced op.
ACTIVATIONS: dict[str, Optional[Activation]] = {
    "gelu": Activation("aten.gelu.default", (("approximate", "tanh"),)),
    "gelu_erf": Activation("aten.gelu.default", (("approximate", "none"),)),
    "relu": Activation("aten.relu.default"),
    "leaky_relu": Activation("leaky_relu"),
    "silu": Activation("aten.silu.default"),
    "identity": None,
}


# transformers' activation modules (ACT2FN classes) of the supported families -> the registry op they compute.
HF_ACTIVATION_MODULES: dict[str, str] = {
    "GELUActivation": "aten.gelu.default", "NewGELUActivation": "aten.gelu.default", "GELUTanh": "aten.gelu.default",
    "PytorchGELUTanh": "aten.gelu.default", "FastGELUActivation": "aten.gelu.default", "GELU": "aten.gelu.default",
    "SiLUActivation": "aten.silu.default", "SiLU": "aten.silu.default", "ReLU": "aten.relu.default",
}


def unknown_ops(ops) -> list[str]:
    """The op names of a trace that have no record, sorted (empty when the registry covers the trace)."""
    return sorted({op for op in ops if op not in RECORDS})


def arg_shape(doc: dict, shapes: dict[str, list], a) -> Optional[list]:
    """The shape of one argument of a traced node (None for literals)."""
    if isinstance(a, dict):
        if "ref" in a:
            return shapes[a["ref"]]
        for k in ("server", "public"):
            if k in a:
                return doc[k][a[k]]
        if "onehot" in a:
            return [1, doc["T"], doc["vocab_size"]]
        if "input" in a:  # a runtime input beside the ids (the decode step's cache and position)
            return doc["inputs"][a["input"]]["shape"]
    return None


def measure(doc: dict, node: dict, shapes: dict[str, list]) -> tuple[Optional[str], int, Optional[tuple], int]:
    """(census op, instances, per-instance shape, FLOPs) of one node of a traced graph, by its record's rules."""
    rec = RECORDS[node["op"]]
    ins = [s for s in (arg_shape(doc, shapes, a) for a in node["args"]) if s is not None]
    lit = [a for a in node["args"] if not isinstance(a, (dict, list))]
    count, shape = rec.count(ins, node["shape"], lit) if rec.census and rec.count else (0, None)
    flops = int(rec.flops(ins, node["shape"], lit)) if rec.flops else 0
    return rec.census, count, shape, flops
