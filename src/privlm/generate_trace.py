"""The two traced programs of private text generation with a key/value cache (`privlm pi generate`).

``trace_generation(model, P, C)`` exports two op graphs of one causal LM (privlm `GPT`, Hugging Face GPT-2 or
a LLaMA-family model) with ``torch.export``, through the same classification as `privlm.trace` (client / server /
public; server tensors folded, never written into the graph):

``prefill``  the prompt's P tokens (the client's one-hot ids) -> the logits of every position (the SPU program
             computes only the last) and, for every layer, the keys and values of the P positions padded with
             zeros to the capacity C: outputs ``[logits, k0, v0, k1, v1, ...]``, each cache tensor [1, Hkv, C, dk]
``decode``   one new token (one-hot), the cache of every layer (secret runtime inputs ``k<i>``/``v<i>``, the
             previous step's outputs, kept as shares) and three public runtime inputs that say where the token
             sits: ``sel`` [1, C] (float one-hot of its position t), ``slot`` [C] (bool, the same one-hot: the cache
             row it is written to) and ``bias`` [C] (additive attention mask: 0 for positions <= t, MASK_VALUE
             beyond) -> ``[logits, k0', v0', ...]``

The decode graph has one shape for every position below C, so the SPU compiles it once per (P, C), not per
token. How the position enters: a learned position table (privlm, GPT-2) and SM(t)'s temperature are selected by
``sel @ table[:C]`` (a public x server product), LLaMA's rotary cos/sin by ``sel @ table[:C]`` (public x public),
and the new key/value row is written by ``where(slot, new, cache)`` (a select with a public predicate: local,
no truncation). The attention of the decode step is one query row over the C cache rows, explicit
(q K^T * scale + bias, softmax, AV), so the registry sees its products and softmax as for any trace.

The model's own forward runs unchanged around its attention modules: during the export each attention module
is swapped for `_CachedAttention` (and, for the decode step, privlm's position table for `_SelectedPositions`).
docs/DECISIONS.md#private-generation.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from privlm.opschema import MASK_VALUE
from privlm.trace import Trace, UnsupportedOp, block_scopes, export_trace, hf_formulas, is_hf_model


@dataclass
class GenerationTraces:
    prefill: Trace
    decode: Optional[Trace]  # None when C == P (one new token: no step feeds a token back)
    P: int
    C: int


class _State:
    """What the swapped modules read during one export: the decode step's public inputs and caches, and the
    list the attention modules append their padded K/V to."""

    def __init__(self, C: int):
        self.C = C
        self.decode = False
        self.sel = self.slot = self.bias = None
        self.cache: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []


def _pad(x: torch.Tensor, C: int) -> torch.Tensor:
    """[1, H, n, dk] -> [1, H, C, dk] with zero rows (a public constant: the concatenation is local)."""
    n = x.shape[-2]
    if n == C:
        return x
    return torch.cat([x, torch.zeros(*x.shape[:-2], C - n, x.shape[-1], dtype=x.dtype, device=x.device)], dim=-2)


class _CachedAttention(nn.Module):
    """One attention module of the exported model: the projections of the original module, then either causal
    attention over the prompt (prefill) or one query over the cache (decode); records K/V."""

    def __init__(self, orig: nn.Module, index: int, state: _State, hf: bool, rotary=None):
        super().__init__()
        self.orig, self.index, self.state, self.hf = orig, index, state, hf
        if rotary is not None:  # LLaMA: cos/sin of positions 0..C-1 (public: the architecture only)
            cos, sin = rotary
            self.register_buffer("cos_table", cos, persistent=False)
            self.register_buffer("sin_table", sin, persistent=False)

    def _qkv(self, x, position_embeddings):
        if not self.hf:
            q, k, v = self.orig._qkv(x)  # [1, H, n, dk]
            return q, k, v
        o = self.orig
        if hasattr(o, "query_key_value"):  # GPT-NeoX: one projection, q/k/v interleaved per head; rotary below
            qkv = o.query_key_value(x).view(*x.shape[:-1], -1, 3 * o.head_size).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
        elif hasattr(o, "c_attn"):  # GPT-2: one Conv1D for q, k, v; learned positions (swapped like privlm's)
            shape = (*x.shape[:-1], -1, o.head_dim)
            q, k, v = (t.view(shape).transpose(1, 2) for t in o.c_attn(x).split(o.split_size, dim=2))
            return q, k, v
        else:  # the LLaMA family
            shape = (*x.shape[:-1], -1, o.head_dim)
            q = o.q_proj(x).view(shape).transpose(1, 2)
            k = o.k_proj(x).view(shape).transpose(1, 2)
            v = o.v_proj(x).view(shape).transpose(1, 2)
        if self.state.decode:  # cos/sin of the rotated dimensions (GPT-NeoX: rotary_pct of each head; the rest pass)
            cos = self.state.sel @ self.cos_table  # [1, dk]: the row of position t
            sin = self.state.sel @ self.sin_table
            cos, sin = cos[None], sin[None]
        else:
            cos, sin = position_embeddings
        rope = sys.modules[type(o).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, cos, sin)
        return q, k, v

    def _scale_queries(self, q):
        if self.hf:
            return q * self.orig.scaling
        from privlm.model.attention import scaled_queries

        temps = self.orig.temperatures()
        if not self.state.decode or temps is None:
            return scaled_queries(q, temps)
        inv = (self.state.sel @ (1.0 / temps)[:, : self.state.C].T)[0]  # [H]: SM(t)'s 1/t at position t
        return q * ((q.size(-1) ** -0.5) * inv)[None, :, None, None]

    def forward(self, hidden_states, *args, **kwargs):
        st = self.state
        q, k, v = self._qkv(hidden_states, kwargs.get("position_embeddings"))
        q = self._scale_queries(q)
        rep = q.shape[1] // k.shape[1]
        if st.decode:
            slot = st.slot[None, None, :, None]
            k = torch.where(slot, k, st.cache[2 * self.index])
            v = torch.where(slot, v, st.cache[2 * self.index + 1])
            kr = k if rep == 1 else k.repeat_interleave(rep, dim=1)
            vr = v if rep == 1 else v.repeat_interleave(rep, dim=1)
            s = q @ kr.transpose(-2, -1) + st.bias
            y = s.softmax(dim=-1) @ vr
            st.out += [k, v]
        else:
            kr = k if rep == 1 else k.repeat_interleave(rep, dim=1)
            vr = v if rep == 1 else v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=1.0)
            st.out += [_pad(k, st.C), _pad(v, st.C)]
        B, H, n, dk = y.shape
        o = self.orig
        proj = o.c_proj if hasattr(o, "c_proj") else o.dense if hasattr(o, "dense") else o.o_proj
        out = proj(y.transpose(1, 2).reshape(B, n, H * dk))
        if self.hf:
            return out, None
        from privlm.model.attention import AttentionOutput

        return AttentionOutput(out, None, None, None)


class _SelectedPositions(nn.Module):
    """privlm's position table: in the decode step the row of position t, as sel @ wpe[:C] (ignores its index)."""

    def __init__(self, wpe: nn.Embedding, state: _State):
        super().__init__()
        self.wpe, self.state = wpe, state

    def forward(self, pos):
        if not self.state.decode:
            return self.wpe(pos)
        return self.state.sel @ self.wpe.weight[: self.state.C]  # [1, d], broadcast over the one new token


