"""Nonlinear-op and FLOPs census of a model for the paper's private-inference workload.

Workload (docs/DECISIONS.md#private-inference-cost-model): one output token after a T-token prompt, batch 1, embeddings and LM head included,
i.e. one forward pass over T positions. The census runs that forward pass through the *actual* modules
(on the meta device when it builds the model itself, so it costs no memory) and records:

* every nonlinear op the 2PC protocol must evaluate, from forward hooks on the modules that compute it:
  softmax from ``blocks.i.attn.hook_probs`` (one T x T matrix per head; the causally masked half counts,
  as in the paper's "H·L × R^{T×T}"), LayerNorm from every ``nn.LayerNorm`` (block LNs and the final
  ``ln_f`` are reported as separate entries, because the paper's "#Nonlinear Ops" lists only the 2L block
  LNs; docs/DECISIONS.md#final-layernorm-ln_f), and the FFN activation from ``blocks.i.ffn.act`` (pruned or fused FFNs
  have none). SM(t)'s temperature divides each logit row by a server-side scalar, i.e. it is a free
  rescaling of the query (docs/DECISIONS.md#learnable-temperature-smt), and Eq. 8's alpha/beta are public scalars: neither is a nonlinear op.
* linear FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, dense), split
  by module into FFN, attention projections, the two T x T products (QK^T and AV) and LM head. The token
  embedding is a table lookup in plaintext but, with secret token ids, a one-hot [T x V] @ [V x d] product
  in 2PC, so it is counted as 2·T·V·d. Position embeddings are public and free. Bias adds are ignored.

Hugging Face causal LMs of the supported families (`privlm.hfmodel.FAMILIES`) are walked the same way
(`_hf_census`): their norms (LayerNorm or RMSNorm), MLP activation (GELU, SiLU), the SwiGLU gate's
secret x secret product, rotary embeddings (secret x public, listed outside the "#Nonlinear Ops" cell) and
one softmax per query head; the cost assumption of each new op is in docs/pi-cost.md.

Two FLOP conventions (docs/pi-cost.md#two-flop-conventions):
``dense``  what the forward pass executes: attention = 8·L·T·d² (Q, K, V, O) + 4·L·T²·d (QK^T and AV).
``paper``  what the paper's tables print: FFN identical, attention = projections + 3·L·T²·d. The T² term is
           an empirical fit of every printed value (the paper gives no formula); the He & Hofmann rows
           (no V/O projections) fit 2·L·T²·d instead, see `simplified_block_census`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from privlm.config import Config, ConfigError, ModelConfig, load_config
from privlm.opschema import OP_ABBREV, OP_TYPES

# The T² coefficient (per layer, times d) of the paper's attention FLOPs (docs/pi-cost.md#two-flop-conventions, empirical fit).
PAPER_T2_COEFF = 3
PAPER_T2_COEFF_NO_VALUE = 2  # He & Hofmann "SOTA" blocks without the value/output projections


@dataclass(frozen=True)
class NonlinearOp:
    """``count`` instances of op ``op``, each over a tensor of ``shape`` (per sequence, batch 1)."""

    op: str  # one of OP_TYPES
    count: int
    shape: tuple[int, ...]
    where: str  # "attention" | "block" | "ffn" | "final"
    in_paper: bool  # belongs in the "#Nonlinear Ops" column (False for the final norm and rotary embeddings)

    @property
    def elements(self) -> int:
        n = self.count
        for s in self.shape:
            n *= s
        return n

    def label(self) -> str:
        name = OP_ABBREV[self.op] + (("(ln_f)" if self.op == "layernorm" else "(final)") if self.where == "final" else "")
        return f"{name}:{self.count}×R^{{{'×'.join(map(str, self.shape))}}}"

    def to_dict(self) -> dict:
        return {"op": self.op, "count": self.count, "shape": list(self.shape), "where": self.where,
                "in_paper": self.in_paper, "elements": self.elements}


@dataclass
class Census:
    """Result of `census`. FLOPs are plain counts (not GFLOPs)."""

    arch: str
    T: int
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    ffn_layers: int  # blocks that still have an FFN
    ops: list[NonlinearOp]
    flops: dict[str, int]  # dense: ffn, attn_proj, attn_scores, embedding, lm_head
    attn_t2_coeff: int = PAPER_T2_COEFF  # paper convention's T² coefficient
    notes: list[str] = field(default_factory=list)
    n_kv_head: Optional[int] = None  # key/value heads when fewer than n_head (grouped-query attention)

    # --- FLOPs ---------------------------------------------------------------------------
    @property
    def ffn_flops(self) -> int:
        return self.flops["ffn"]

    @property
    def attn_flops(self) -> int:
        """Dense attention FLOPs: projections + both T x T products."""
        return self.flops["attn_proj"] + self.flops["attn_scores"]

    @property
    def paper_attn_flops(self) -> int:
        """The paper's attention FLOPs: projections + attn_t2_coeff·L·T²·d (docs/pi-cost.md#two-flop-conventions)."""
        return self.flops["attn_proj"] + self.attn_t2_coeff * self.n_layer * self.T ** 2 * self.n_embd

    @property
    def embed_head_flops(self) -> int:
        return self.flops["embedding"] + self.flops["lm_head"]

    def flops_by(self, convention: str = "dense") -> dict[str, int]:
        """{"ffn", "attn", "embed_head", "total"} under convention "dense" or "paper"."""
        if convention not in ("dense", "paper"):
            raise ValueError(f"unknown FLOP convention '{convention}'; use dense or paper")
        attn = self.attn_flops if convention == "dense" else self.paper_attn_flops
        out = {"ffn": self.ffn_flops, "attn": attn, "embed_head": self.embed_head_flops}
        out["total"] = sum(out.values())
        return out

    # --- nonlinear ops -------------------------------------------------------------------
    def elements(self, op: str, paper_only: bool = False) -> int:
        return sum(o.elements for o in self.ops if o.op == op and (o.in_paper or not paper_only))

    def nonlinear_label(self, paper_only: bool = True) -> str:
        """The "#Nonlinear Ops" cell, e.g. 'SM:144×R^{128×128}, LN:24×R^{128×768}, G:12×R^{128×3072}'."""
        ops = [o for o in self.ops if o.in_paper or not paper_only]
        return ", ".join(o.label() for o in ops) if ops else "none"

    def to_dict(self) -> dict:
        return {"arch": self.arch, "T": self.T, "n_layer": self.n_layer, "n_head": self.n_head,
                "n_embd": self.n_embd, "vocab_size": self.vocab_size, "ffn_layers": self.ffn_layers,
                "nonlinear": [o.to_dict() for o in self.ops], "flops_dense": self.flops_by("dense"),
                "flops_paper": self.flops_by("paper"), "flops_detail": dict(self.flops),
                "attn_t2_coeff": self.attn_t2_coeff, "notes": list(self.notes), "n_kv_head": self.n_kv_head}


