"""Eq. 8's learned scales folded into the server's weights for private inference (docs/DECISIONS.md#traced-program).

``fold_scales(model)`` returns a copy of a privlm `GPT` that computes the same logits (up to float rounding) with
no product of the residual stream by a learned scalar: under 2PC every such product is a secret x server-private
multiply with a truncation, while a scale inside a weight the server already multiplies by costs nothing. The
user's model is never changed; the trace (`privlm.trace.trace_model`, `privlm.generate_trace.trace_generation`)
exports the copy.

Eq. 8, ``out = beta * x_sa + FFN(x_sa) / alpha``, in an LN-free model (every reader of the residual stream is a
linear map, no norm): the fold carries the running product c of the betas as a reparameterization of the
residual stream, x = c * x~ (c = 1 at the embedding), and scales the readers and writers of the stream instead:

* block input x = c x~: the q/k/v projections read c x~, so their weights take the factor c (biases unchanged);
  the attention output is written back to x~, so W_o and b_o take 1/c;
* the FFN's first linear reads c x~_sa (weight times c); with Eq. 8 the block's output is
  beta c (x~_sa + FFN(x_sa) / (alpha beta c)), so the FFN's last linear (weight and bias) takes 1/(alpha beta c)
  and c becomes beta c (a fused FFN is both: weight times 1/(alpha beta), bias times 1/(alpha beta c));
* the LM head reads the final c x~: its weight takes c (untied from the embedding table, which the embedding
  still reads unscaled).

Where a LayerNorm reads the residual stream (``model.norm=layernorm`` or ``ln_f``), LN(c x~) equals LN(x) only
with eps replaced by eps / c^2, and eps is public (in the op graph): the fold would either change the model or
write a function of the learned betas into the public graph. Such a model is returned unchanged: the trace folds
1/alpha into the FFN's last linear (`privlm.trace._fold_private_div`, exact) and beta stays one secret x private
product per block. No paper preset combines LayerNorm with Eq. 8.

SM(t)'s temperature is not folded: t[h, i] is per head and per query position, and a weight is shared by every
position, so 1/t cannot enter W_q; it stays one secret x private product of the queries per layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from privlm.errors import PrivlmError


class FoldError(PrivlmError, ValueError):
    """A model whose scales cannot be folded (a beta of exactly zero wipes the residual stream)."""


def folds_residual(model: nn.Module) -> bool:
    """Whether ``fold_scales`` reparameterizes ``model``'s residual stream: a privlm GPT with Eq. 8 scales and no
    LayerNorm reading the stream."""
    cfg = getattr(model, "config", None)
    blocks = getattr(model, "blocks", None)
    return (blocks is not None and not hasattr(cfg, "model_type") and cfg.norm == "none" and not cfg.ln_f
            and any(getattr(b, "alpha", None) is not None for b in blocks))


def _linears(ffn: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """(first, last) linear of an FFN (the same module for the fused d x d FFN)."""
    return (ffn.fc, ffn.fc) if hasattr(ffn, "fc") else (ffn.fc_in, ffn.fc_out)


def _scale_(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | float) -> None:
    """W *= weight (a scalar), b *= bias, computed in float64 and stored in the linear's dtype."""
    w = linear.weight
    w.copy_((w.double() * weight).to(w.dtype))
    if linear.bias is not None:
        b = linear.bias
        b.copy_((b.double() * bias).to(b.dtype))


@torch.no_grad()
def fold_scales(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with Eq. 8's alpha and beta folded into its linear weights (module docstring), in eval
    mode, WN/SN weights materialized; ``model`` itself when there is nothing to fold (no Eq. 8, a LayerNorm on
    the residual stream, an HF model). Equal logits up to float rounding."""
    if not folds_residual(model):
        return model
    meta = next(model.parameters()).device.type == "meta"
    if not meta:
        zero = [i for i, b in enumerate(model.blocks) if b.beta is not None and float(b.beta) == 0.0]
        if zero:
            raise FoldError(f"Eq. 8's beta is 0 in block {zero[0]}: the residual stream is wiped there and its "
                            f"scale cannot be folded into the weights")
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):  # WN/SN: the weight the forward uses, as a plain parameter
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    c = torch.ones((), dtype=torch.float64, device=next(model.parameters()).device)
    for block in folded.blocks:
        attn = block.attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            _scale_(proj, c, 1.0)
        _scale_(attn.o_proj, 1.0 / c, 1.0 / c)
        if block.ffn is None:
            continue
        first, last = _linears(block.ffn)
        alpha = 1.0 if block.alpha is None else block.alpha.double()
        beta = 1.0 if block.beta is None else block.beta.double()
        if first is last:
            _scale_(first, c / (alpha * beta * c), 1.0 / (alpha * beta * c))
        else:
            _scale_(first, c, 1.0)
            _scale_(last, 1.0 / (alpha * beta * c), 1.0 / (alpha * beta * c))
        block.alpha = None
        block.beta = None
        c = c * beta
    head = folded.lm_head
    head.weight = nn.Parameter((head.weight.double() * c).to(head.weight.dtype), requires_grad=False)
    from dataclasses import replace

    folded.config = replace(folded.config, ffn_scaling=False, tie_embeddings=False)
    return folded