class _Step(nn.Module):
    def __init__(self, model, hf: bool, state: _State):
        super().__init__()
        self.m, self.hf, self.state = model, hf, state

    def forward(self, idx, *rest):
        st = self.state
        st.out = []
        if st.decode:
            st.sel, st.slot, st.bias, *st.cache = rest
        logits = self.m(input_ids=idx, use_cache=False).logits if self.hf else self.m(idx).logits
        return (logits, *st.out)


def _attention_owners(model) -> list[tuple[nn.Module, str]]:
    blocks, attn, _, _ = block_scopes(model)
    return [(block, attn) for block in model.get_submodule(blocks)]


def check_supported(model) -> None:
    """One line (UnsupportedOp) for a model whose attention the decode step cannot wrap."""
    if is_hf_model(model):
        from privlm.hfmodel import family_of

        fam = family_of(model.config)
        if fam.name not in ("LLaMA", "GPT-2", "GPT-NeoX"):
            raise UnsupportedOp(f"pi generate: {fam.name} models are not supported yet (privlm runs, GPT-2, GPT-NeoX "
                                f"and the LLaMA family: LLaMA, Qwen2, Mistral)")


def position_inputs(t: int, C: int, device=None) -> dict[str, torch.Tensor]:
    """The decode step's public inputs for a token at position t < C (`privlm.spu.generate` builds the same)."""
    sel = torch.zeros(1, C, device=device)
    sel[0, t] = 1.0
    return {"sel": sel, "slot": sel[0] > 0.5,
            "bias": torch.where(torch.arange(C, device=device) <= t, 0.0, MASK_VALUE)}