# ----------------------------------------------------------------------------------------
def _is_hf_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and hasattr(getattr(obj, "config", None), "model_type")


def _resolve(model_or_config: Any) -> tuple[Optional[nn.Module], ModelConfig]:
    from privlm.model import GPT

    if isinstance(model_or_config, GPT):
        return model_or_config, model_or_config.config
    if isinstance(model_or_config, Config):
        return None, model_or_config.model
    if isinstance(model_or_config, ModelConfig):
        return None, model_or_config
    if isinstance(model_or_config, str):
        return None, load_config(model_or_config).model
    raise TypeError(f"census() takes a GPT, ModelConfig, Config or preset name, not {type(model_or_config).__name__}")


def census(model_or_config: Any, T: int = 128) -> Census:
    """Count the nonlinear ops and linear FLOPs of one forward pass over T tokens (the paper's workload).

    ``model_or_config``: a `GPT` (its own modules are walked, on its device), a `ModelConfig`, a `Config`
    or a preset name (built on the meta device: nothing is allocated); or a Hugging Face causal LM of a
    family in `privlm.hfmodel.FAMILIES`, given as a model or as a directory / ``hf:<id>`` (then built from
    its config on the meta device).
    """
    from privlm.model import GPT

    if isinstance(model_or_config, str):
        from privlm.hfmodel import build_model, is_hf_spec, load_config

        if is_hf_spec(model_or_config):
            model_or_config = build_model(load_config(model_or_config)[0])
    if _is_hf_model(model_or_config):
        return _hf_census(model_or_config, T)
    model, cfg = _resolve(model_or_config)
    if not isinstance(T, int) or T <= 0:
        raise ConfigError(f"T={T} must be a positive integer (the prompt length)")
    if T > cfg.block_size:
        raise ConfigError(f"T={T} is larger than the position table model.block_size={cfg.block_size}; "
                          f"use T<={cfg.block_size} or set model.block_size")
    if model is None:
        with torch.device("meta"):
            model = GPT(cfg)
    kinds = {f"blocks.{i}.{part}": part for i, b in enumerate(model.blocks)
             for part in ("attn", "ffn") if getattr(b, part) is not None}
    walk = _Walk(model, T, {**kinds, "lm_head": "lm_head"})
    for name, module in model.named_modules():
        if name.endswith("attn.hook_probs"):
            walk.on_output(module, name, "softmax", "attention", per_head=True)
        elif isinstance(module, nn.LayerNorm):
            walk.on_input(module, name, "layernorm", "block" if name.startswith("blocks.") else "final")
        elif name.endswith("ffn.act"):
            op = _activation_op(module, cfg.activation)
            if op is not None:
                walk.on_input(module, name, op, "ffn")
        elif name == "wte":
            walk.on_embedding(module)
    # output_attentions routes attention through the explicit softmax so hook_probs fires
    flops, ops = walk.run(lambda idx: model(idx, output_attentions=True))
    has_ffn = sum(1 for b in model.blocks if b.ffn is not None)
    notes = []
    if cfg.attn_temperature:
        notes.append("SM(t): the temperature rescales each query row by a server-side scalar (free, docs/DECISIONS.md#learnable-temperature-smt)")
    if any(o.where == "final" for o in ops):
        notes.append("ln_f is listed separately; the paper's #Nonlinear Ops counts only the 2L block LNs")
    return Census(arch=cfg.preset, T=T, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                  vocab_size=cfg.vocab_size, ffn_layers=has_ffn, ops=ops, flops=flops, notes=notes)


