"""Causal multi-head self-attention (Eq. 2-3), the learnable temperature of SM(t) and entropy capture."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from privlm.config import ModelConfig
from privlm.model.hooks import HookPoint


def temperature_from_param(param: torch.Tensor, parameterization: str, t_min: float) -> torch.Tensor:
    """Map the stored parameter p to the temperature t of SPEC §1.7.

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


def attention_logits(q: torch.Tensor, k: torch.Tensor, temperature: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 2 logits (q k^T) / sqrt(d_k), and with SM(t) divided by t_i per head and query (App. A).

    q, k: [B, H, T, d_k]; temperature: [H, T] or None. Returns [B, H, T, T] before masking.
    """
    # Both factors scale query rows, so they are applied to q (T x d_k values) rather than to the T x T logits.
    scale = 1.0 / math.sqrt(q.size(-1))
    q = q * scale if temperature is None else q * (scale / temperature[:, : q.size(-2), None])
    return q @ k.transpose(-2, -1)


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with the causal mask M (M_ij = -inf for j > i), Eq. 2."""
    T = logits.size(-1)
    mask = torch.ones(T, T, dtype=torch.bool, device=logits.device).triu_(1)
    return logits.masked_fill(mask, float("-inf")).softmax(dim=-1)


class _RowEntropy(torch.autograd.Function):
    """-sum_j p_j log p_j with a backward that stays finite at p = 0 and saves nothing but p.

    Autograd through xlogy(p, p) gives d/dp = log p + 1 = -inf at the masked (exactly 0) entries, and the
    softmax backward then multiplies it by p = 0: NaN gradients for every logit. Here log p is taken at
    max(p, tiny), so a zero entry contributes 0 to the value and a finite term (killed by the softmax
    backward's factor p) to the gradient. Saving only p (which the softmax saves anyway) keeps the
    regularizer's extra memory to the [.., T] entropies instead of two more T x T tensors per layer.
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        return -(probs * _safe_log(probs)).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * -(_safe_log(probs) + 1.0)


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


class _SoftmaxEntropy(torch.autograd.Function):
    """(softmax(z), -sum_j p_j log p_j) in one autograd node that saves only p.

    The entropy's gradient w.r.t. p is -(log p + 1); its constant part cancels in the softmax backward, so
    both outputs' gradients go through a single softmax backward of (g_p - g_H * log p). Against softmax
    followed by a separate entropy node this saves about a third of the T x T passes of the backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(logits, dim=-1)
        entropy = torch.special.entr(probs if probs.dtype != torch.bfloat16 and probs.dtype != torch.float16
                                     else probs.float()).sum(dim=-1)
        ctx.save_for_backward(probs)
        ctx.logits_dtype = logits.dtype
        return probs, entropy

    @staticmethod
    def backward(ctx, grad_probs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        if grad_entropy is not None:
            log_p = _safe_log(probs)  # finite at masked zeros; multiplied by p = 0 in the softmax backward
            g_e = grad_entropy.unsqueeze(-1).to(log_p.dtype)
            grad = log_p.mul_(-g_e) if grad_probs is None else torch.addcmul(grad_probs, log_p, g_e, value=-1.0)
        else:
            grad = grad_probs
        # softmax backward in the dtype of p (fp32 under autocast), then cast: CUDA's kernel has no mixed
        # bf16-input / fp32-grad variant
        return torch.ops.aten._softmax_backward_data(grad.to(probs.dtype), probs, -1, probs.dtype).to(ctx.logits_dtype)


def causal_softmax_entropy(logits: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 causal softmax and the per-row entropy (summand of Eq. 7) together: (probs [.., T, T], entropy [.., T]).

    Equal to ``(causal_softmax(logits), row_entropy(causal_softmax(logits)))``, with fewer passes over the
    T x T tensors. ``inplace=True`` masks ``logits`` in place (the attention passes its fresh q k^T product,
    which autograd does not need).
    """
    T = logits.size(-1)
    mask = torch.ones(T, T, dtype=torch.bool, device=logits.device).triu_(1)
    logits = logits.masked_fill_(mask, float("-inf")) if inplace else logits.masked_fill(mask, float("-inf"))
    return _SoftmaxEntropy.apply(logits)


def causal_attention_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: Optional[torch.Tensor],
                             block: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 2-3 attention output softmax(q k^T / sqrt(d_k) [/ t] + M) v and the per-query entropy, computed
    one block of queries at a time so that the masked upper triangle is (mostly) never formed.

    Query block [s, e) only needs keys [0, e): with 128-query blocks the T x T work and the probabilities
    kept for backward shrink toward half (T=512: 62.5%), which is what keeps the entropy regularizer's
    training step close to the fused SDPA kernel's. Returns (y [B,H,T,d_k], entropy [B,H,T], nan_count).
    """
    T = q.size(-2)
    block = block or max(128, T // 8)  # <= 8 blocks per layer: few kernel launches on accelerators
    scale = 1.0 / math.sqrt(q.size(-1))
    q = (q * scale if temperature is None else q * (scale / temperature[:, :T, None])).contiguous()
    # Contiguous once per layer, so that the per-block slices below are strided views the batched matmul takes
    # as they are (q, k, v come out of the fused projection as permuted views; slicing those would copy
    # k and v for every block, and autograd would keep all the copies).
    k_t = k.transpose(-2, -1).contiguous()  # [B, H, d_k, T]
    v = v.contiguous()
    ys, entropies, nans = [], [], []
    for s in range(0, T, block):
        e = min(s + block, T)
        logits = q[..., s:e, :] @ k_t[..., :e]  # [B, H, e - s, e]
        mask = torch.ones(e - s, e, dtype=torch.bool, device=q.device).triu_(s + 1)  # key j > query s + r
        probs, entropy = _SoftmaxEntropy.apply(logits.masked_fill_(mask, float("-inf")))
        ys.append(probs @ v[..., :e, :])
        entropies.append(entropy)
        nans.append(_nan_count(probs, entropy))
    return torch.cat(ys, dim=-2), torch.cat(entropies, dim=-1), torch.stack(nans).sum()


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of every attention row, -sum_j a_ij log a_ij (the summand of Eq. 7).

    Masked entries are exactly 0 and contribute 0, so no epsilon is needed (the official code's log(a + 1e-9)
    differs by at most T * 1e-9). Differentiable with finite gradients (see _RowEntropy).
    probs: [..., T_k] -> [...].
    """
    return _RowEntropy.apply(probs)


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
        self.hook_probs = HookPoint()
        self.hook_entropy = HookPoint()

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
        t = self.temperatures()
        entropy = probs = nan_count = None
        if want_entropy and not want_probs and not self.hook_probs._forward_hooks:  # training with the regularizer
            y, entropy, nan_count = causal_attention_entropy(q, k, v, t)
            entropy = self.hook_entropy(entropy)
        elif want_entropy or want_probs:  # a probs hook may edit the probabilities: entropy of what it returns
            probs = self.hook_probs(causal_softmax(attention_logits(q, k, t)))
            if want_entropy:
                entropy = self.hook_entropy(row_entropy(probs))
                nan_count = _nan_count(probs, entropy)
            y = probs @ v
            if not want_probs:
                probs = None
        else:
            if t is not None:  # t_i divides row i of the logits, i.e. scales query i: stays on the fused kernel
                q = q / t[:, : q.size(-2), None]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        B, H, T, dk = y.shape
        out = self.o_proj(y.transpose(1, 2).reshape(B, T, H * dk))
        return AttentionOutput(out, entropy, probs, nan_count)


def _nan_count(probs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """NaN entries of the attention matrix. A NaN entry makes its row's entropy NaN, so on CPU (where a host
    check is free) the T x T count is only taken when some row entropy is NaN; on accelerators it is always
    taken (a data-dependent branch would synchronize every layer)."""
    if probs.device.type == "cpu" and not torch.isnan(entropy).any():
        return torch.zeros((), dtype=torch.int64)
    return torch.isnan(probs).sum()