@contextlib.contextmanager
def _cache_attention(model, C: int):
    """Within: every attention module of ``model`` swapped for `_CachedAttention` (and privlm's position table for
    `_SelectedPositions` while ``state.decode``), HF formulas normalized as in `privlm.trace`, eval mode."""
    hf = is_hf_model(model)
    device = next(model.parameters()).device
    state = _State(C)
    owners = _attention_owners(model)
    rotary = None
    gpt2 = hf and hasattr(model, "transformer")
    if hf and not gpt2:
        rot = model.get_decoder().rotary_emb
        with torch.no_grad():
            cos, sin = rot(torch.zeros(1, device=device), torch.arange(C, device=device)[None])
        rotary = (cos[0].float(), sin[0].float())
    was_training = model.training
    model.eval()
    originals = [getattr(o, leaf) for o, leaf in owners]
    wpe_owner = model.transformer if gpt2 else None if hf else model  # learned position tables
    wpe = None if wpe_owner is None else wpe_owner.wpe
    ctx = hf_formulas(model) if hf else contextlib.nullcontext()
    try:
        with ctx:
            for i, (o, leaf) in enumerate(owners):
                setattr(o, leaf, _CachedAttention(originals[i], i, state, hf, rotary))
            if wpe is not None:
                wpe_owner.wpe = _SelectedPositions(wpe, state)
            yield state
    finally:
        for (o, leaf), orig in zip(owners, originals):
            setattr(o, leaf, orig)
        if wpe is not None:
            wpe_owner.wpe = wpe
        model.train(was_training)


@torch.no_grad()
def cached_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation in torch through the same prefill/decode modules the traces are made of (eager, no
    export): (new token ids, last-position logits of each step). The plaintext reference of the cache path."""
    hf = is_hf_model(model)
    device = next(model.parameters()).device
    P, C = len(prompt), len(prompt) + new_tokens - 1
    tokens, logits = [], []
    with _cache_attention(model, C) as state:
        step = _Step(model, hf, state)
        state.decode = False
        out = step(torch.tensor([prompt], device=device))
        for j in range(new_tokens):
            if j:
                state.decode = True
                pos = position_inputs(P + j - 1, C, device)
                out = step(torch.tensor([[tokens[-1]]], device=device), pos["sel"], pos["slot"], pos["bias"],
                           *out[1:])
            logits.append(out[0][0, -1])
            tokens.append(int(out[0][0, -1].argmax()))
    return tokens, logits


def trace_generation(model: nn.Module, P: int, C: int, name: Optional[str] = None) -> GenerationTraces:
    """The prefill (P prompt tokens) and decode (one token, cache capacity C >= P) programs of ``model``."""
    hf = is_hf_model(model)
    check_supported(model)
    name = name or block_scopes(model)[3]
    positions = model.config.max_position_embeddings if hf else model.config.block_size
    if not 1 <= P <= C <= positions:
        raise UnsupportedOp(f"prompt {P} + new tokens need {C + 1} positions; the model has {positions}")
    if not hf:
        from privlm.model.hooks import HookPoint

        if any(isinstance(m, HookPoint) and m.requested for m in model.modules()):
            raise UnsupportedOp("trace: detach every hook first (a requested hook point changes the traced graph)")
        from privlm.model.fold import fold_scales

        model = fold_scales(model)  # Eq. 8's alpha/beta into the server's weights (a copy), as trace_model does
    device = next(model.parameters()).device
    traces = {}
    with _cache_attention(model, C) as state:
        for phase in ("prefill", "decode"):
            if phase == "decode" and C == P:
                traces[phase] = None
                continue
            state.decode = phase == "decode"
            n = P if phase == "prefill" else 1
            ids = torch.zeros(1, n, dtype=torch.long, device=device)
            extra: list[tuple[str, str, torch.Tensor]] = []
            if state.decode:
                extra = [(k, "public", x) for k, x in position_inputs(P, C, device).items()]
                extra += [(f"{'kv'[j % 2]}{j // 2}", "secret", torch.zeros(shp, device=device))
                          for j, shp in enumerate(cache_shapes)]
            traces[phase] = export_trace(_Step(model, hf, state), model, ids, f"{name} {phase}", extra)
            if phase == "prefill":
                shape_of = {nd["name"]: nd["shape"] for nd in traces[phase].doc["nodes"]}
                cache_shapes = [shape_of[o["ref"]] for o in traces[phase].doc["outputs"][1:]]
    return GenerationTraces(traces["prefill"], traces["decode"], P, C)


def save_generation(traces: GenerationTraces, out_dir) -> None:
    """``out_dir/prefill`` and ``out_dir/decode`` (when there is a decode step), each as `privlm.trace.save_trace`
    writes a traced program: program.json + public.safetensors (both parties), server.safetensors (server only)."""
    from pathlib import Path

    from privlm.opschema import DECODE, PREFILL
    from privlm.trace import save_trace

    out = Path(out_dir)
    save_trace(traces.prefill, out / PREFILL)
    if traces.decode is not None:
        save_trace(traces.decode, out / DECODE)