class _Walk:
    """One census forward pass: forward hooks record nonlinear ops, FlopCounterMode counts FLOPs per module.

    ``kinds`` maps module names (relative to ``model``) to "attn", "ffn" or "lm_head", the owners the FLOPs
    are split by; the attention's matmul-type products (QK^T, AV) are its T x T scores, its mm/addmm its
    projections.
    """

    def __init__(self, model: nn.Module, T: int, kinds: dict[str, str]):
        self.model, self.T, self.kinds = model, T, kinds
        self.records: list[tuple[str, str, tuple[int, ...], str]] = []  # (op, module, per-instance shape, where)
        self.embed_flops = 0
        self.handles = []

    def record(self, op: str, name: str, shape: tuple[int, ...], where: str, count: int = 1) -> None:
        self.records += [(op, name, tuple(shape), where)] * count

    def on_input(self, module: nn.Module, name: str, op: str, where: str) -> None:
        """One op over the module's input, per sequence (norms, activations)."""
        self.handles.append(module.register_forward_hook(
            lambda _m, inp, _out: self.record(op, name, inp[0].shape[1:], where)))

    def on_output(self, module: nn.Module, name: str, op: str, where: str, per_head: bool = False) -> None:
        """One op over the module's output per sequence; ``per_head``: [B, H, T, T] is H ops over T x T."""
        def hook(_m, _inp, out):
            if per_head:
                self.record(op, name, out.shape[-2:], where, count=out.shape[1])
            else:
                self.record(op, name, out.shape[1:], where)
        self.handles.append(module.register_forward_hook(hook))

    def on_embedding(self, module: nn.Embedding) -> None:
        def hook(m, inp, _out):  # one-hot [T x V] @ [V x d] under 2PC with secret token ids
            self.embed_flops += 2 * inp[0].numel() * m.num_embeddings * m.embedding_dim
        self.handles.append(module.register_forward_hook(hook))

    def run(self, forward) -> tuple[dict[str, int], list[NonlinearOp]]:
        from torch.utils.flop_counter import FlopCounterMode

        model = self.model
        idx = torch.zeros(1, self.T, dtype=torch.long, device=next(model.parameters()).device)
        counter = FlopCounterMode(display=False)
        was_training = model.training
        model.eval()  # no dropout: the pass must not consume the caller's RNG state
        try:
            with torch.no_grad(), counter:
                forward(idx)
        finally:
            for h in self.handles:
                h.remove()
            model.train(was_training)
        flops = _split_flops(counter.get_flop_counts(), self.kinds)
        flops["embedding"] = self.embed_flops
        return flops, _group(self.records)


