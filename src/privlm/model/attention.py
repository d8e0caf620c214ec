"""Causal multi-head self-attention (Eq. 2-3), the learnable temperature of SM(t) and entropy capture."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from privlm.config import ModelConfig
from privlm.model.entropy_attention import (attention_with_entropy, causal_mask, fused_entropy_usable,
                                            row_entropy)
from privlm.model.hooks import HookPoint


def temperature_from_param(param: torch.Tensor, parameterization: str, t_min: float) -> torch.Tensor:
    """Map the stored parameter p to the temperature t of docs/DECISIONS.md#learnable-temperature-smt.

    The paper's "temperature initialized to 1e-2" is read as the initial value of p (see ARCHITECTURE.md):
    ``offset``: t = max(1 + p, t_min)  (default; p = 1e-2 gives t = 1.01, almost plain softmax)
    ``log``:    t = exp(p)             (always positive, multiplicative updates)
    ``direct``: t = max(p, t_min)      (the literal reading; p = 1e-2 multiplies the logits by 100)
    """
    if parameterization == "offset":
        return (1.0 + param).clamp_min(t_min)
    if parameterization == "log":
        return param.exp()
    return param.clamp_min(t_min)


def scaled_queries(q: torch.Tensor, temperature: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 2's query scaling, and SM(t)'s division of row i by t_i (App. A): q / (sqrt(d_k) [* t_i]).

    q: [B, H, T, d_k]; temperature: [H, >= T] or None. Both factors scale whole query rows of the logits, so they
    are applied to q (T x d_k values) rather than to the T x T logits; every attention path starts from here.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    return q * scale if temperature is None else q * (scale / temperature[:, : q.size(-2), None])


def attention_logits(q: torch.Tensor, k: torch.Tensor, temperature: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 2 logits (q k^T) / sqrt(d_k), and with SM(t) divided by t_i per head and query (App. A).

    q, k: [B, H, T, d_k]; temperature: [H, T] or None. Returns [B, H, T, T] before masking.
    """
    return scaled_queries(q, temperature) @ k.transpose(-2, -1)


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with the causal mask M (M_ij = -inf for j > i), Eq. 2."""
    return causal_mask(logits).softmax(dim=-1)


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # [B, T, d]
    entropy: Optional[torch.Tensor]  # [B, H, T] per-query entropy, when asked
    probs: Optional[torch.Tensor]  # [B, H, T, T], when asked
    nan_count: Optional[torch.Tensor]  # scalar: NaN entries of the attention matrix, when entropy is asked


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)  # W^O of Eq. 3
        self.temperature_param_kind = cfg.temperature_param
        self.temperature_min = cfg.temperature_min
        if cfg.attn_temperature:
            self.temperature = nn.Parameter(torch.full((cfg.n_head, cfg.block_size), cfg.temperature_init))
        else:
            self.register_parameter("temperature", None)
        # [B, H, T, d_k] unless noted; hook_q is the projection before 1/sqrt(d_k) and SM(t)'s temperature
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [B, H, T, T] scaled, causally masked logits; formed only on request
        self.hook_probs = HookPoint()  # [B, H, T, T]; formed only on request
        self.hook_entropy = HookPoint()  # [B, H, T] per-query entropy (nats); computed only on request
        self.hook_z = HookPoint()  # per-head attention output, before W^O

    def no_weight_decay(self) -> set[str]:
        # the temperature is a per-position scale of the logits, not a weight: decay would pull it to zero
        return {"temperature"} if self.temperature is not None else set()

    def temperatures(self) -> Optional[torch.Tensor]:
        """The temperature t in R^{H x block_size}, or None for plain softmax."""
        if self.temperature is None:
            return None
        return temperature_from_param(self.temperature, self.temperature_param_kind, self.temperature_min)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One matmul for the three projections; separate modules so WN/SN can target q, k or v alone.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        B, T, d = x.shape
        heads = F.linear(x, weight, bias).view(B, T, 3, self.n_head, d // self.n_head)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d_k]
        return q, k, v

    def forward(self, x: torch.Tensor, want_entropy: bool = False, want_probs: bool = False) -> AttentionOutput:
        q, k, v = self._qkv(x)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q = scaled_queries(q, self.temperatures())
        entropy_requested = want_entropy or self.hook_entropy.requested
        probs_requested = want_probs or self.hook_probs.requested or self.hook_attn_scores.requested
        path = attention_path(entropy_requested, probs_requested, x.device)
        entropy = probs = nan_count = None
        if path == FUSED:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        elif path == FUSED_ENTROPY:
            y, entropy = attention_with_entropy(q, k, v, is_causal=True)
            entropy = self.hook_entropy(entropy)
            nan_count = nan_count_from_entropy(entropy)
        else:  # the entropy of what a probs hook returns, if it edits the probabilities
            scores = self.hook_attn_scores(causal_mask(q @ k.transpose(-2, -1)))
            probs = self.hook_probs(scores.softmax(dim=-1))
            if entropy_requested:
                entropy = self.hook_entropy(row_entropy(probs))
                nan_count = _nan_count(probs, entropy)
            y = probs @ v
        y = self.hook_z(y)
        B, H, T, dk = y.shape
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, H * dk))
        return AttentionOutput(out, entropy if want_entropy else None, probs if want_probs else None,
                               nan_count if want_entropy else None)


FUSED, FUSED_ENTROPY, EXPLICIT = "fused", "fused+entropy", "explicit"


def attention_path(entropy_requested: bool, probs_requested: bool, device: torch.device) -> str:
    """The one place that picks how attention is computed, from what was asked (by the caller or by a hook):

    ``explicit``       the probabilities (or the scores) are asked for: form softmax(q k^T / sqrt(d_k) + M) [B, H, T, T]
    ``fused+entropy``  only the entropy: fused kernels (``attention_with_entropy``), nothing of T x T elements
    ``fused``          neither: F.scaled_dot_product_attention
    A device without a fused entropy kernel, or whose kernel failed its one-time self-check
    (``fused_entropy_usable``), computes the entropy on the explicit path.
    """
    if probs_requested:
        return EXPLICIT
    if entropy_requested:
        return FUSED_ENTROPY if fused_entropy_usable(device) else EXPLICIT
    return FUSED


def nan_count_from_entropy(entropy: torch.Tensor) -> torch.Tensor:
    """NaN entries of the attention matrix the fused path never forms. A NaN or infinite logit makes the whole
    softmax row NaN (the masked entries too: exp(-inf - nan)), and such a row's entropy is NaN: T per NaN row,
    which is what ``_nan_count`` counts on the explicit matrix."""
    return torch.isnan(entropy).sum() * entropy.size(-1)


def _nan_count(probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """NaN entries of the attention matrix. A NaN entry makes its row's entropy NaN, so on CPU (where a host
    check is free) the T x T count is only taken when some row entropy is NaN; on accelerators it is always
    taken (a data-dependent branch would synchronize every layer)."""
    if probs.device.type == "cpu" and not torch.isnan(entropy).any():
        return torch.zeros((), dtype=torch.int64)
    return torch.isnan(probs).sum()
