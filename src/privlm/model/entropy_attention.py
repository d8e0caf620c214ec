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

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

log = logging.getLogger(__name__)


def fused_entropy_supported(device: torch.device) -> bool:
    """Whether ``attention_with_entropy`` has a fused kernel on this device type."""
    return device.type in ("cpu", "cuda")


def fused_entropy_usable(device: torch.device) -> bool:
    """Whether the fused entropy kernels are used on ``device``: the device type has them and they passed the
    one-time self-check on this device (``self_check``). Otherwise the entropy is computed on the explicit path."""
    return fused_entropy_supported(device) and self_check(device).ok


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
    if not fused_entropy_usable(q.device):
        return explicit_attention_with_entropy(q, k, v, attn_mask, is_causal)
    return _AttentionEntropy.apply(q, k, v, attn_mask, is_causal)


def entropy_from_lse(lse: torch.Tensor, q: torch.Tensor, keys_attended: torch.Tensor) -> torch.Tensor:
    """H = LSE(z) - q' . Attn(q', K, K) per query row (the identity above), in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    mean_logit = (q.to(dtype) * keys_attended.to(dtype)).sum(-1)
    return lse.to(dtype) - mean_logit


def causal_mask(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2's causal mask M applied to [..., T_q, T_k] logits: M_ij = -inf for j > i (queries are the last T_q
    positions of the T_k keys' sequence)."""
    T_q, T_k = logits.shape[-2:]
    mask = torch.ones(T_q, T_k, dtype=torch.bool, device=logits.device).triu_(T_k - T_q + 1)
    return logits.masked_fill(mask, float("-inf"))




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


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of every attention row, -sum_j a_ij log a_ij (the summand of Eq. 7).

    Masked entries are exactly 0 and contribute 0, so no epsilon is needed (the official code's log(a + 1e-9)
    differs by at most T * 1e-9). Differentiable with finite gradients (see _RowEntropy).
    probs: [..., T_k] -> [...].
    """
    return _RowEntropy.apply(probs)


def explicit_attention_with_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    attn_mask: Optional[torch.Tensor] = None,
                                    is_causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``attention_with_entropy`` computes, from the explicit probabilities (a [B, H, T_q, T_k] tensor):
    the reference of the self-check and the fallback where the fused kernels are unusable. ``attn_mask``: None
    or an additive float mask (then ``is_causal`` is ignored). Rows with no visible key give y = 0, entropy 0."""
    logits = q @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    elif is_causal:
        logits = causal_mask(logits)
    probs = logits.softmax(dim=-1)
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # no visible key: softmax gives NaN, kernels 0
    probs = probs.masked_fill(empty, 0.0)
    entropy = row_entropy(probs.to(torch.promote_types(probs.dtype, torch.float32)))
    return probs @ v, entropy


# ------------------------------------------------------------------------------------------- self-check
@dataclass(frozen=True)
class SelfCheck:
    """Result of the one-time check of the fused entropy kernels on one device."""
    device: str
    ok: bool
    max_error: Optional[float]  # largest error found, relative to its tolerance's scale
    message: str  # one line: what was checked and what came out


SELF_CHECK_T = (1, 37, 70)  # query counts of the check: a single row, ragged kernel blocks
_SELF_CHECKS: dict[str, SelfCheck] = {}


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _check_dtypes(device: torch.device) -> list[tuple[torch.dtype, float]]:
    """Dtypes the check covers with their tolerances: float32 everywhere; on CUDA also the half dtypes that
    autocast trains in (they take the flash kernel, float32 the memory-efficient one)."""
    dtypes = [(torch.float32, 1e-4)]
    if device.type == "cuda":
        dtypes.append((torch.float16, 2e-2))
        if torch.cuda.is_bf16_supported():
            dtypes.append((torch.bfloat16, 5e-2))
    return dtypes


def _run_self_check(device: torch.device) -> tuple[float, float]:
    """Values and gradients of the fused path against the explicit float64 path on small random inputs (a
    private generator: the caller's random streams are untouched). Returns (max error / tolerance, worst T)."""
    gen = torch.Generator().manual_seed(0)
    worst = (0.0, 0)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for dtype, tol in _check_dtypes(device):
            for T in SELF_CHECK_T:
                q, k, v, w = (torch.randn(2, 3, T, 16, generator=gen, dtype=torch.float64) for _ in range(4))
                q = q / 4  # logits of a few units: entropies well inside (0, log T)
                leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
                y, h = _AttentionEntropy.apply(*(t.to(dtype) for t in leaves), None, True)
                y_ref, h_ref = explicit_attention_with_entropy(*leaves)
                gw = w[..., 0].to(device)
                got = torch.autograd.grad((h.double() * gw).sum() + y.double().sum(), leaves)
                want = torch.autograd.grad((h_ref * gw).sum() + y_ref.sum(), leaves)
                errs = [(h.double() - h_ref).abs().max(), (y.double() - y_ref).abs().max()]
                errs += [(a.double() - b).abs().max() / b.abs().max().clamp_min(1) for a, b in zip(got, want)]
                err = max(float(e.detach()) for e in errs) / tol
                if math.isnan(err):
                    return err, T
                worst = max(worst, (err, T))
    return worst


def self_check(device: torch.device) -> SelfCheck:
    """The fused entropy kernels checked once per device (values and gradients against the explicit path, see
    ``_run_self_check``); the result is kept for the process. On a mismatch or an error the kernels are not
    used on that device (``fused_entropy_usable`` is False, ``attention_with_entropy`` computes explicitly) and
    one warning line is logged; the trainer's telemetry records it in metrics.jsonl (``self_check_failures``)."""
    key = _device_key(device)
    done = _SELF_CHECKS.get(key)
    if done is not None:
        return done
    device = torch.device(key)
    if not fused_entropy_supported(device):
        return SelfCheck(key, False, None, f"no fused attention-entropy kernel for device type '{device.type}'")
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return SelfCheck(key, True, None, "not checked while tracing")  # not kept: checked at the first eager use
    try:
        err, T = _run_self_check(device)
    except Exception as exc:  # a kernel that raises on this device: the explicit path still works
        result = SelfCheck(key, False, None, f"fused attention-entropy self-check on {key} failed with "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                           f"using the explicit path (T x T probabilities) on {key}")
    else:
        ok = err <= 1.0
        result = SelfCheck(key, ok, err, (f"fused attention-entropy self-check on {key}: " +
                                          (f"passed (max error {err:.2g} of tolerance)" if ok else
                                           f"MISMATCH against the explicit path (error {err:.3g} x tolerance at "
                                           f"T={T}); using the explicit path (T x T probabilities) on {key}")))
    _SELF_CHECKS[key] = result
    if not result.ok:
        log.warning(result.message)
    return result


def self_check_failures() -> list[SelfCheck]:
    """The devices whose fused entropy kernels failed their self-check in this process."""
    return [c for c in _SELF_CHECKS.values() if not c.ok]


def reset_self_checks() -> None:
    """Forget every check (the next use of each device checks again); for tests."""
    _SELF_CHECKS.clear()


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