def _hf_census(model: nn.Module, T: int) -> Census:
    """The census of a Hugging Face causal LM, walked like a privlm model: norms (LayerNorm or RMSNorm) and
    the MLP activation from forward hooks on their modules, the SwiGLU gate's elementwise product from the
    MLP's ``up_proj`` output (the tensor it multiplies), rotary embeddings from the cos/sin tables each
    attention layer receives, and one softmax per query head from the attention probabilities the eager
    attention returns."""
    from privlm.hfmodel import check_length, family_of, shape_of

    config = model.config
    family, shape = family_of(config), shape_of(config)
    check_length(config, T)
    n_head, n_kv = shape["n_head"], shape["n_kv_head"]
    blocks = family.blocks + "."
    head = model.get_output_embeddings()
    kinds = {name: "lm_head" for name, m in model.named_modules() if m is head}
    for i in range(shape["n_layer"]):
        kinds[f"{blocks}{i}.{family.attn}"] = "attn"
        kinds[f"{blocks}{i}.{family.mlp}"] = "ffn"
    walk = _Walk(model, T, kinds)

    def on_rotary(name):
        def hook(_m, _args, kwargs, _out):  # cos/sin [B, T, rotary dims], applied to every q and k head
            emb = kwargs.get("position_embeddings")
            if emb is not None:
                walk.record("rotary", name, (emb[0].shape[-2], (n_head + n_kv) * emb[0].shape[-1]), "attention")
        return hook

    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            op = "layernorm" if isinstance(module, nn.LayerNorm) else "rmsnorm"
            walk.on_input(module, name, op, "block" if name.startswith(blocks) else "final")
        elif not name.startswith(blocks):
            continue
        elif leaf in ("act", "act_fn") and parent.endswith("." + family.mlp):
            op = _activation_op(module)
            if op is not None:
                walk.on_input(module, name, op, "ffn")
        elif leaf == family.mlp and hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            walk.on_output(module.up_proj, name + ".up_proj", "gate_product", "ffn")
        elif leaf == family.attn:
            walk.handles.append(module.register_forward_hook(on_rotary(name), with_kwargs=True))
    walk.on_embedding(model.get_input_embeddings())

    def forward(idx):
        out = model(input_ids=idx, output_attentions=True)
        for layer, probs in enumerate(out.attentions):  # [B, H, T, T]: one softmax per query head
            walk.record("softmax", f"{blocks}{layer}.{family.attn}", probs.shape[-2:], "attention",
                        count=probs.shape[1])
        return out

    flops, ops = walk.run(forward)
    ops = [dataclasses.replace(o, in_paper=False) if o.op == "rotary" else o for o in ops]
    notes = []
    if any(o.where == "final" for o in ops):
        notes.append("the final norm is listed separately, as ln_f is for privlm models")
    if n_kv != n_head:
        notes.append(f"grouped-query attention: {n_head} query heads share {n_kv} key/value heads (smaller K/V "
                     f"projections in the FLOPs; one softmax per query head)")
    if any(o.op == "rotary" for o in ops):
        notes.append("rotary embeddings: q and k times public cos/sin tables (no secret x secret product, no "
                     "comparison; each product needs a fixed-point truncation under 2PC, docs/pi-cost.md)")
    if not shape["tied"]:
        notes.append("untied LM head: its own V x d matrix (same FLOPs as a tied head, more parameters)")
    return Census(arch=type(model).__name__, T=T, n_layer=shape["n_layer"], n_head=n_head, n_embd=shape["n_embd"],
                  vocab_size=shape["vocab_size"], ffn_layers=shape["n_layer"], ops=ops, flops=flops, notes=notes,
                  n_kv_head=n_kv if n_kv != n_head else None)


