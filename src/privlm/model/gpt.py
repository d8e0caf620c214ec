"""The GPT-2 style decoder: embeddings, pre-norm blocks (Eq. 1, Eq. 8), tied LM head.

Every paper variant is this one model with different modules chosen by `ModelConfig` (see presets.py);
the forward pass has no per-variant branches beyond "is there an FFN" and "is the FFN scaled".
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from privlm.config import ModelConfig
from privlm.model.attention import CausalSelfAttention
from privlm.model.ffn import FFN, fuse_linear_ffn, make_ffn
from privlm.model.hooks import ActivationCache, HookPoint, Names, capture, name_filter
from privlm.model.normalization import apply_weight_normalization, make_norm


def attention_residual(x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Eq. 1 (first half): X_SA = X_in + MHA(LN1(X_in))."""
    return x + attn_out


def ffn_residual(x_sa: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
    """Eq. 1 (second half): X_out = X_SA + FFN(LN2(X_SA))."""
    return x_sa + ffn_out


def scaled_ffn_residual(x_sa: torch.Tensor, ffn_out: torch.Tensor, alpha: torch.Tensor,
                        beta: torch.Tensor) -> torch.Tensor:
    """Eq. 8: X_out = beta * X_SA + (1/alpha) * FFN(X_SA), one scalar alpha and beta per layer."""
    return beta * x_sa + ffn_out / alpha


class BlockOutput(NamedTuple):
    x: torch.Tensor
    entropy: Optional[torch.Tensor]
    probs: Optional[torch.Tensor]
    nan_count: Optional[torch.Tensor]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_ffn: bool, shared_slope: nn.Parameter | None = None):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg) if has_ffn else None
        self.ffn = make_ffn(cfg, shared_slope) if has_ffn else None
        if cfg.ffn_scaling and has_ffn:
            self.alpha = nn.Parameter(torch.tensor(float(cfg.alpha_init)))
            self.beta = nn.Parameter(torch.tensor(float(cfg.beta_init)))
        else:
            self.register_parameter("alpha", None)
            self.register_parameter("beta", None)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_pre = HookPoint()
        self.hook_mlp_post = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: torch.Tensor, want_entropy: bool = False, want_probs: bool = False) -> BlockOutput:
        x = self.hook_resid_pre(x)
        a = self.attn(self.ln_1(x), want_entropy, want_probs)
        x_sa = self.hook_resid_mid(attention_residual(x, self.hook_attn_out(a.out)))
        if self.ffn is None:  # AERO's pruned blocks: attention only
            out = x_sa
        else:
            f = self.hook_mlp_post(self.ffn(self.hook_mlp_pre(self.ln_2(x_sa))))
            out = ffn_residual(x_sa, f) if self.alpha is None else scaled_ffn_residual(x_sa, f, self.alpha, self.beta)
        return BlockOutput(self.hook_resid_post(out), a.entropy, a.probs, a.nan_count)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V] (or [B, 1, V] with last_only)
    loss: Optional[torch.Tensor]  # mean token cross-entropy, when targets are given
    entropy: Optional[torch.Tensor]  # [L, B, H, T] per-query attention entropy (nats), when asked
    attentions: Optional[tuple[torch.Tensor, ...]]  # L x [B, H, T, T], when asked
    nan_counts: Optional[torch.Tensor]  # [L] NaN entries per layer's attention matrix (fused path: NaN rows x T)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_dropout)
        self.leaky_slope = (nn.Parameter(torch.tensor(float(cfg.leaky_slope)))
                            if cfg.activation == "leaky_relu" and cfg.leaky_slope_learnable == "global" else None)
        keep = set(cfg.ffn_layers())
        self.blocks = nn.ModuleList(Block(cfg, i in keep, self.leaky_slope) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias) if cfg.ln_f else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        if cfg.residual_scaling:  # GPT-2: residual projections get std / sqrt(2L)
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "fc_out.weight", "ffn.fc.weight")):
                    nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))
        for block in self.blocks:  # after init: WN/SN derive their parameters from the initial weights
            apply_weight_normalization(block, cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                output_entropy: bool = False, output_attentions: bool = False,
                last_only: bool = False) -> ModelOutput:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the position table model.block_size="
                             f"{self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        entropies, probs, nans = [], [], []
        for block in self.blocks:
            out = block(x, output_entropy, output_attentions)
            x = out.x
            if output_entropy:
                entropies.append(out.entropy)
                nans.append(out.nan_count)
            if output_attentions:
                probs.append(out.probs)
        x = self.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # no explicit .float(): params are fp32, and under autocast cross_entropy already runs in fp32
            # (reading the bf16 logits directly instead of materializing a [B*T, V] fp32 copy first)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss,
                           torch.stack(entropies) if output_entropy else None,
                           tuple(probs) if output_attentions else None,
                           torch.stack(nans) if output_entropy else None)

    def run_with_cache(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, names: Names = None,
                       **kwargs) -> tuple[ModelOutput, ActivationCache]:
        """One forward pass that records the named hook points (privlm.model.hooks): ``names`` None = every hook
        point (hook_probs and hook_attn_scores among them: the explicit attention path), a hook name such as
        ``"hook_q"`` for every layer, full names (``"blocks.2.attn.hook_q"``), a list of either, or a predicate.
        Other keyword arguments go to ``forward``. Returns (the forward's output, the ActivationCache)."""
        with capture(self, name_filter(self, names)) as store:
            out = self(idx, targets, **kwargs)
        return out, ActivationCache(store, len(self.blocks))

    # ------------------------------------------------------------------------------------
    def num_params(self, exclude_position: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_position else n

    def param_groups(self) -> dict[str, int]:
        """Parameter count per module group (embeddings, attention, ffn, norms, scales, temperature, ...)."""
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():
            groups[param_group_of(name)] = groups.get(param_group_of(name), 0) + p.numel()
        return groups

    def optimizer_groups(self, weight_decay: float, extra: Optional[nn.Module] = None) -> list[dict]:
        """AdamW groups: decay on weight matrices; none on vectors and scalars (biases, norm gains, alpha/beta,
        slopes) nor on what a module declares in its ``no_weight_decay()`` (temperatures, WN gains, the
        regularizer's thresholds when it is passed as ``extra``)."""
        modules = [self] + ([extra] if extra is not None else [])
        skip = {id(p) for m in modules for p in no_weight_decay_params(m)}
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        decay = [p for p in params if id(p) not in skip]
        no_decay = [p for p in params if id(p) in skip]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def fuse(self) -> "GPT":
        """Turn a trained linear-only two-matrix FFN model (SM+ScFFN) into the fused form (SM+ScFuFFN).

        Exact up to float rounding: W = W_out W_in per block. Returns a new model; self is unchanged.
        """
        cfg = self.config
        if cfg.ffn != "standard" or cfg.activation != "identity":
            raise ValueError(f"fuse() needs a linear-only two-matrix FFN (ffn=standard, activation=identity); "
                             f"this model has ffn={cfg.ffn}, activation={cfg.activation}")
        fused_cfg = replace(cfg, ffn="fused", weight_norm=_without_ffn(cfg.weight_norm),
                            spectral_norm=_without_ffn(cfg.spectral_norm),
                            preset=cfg.preset.replace("ScFFN", "ScFuFFN"))
        fused = copy.deepcopy(self)
        fused.config = fused_cfg
        for block, src in zip(fused.blocks, self.blocks):
            if isinstance(src.ffn, FFN):
                block.ffn = fuse_linear_ffn(src.ffn, fused_cfg)
        return fused

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context, last_only=True).logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def _without_ffn(placement: str) -> str:
    """Placement string once the FFN linears are fused (the fused weight is stored plain)."""
    parts = [p for p in placement.split("+") if p != "ffn"]
    return "+".join(parts) if parts and parts != ["none"] else "none"


def no_weight_decay_params(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` that AdamW must not decay: every vector and scalar (biases, norm gains, Eq. 8
    scales, slopes), and the matrices that a submodule names in its ``no_weight_decay()`` method (the
    timm/HF convention: the module that owns a parameter says whether it is a weight to shrink)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    skip = {id(p) for p in params.values() if p.ndim < 2}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        declare = getattr(sub, "no_weight_decay", None)
        if callable(declare):
            skip.update(id(params[f"{prefix}.{name}" if prefix else name]) for name in declare())
    return [p for p in module.parameters() if id(p) in skip]


def param_group_of(name: str) -> str:
    if name.startswith(("wte", "lm_head")):
        return "embedding (wte, tied head)"
    if name.startswith("wpe"):
        return "position (wpe)"
    if name.startswith("ln_f") or ".ln_" in name:
        return "layernorm"
    if name.endswith(("alpha", "beta")):
        return "ffn scale (alpha, beta)"
    if "temperature" in name:
        return "temperature"
    if "slope" in name:
        return "leaky slope"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "ffn"
    return "other"
