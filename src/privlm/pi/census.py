"""Nonlinear-op and FLOPs census of a model for the paper's private-inference workload.

Workload (SPEC §5.1): one output token after a T-token prompt, batch 1, embeddings and LM head included,
i.e. one forward pass over T positions. The census runs that forward pass through the *actual* modules
(on the meta device when it builds the model itself, so it costs no memory) and records:

* every nonlinear op the 2PC protocol must evaluate, from forward hooks on the modules that compute it:
  softmax from ``blocks.i.attn.hook_probs`` (one T x T matrix per head; the causally masked half counts,
  as in the paper's "H·L × R^{T×T}"), LayerNorm from every ``nn.LayerNorm`` (block LNs and the final
  ``ln_f`` are reported as separate entries, because the paper's "#Nonlinear Ops" lists only the 2L block
  LNs, SPEC §1.6 and §8 item 5), and the FFN activation from ``blocks.i.ffn.act`` (pruned or fused FFNs
  have none). SM(t)'s temperature divides each logit row by a server-side scalar, i.e. it is a free
  rescaling of the query (SPEC §1.7), and Eq. 8's alpha/beta are public scalars: neither is a nonlinear op.
* linear FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, dense), split
  by module into FFN, attention projections, the two T x T products (QK^T and AV) and LM head. The token
  embedding is a table lookup in plaintext but, with secret token ids, a one-hot [T x V] @ [V x d] product
  in 2PC, so it is counted as 2·T·V·d. Position embeddings are public and free. Bias adds are ignored.

Two FLOP conventions (SPEC §1.6):
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

# Op type -> the abbreviation of the paper's "#Nonlinear Ops" column.
OP_ABBREV: dict[str, str] = {"softmax": "SM", "layernorm": "LN", "gelu": "G", "relu": "R", "leaky_relu": "LR"}
OP_TYPES: tuple[str, ...] = tuple(OP_ABBREV)

# The T² coefficient (per layer, times d) of the paper's attention FLOPs (SPEC §1.6, empirical fit).
PAPER_T2_COEFF = 3
PAPER_T2_COEFF_NO_VALUE = 2  # He & Hofmann "SOTA" blocks without the value/output projections


@dataclass(frozen=True)
class NonlinearOp:
    """``count`` instances of op ``op``, each over a tensor of ``shape`` (per sequence, batch 1)."""

    op: str  # one of OP_TYPES
    count: int
    shape: tuple[int, ...]
    where: str  # "attention" | "block" | "ffn" | "final"
    in_paper: bool  # listed in the paper's "#Nonlinear Ops" (False only for the final ln_f)

    @property
    def elements(self) -> int:
        n = self.count
        for s in self.shape:
            n *= s
        return n

    def label(self) -> str:
        name = OP_ABBREV[self.op] + ("(ln_f)" if self.where == "final" else "")
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
        """The paper's attention FLOPs: projections + attn_t2_coeff·L·T²·d (SPEC §1.6)."""
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
                "attn_t2_coeff": self.attn_t2_coeff, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------
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
    or a preset name (built on the meta device: nothing is allocated).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from privlm.model import GPT

    model, cfg = _resolve(model_or_config)
    if not isinstance(T, int) or T <= 0:
        raise ConfigError(f"T={T} must be a positive integer (the prompt length)")
    if T > cfg.block_size:
        raise ConfigError(f"T={T} is larger than the position table model.block_size={cfg.block_size}; "
                          f"use T<={cfg.block_size} or set model.block_size")
    if model is None:
        with torch.device("meta"):
            model = GPT(cfg)
    device = next(model.parameters()).device

    records: list[tuple[str, str, tuple[int, ...], str]] = []  # (op, module name, per-instance shape, where)
    embed_flops = 0
    handles = []

    def on_probs(name):
        def hook(_m, _inp, out):  # [B, H, T, T]: one softmax per head
            for _ in range(out.shape[1]):
                records.append(("softmax", name, tuple(out.shape[-2:]), "attention"))
        return hook

    def on_norm(name):
        where = "block" if name.startswith("blocks.") else "final"

        def hook(_m, inp, _out):
            records.append(("layernorm", name, tuple(inp[0].shape[1:]), where))
        return hook

    def on_act(name, op):
        def hook(_m, inp, _out):
            records.append((op, name, tuple(inp[0].shape[1:]), "ffn"))
        return hook

    def on_embedding(_m, inp, _out):
        nonlocal embed_flops  # one-hot [T x V] @ [V x d] under 2PC with secret token ids
        embed_flops += 2 * inp[0].numel() * _m.num_embeddings * _m.embedding_dim

    for name, module in model.named_modules():
        if name.endswith("attn.hook_probs"):
            handles.append(module.register_forward_hook(on_probs(name)))
        elif isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(on_norm(name)))
        elif name.endswith("ffn.act"):
            op = _activation_op(module)
            if op is not None:
                handles.append(module.register_forward_hook(on_act(name, op)))
        elif name == "wte":
            handles.append(module.register_forward_hook(on_embedding))

    idx = torch.zeros(1, T, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # no dropout: the pass must not consume the caller's RNG state
    try:
        with torch.no_grad(), counter:
            # output_attentions routes attention through the explicit softmax so hook_probs fires
            model(idx, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    flops = _split_flops(counter.get_flop_counts())
    flops["embedding"] = embed_flops
    ops = _group(records)
    has_ffn = sum(1 for b in model.blocks if b.ffn is not None)
    notes = []
    if cfg.attn_temperature:
        notes.append("SM(t): the temperature rescales each query row by a server-side scalar (free, SPEC §1.7)")
    if any(o.where == "final" for o in ops):
        notes.append("ln_f is listed separately; the paper's #Nonlinear Ops counts only the 2L block LNs")
    return Census(arch=cfg.preset, T=T, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                  vocab_size=cfg.vocab_size, ffn_layers=has_ffn, ops=ops, flops=flops, notes=notes)


def _activation_op(module: nn.Module) -> Optional[str]:
    from privlm.model.ffn import GELUTanh, LeakyReLU

    if isinstance(module, (GELUTanh, nn.GELU)):
        return "gelu"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, LeakyReLU):
        return "leaky_relu"
    if isinstance(module, nn.Identity):
        return None  # linear-only FFN (ScFFN): no activation to evaluate
    raise TypeError(f"census: unknown FFN activation module {type(module).__name__}; add it to _activation_op")


def _split_flops(counts: dict[str, dict]) -> dict[str, int]:
    """Split FlopCounterMode's per-module counts into ffn / attn_proj / attn_scores / lm_head."""
    out = {"ffn": 0, "attn_proj": 0, "attn_scores": 0, "lm_head": 0}
    for name, by_op in counts.items():
        parts = name.split(".")
        # module names are "GPT.blocks.3.attn" etc.; count each op only at its deepest owner we care about
        if len(parts) == 4 and parts[1] == "blocks" and parts[3] == "ffn":
            out["ffn"] += sum(by_op.values())
        elif len(parts) == 4 and parts[1] == "blocks" and parts[3] == "attn":
            for op, n in by_op.items():
                key = "attn_scores" if "bmm" in str(op) or "matmul" in str(op) else "attn_proj"
                out[key] += n
        elif len(parts) == 2 and parts[1] == "lm_head":
            out["lm_head"] += sum(by_op.values())
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
    return sorted(ops, key=lambda o: (order[o.op], where_order[o.where], o.shape))


def simplified_block_census(base: Census) -> Census:
    """He & Hofmann (2024) simplified blocks, the "SOTA" rows of AERO's tables (SPEC §7.1).

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