def _activation_op(module: nn.Module, activation: Optional[str] = None) -> Optional[str]:
    """The census op of an FFN activation module, from the op registry: a privlm model's by its config's
    ``model.activation`` (`privlm.opregistry.ACTIVATIONS`), a Hugging Face one by its module class
    (`privlm.opregistry.HF_ACTIVATION_MODULES`, what the trace swaps in)."""
    from privlm.opregistry import ACTIVATIONS, HF_ACTIVATION_MODULES, RECORDS

    if activation is not None:
        spec = ACTIVATIONS[activation]
        return None if spec is None else RECORDS[spec.op].census
    if isinstance(module, nn.Identity):
        return None  # linear-only FFN (ScFFN): no activation to evaluate
    op = HF_ACTIVATION_MODULES.get(type(module).__name__)
    if op is None:
        raise TypeError(f"census: unknown FFN activation module {type(module).__name__}; add it to "
                        f"privlm.opregistry.HF_ACTIVATION_MODULES")
    return RECORDS[op].census


def _split_flops(counts: dict[str, dict], kinds: dict[str, str]) -> dict[str, int]:
    """Split FlopCounterMode's per-module counts (keys "<RootClass>.<module name>") into ffn / attn_proj /
    attn_scores / lm_head by the owners in ``kinds``; every FLOP must land in one of them."""
    out = {"ffn": 0, "attn_proj": 0, "attn_scores": 0, "lm_head": 0}
    for name, by_op in counts.items():
        kind = kinds.get(name.split(".", 1)[1] if "." in name else None)
        if kind == "attn":
            for op, n in by_op.items():
                key = "attn_scores" if "bmm" in str(op) or "matmul" in str(op) else "attn_proj"
                out[key] += n
        elif kind is not None:
            out[kind] += sum(by_op.values())
    total = sum(sum(v.values()) for k, v in counts.items() if k == "Global")
    if total != sum(out.values()):
        raise RuntimeError(f"census: {total - sum(out.values())} FLOPs outside ffn/attn/lm_head; update _split_flops")
    return {k: int(v) for k, v in out.items()}


def _group(records: list[tuple[str, str, tuple[int, ...], str]]) -> list[NonlinearOp]:
    """Merge identical (op, shape, where) records into counted entries, in paper column order."""
    counts: dict[tuple[str, tuple[int, ...], str], int] = {}
    for op, _name, shape, where in records:
        counts[(op, shape, where)] = counts.get((op, shape, where), 0) + 1
    ops = [NonlinearOp(op, n, shape, where, where != "final") for (op, shape, where), n in counts.items()]
    return sort_ops(ops)


