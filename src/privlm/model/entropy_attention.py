"""Attention output and exact per-query attention entropy from fused attention kernels, with no T x T tensor.

For one query row with scaled logits z_j = q'.k_j (q' already holds 1/sqrt(d_k) and any SM(t) temperature) and
p = softmax(z) over the keys it may see,

    H = -sum_j p_j log p_j = LSE(z) - sum_j p_j z_j,     sum_j p_j z_j = q' . sum_j p_j k_j = q' . Attn(q', K, K).

A fused kernel returns LSE(z) with its output, so the entropy costs one more attention call, with the keys as
values (U = Attn(q', K, K)), and an O(T) dot product per query.

Gradient. dH/dz_j = p_j - (p_j + p_j z_j - p_j sum_k p_k z_k) = -p_j (z_j - zbar), zbar = sum_k p_k z_k. An
attention backward with values W and output gradient g computes dz_j = p_j (g.w_j - g.O) with O = sum_k p_k w_k;
with W = K and g = -gH q' that is -gH p_j (q'.k_j - q'.U) = gH dH/dz_j. So the entropy's gradient with respect to q'
and k is the (q', k) part of one attention backward (its value gradient is dropped: K enters H only through z).
The kernels never form the probabilities; what autograd keeps is q', k, v, the two outputs and the LSE.

Kernels per device (``fused_entropy_supported`` says whether a device has one):
  cpu   aten._scaled_dot_product_flash_attention_for_cpu and its backward (float64, float32, bfloat16, float16)
  cuda  aten._scaled_dot_product_flash_attention (fp16/bf16, head dim <= 256, multiple of 8, no mask), otherwise
        aten._scaled_dot_product_efficient_attention (any float dtype, additive masks); written against the
        kernels' signatures but not yet run on a GPU.
Precision: the entropy is taken in float32 (float64 for float64 inputs) from the kernel's float32 LSE and the
output U in the input dtype, so in bfloat16 its error is about |zbar| * 2^-8 nats (a few hundredths for typical
logits), against exact in float32/float64.
"""
from __future__ import annotations

from typing import Optional

import torch


def fused_entropy_supported(device: torch.device) -> bool:
    """Whether ``attention_with_entropy`` has a fused kernel on this device type."""
    return device.type in ("cpu", "cuda")


def attention_with_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           attn_mask: Optional[torch.Tensor] = None,
                           is_causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T + mask) v and the entropy of every softmax row, through fused kernels.

    q: [B, H, T_q, d] scaled (and tempered) queries (no further scale is applied); k, v: [B, H, T_k, d];
    attn_mask: None, or an additive float mask / boolean keep-mask broadcastable to [B, H, T_q, T_k]
    (then ``is_causal`` is ignored). Returns (y [B, H, T_q, d], entropy [B, H, T_q] in nats, float32 or
    float64). Rows with no visible key give y = 0 and entropy 0. Differentiable w.r.t. q, k, v (once).
    """
    if torch.is_autocast_enabled(q.device.type):  # as F.scaled_dot_product_attention: the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
        is_causal = False
    return _AttentionEntropy.apply(q, k, v, attn_mask, is_causal)


def entropy_from_lse(lse: torch.Tensor, q: torch.Tensor, keys_attended: torch.Tensor) -> torch.Tensor:
    """H = LSE(z) - q' . Attn(q', K, K) per query row (the identity above), in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    mean_logit = (q.to(dtype) * keys_attended.to(dtype)).sum(-1)
    return lse.to(dtype) - mean_logit


class _AttentionEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal):
        kernel = _kernel_for(q, attn_mask)
        y, lse, aux_y = kernel.forward(q, k, v, attn_mask, is_causal)
        u, _, aux_u = kernel.forward(q, k, k, attn_mask, is_causal)  # same logits: the same LSE
        entropy = entropy_from_lse(lse[..., : q.size(-2)], q, u)
        ctx.kernel, ctx.is_causal, ctx.aux = kernel, is_causal, (aux_y, aux_u)
        ctx.save_for_backward(q, k, v, y, u, lse, attn_mask)
        ctx.set_materialize_grads(False)
        return y, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_entropy):
        q, k, v, y, u, lse, attn_mask = ctx.saved_tensors
        kernel, aux_y, aux_u = ctx.kernel, *ctx.aux
        dq = dk = dv = None
        if grad_y is not None:
            dq, dk, dv = kernel.backward(grad_y, q, k, v, y, lse, attn_mask, ctx.is_causal, aux_y)
        if grad_entropy is not None:
            # the attention backward with values K and output gradient -gH q' is the entropy's backward
            grad_u = (grad_entropy.unsqueeze(-1) * -q.to(grad_entropy.dtype)).to(q.dtype)
            dq_h, dk_h, _ = kernel.backward(grad_u, q, k, k, u, lse, attn_mask, ctx.is_causal, aux_u)
            dq = dq_h if dq is None else dq + dq_h
            dk = dk_h if dk is None else dk + dk_h
        return dq, dk, dv, None, None


# ------------------------------------------------------------------------------------------- kernels
class _CPUFlash:
    @staticmethod
    def forward(q, k, v, mask, is_causal):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=mask, scale=1.0)
        return out, lse, None

    @staticmethod
    def backward(grad, q, k, v, out, lse, mask, is_causal, _aux):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(), q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=1.0)


class _CUDAFlash:
    @staticmethod
    def forward(q, k, v, mask, is_causal):
        (out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _) = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=1.0)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    @staticmethod
    def backward(grad, q, k, v, out, lse, mask, is_causal, aux):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset,
            scale=1.0)


class _CUDAEfficient:
    @staticmethod
    def forward(q, k, v, mask, is_causal):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _aligned_bias(mask, q), True, 0.0, is_causal, scale=1.0)
        return out, lse, (seed, offset)  # lse: [B, H, T_q rounded up to 32]; the forward slices it

    @staticmethod
    def backward(grad, q, k, v, out, lse, mask, is_causal, aux):
        seed, offset = aux
        bias = _aligned_bias(mask, q)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad.contiguous(), q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], is_causal,
            scale=1.0)
        return dq, dk, dv


def _aligned_bias(mask: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """The efficient kernel reads the bias with 16-element aligned rows: pad the key axis and slice back, as
    F.scaled_dot_product_attention does, and expand to the full [B, H, T_q, T_k] view it indexes."""
    if mask is None:
        return None
    T_k = mask.size(-1)
    pad = -T_k % 16
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))[..., :T_k]
    return mask.expand(q.size(0), q.size(1), q.size(2), T_k)


def _kernel_for(q: torch.Tensor, mask: Optional[torch.Tensor]):
    if q.device.type == "cpu":
        return _CPUFlash
    if q.device.type == "cuda":
        d = q.size(-1)
        if mask is None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0:
            return _CUDAFlash
        return _CUDAEfficient
    raise NotImplementedError(f"no fused attention-entropy kernel for device type '{q.device.type}'; "
                              f"use the explicit-probabilities path")