def sort_ops(ops: list[NonlinearOp]) -> list[NonlinearOp]:
    """Paper column order: softmax, LayerNorm, activation; the final ln_f after the block LNs."""
    order = {op: i for i, op in enumerate(OP_TYPES)}
    where_order = {"attention": 0, "block": 1, "ffn": 2, "final": 3}
    return sorted(ops, key=lambda o: (o.op == "rotary", order[o.op], where_order[o.where], o.shape))


def simplified_block_census(base: Census) -> Census:
    """He & Hofmann (2024) simplified blocks, the "SOTA" rows of AERO's tables (docs/pi-cost.md#the-he--hofmann-sota-rows).

    Not a privlm preset: derived from the census of the matching LN-free privlm model (SM+ScFFN or
    SM+ScFuFFN[^iK]) by removing the value and output projections (2 of the 4 d x d attention matmuls,
    and the paper's T² coefficient drops from 3 to 2) and adding the single LayerNorm over T x d that the
    tables list. Used as feature rows for the cost fit and the table comparisons.
    """
    if any(o.op == "layernorm" and o.in_paper for o in base.ops):
        raise ValueError("simplified_block_census expects an LN-free base model (SM+ScFFN / SM+ScFuFFN)")
    flops = dict(base.flops)
    flops["attn_proj"] = base.flops["attn_proj"] // 2
    flops["attn_scores"] = base.flops["attn_scores"]  # QK^T and the mixing of the (unprojected) values stay
    ops = [o for o in base.ops if o.where != "final"]
    ops = sort_ops(ops + [NonlinearOp("layernorm", 1, (base.T, base.n_embd), "block", True)])
    return dataclasses.replace(base, arch=f"SOTA {base.arch}", ops=ops, flops=flops,
                               attn_t2_coeff=PAPER_T2_COEFF_NO_VALUE,
                               notes=base.notes + ["He & Hofmann simplified block: no V/O projections, one LN"])


# ----------------------------------------------------------------------------------------
def trace_ops_flops(doc: dict) -> tuple[list[NonlinearOp], dict[str, int]]:
    """The nonlinear ops and linear FLOPs of a traced op graph (`privlm.trace`, format privlm-trace/1), by the
    op registry's element-count and FLOP rules: the census of the model the graph was traced from."""
    from privlm.opregistry import RECORDS, measure, unknown_ops

    bad = unknown_ops(n["op"] for n in doc["nodes"])
    if bad:
        raise ValueError(f"model {doc.get('model')}: no op-registry record for {', '.join(bad)}")
    shapes = {n["name"]: n["shape"] for n in doc["nodes"]}
    records: list[tuple[str, str, tuple[int, ...], str]] = []
    rotary: dict = {}
    flops = {"ffn": 0, "attn_proj": 0, "attn_scores": 0, "embedding": 0, "lm_head": 0}
    for n in doc["nodes"]:
        rec = RECORDS[n["op"]]
        op, count, shape, f = measure(doc, n, shapes)
        if op == "rotary":  # x·cos and rotate_half(x)·sin of q and k: one rotation of (H + H_kv)·r per position
            rotary[n["layer"]] = (shape[0], rotary.get(n["layer"], (0, 0))[1] + shape[1] * count)
        elif op is not None:
            where = ("attention" if rec.census in ("softmax", "rotary") else
                     "ffn" if rec.kind == "activation" else "final" if n["layer"] is None else "block")
            records += [(rec.census, n["name"], tuple(shape), where)] * count
        if rec.flops is not None:
            scope = n["scope"]
            key = ("embedding" if scope == "embedding" else "lm_head" if scope == "lm_head" else "ffn" if scope == "ffn"
                   else "attn_proj" if rec.name in ("aten.linear.default", "aten.addmm.default") else "attn_scores")
            flops[key] += int(f)
    for layer, (t, width) in rotary.items():
        records.append(("rotary", f"layer{layer}", (t, width // 2), "attention"))
    ops = [dataclasses.replace(o, in_paper=False) if o.op == "rotary" else o for o in _group(records)]
    return ops, flops
