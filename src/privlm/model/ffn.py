"""Feed-forward networks (Eq. 4), the fused d x d FFN of SM+ScFuFFN, and the FFN activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privlm.config import ModelConfig
from privlm.model.hooks import HookPoint
from privlm.opregistry import ACTIVATIONS


class GELUTanh(nn.Module):
    """GPT-2's GELU (tanh approximation, HF "gelu_new")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class LeakyReLU(nn.Module):
    """Leaky ReLU with a fixed slope, or a learnable one (ReLU's Revival): ``slope`` is a Parameter,
    possibly shared by every block (global slope)."""

    def __init__(self, slope: torch.Tensor | float):
        super().__init__()
        if isinstance(slope, nn.Parameter):
            self.slope = slope
        else:
            self.register_buffer("slope", torch.tensor(float(slope)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, x * self.slope)


# registry op -> the torch module computing it (privlm.opregistry.ACTIVATIONS picks the op per model.activation)
_TORCH_ACTIVATIONS = {"aten.gelu.default": lambda approximate: GELUTanh() if approximate == "tanh" else nn.GELU(),
                      "aten.relu.default": nn.ReLU, "aten.silu.default": nn.SiLU}


def make_activation(cfg: ModelConfig, shared_slope: nn.Parameter | None) -> nn.Module:
    spec = ACTIVATIONS[cfg.activation]
    if spec is None:
        return nn.Identity()
    if spec.op != "leaky_relu":
        return _TORCH_ACTIVATIONS[spec.op](**dict(spec.kwargs))
    if cfg.leaky_slope_learnable == "global":
        return LeakyReLU(shared_slope)
    if cfg.leaky_slope_learnable == "layer":
        return LeakyReLU(nn.Parameter(torch.tensor(float(cfg.leaky_slope))))
    return LeakyReLU(cfg.leaky_slope)


class FFN(nn.Module):
    """Eq. 4: FFN(X) = act(X W_in) W_out, W_in in R^{d x h}, W_out in R^{h x d} (h = 4d by default)."""

    def __init__(self, cfg: ModelConfig, shared_slope: nn.Parameter | None = None):
        super().__init__()
        self.fc_in = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias)
        self.act = make_activation(cfg, shared_slope)
        self.fc_out = nn.Linear(cfg.ffn_width, cfg.n_embd, bias=cfg.bias)
        self.hook_pre_act = HookPoint()
        self.hook_post_act = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.hook_post_act(self.act(self.hook_pre_act(self.fc_in(x)))))


class FusedFFN(nn.Module):
    """SM+ScFuFFN: one d x d linear map, trained from scratch (docs/DECISIONS.md#fused-and-pruned-ffns)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def make_ffn(cfg: ModelConfig, shared_slope: nn.Parameter | None = None) -> nn.Module:
    return FusedFFN(cfg) if cfg.ffn == "fused" else FFN(cfg, shared_slope)


@torch.no_grad()
def fuse_linear_ffn(ffn: FFN, cfg: ModelConfig) -> FusedFFN:
    """Collapse a linear-only two-matrix FFN into one d x d map: W = W_out W_in, b = W_out b_in + b_out."""
    if not isinstance(ffn.act, nn.Identity):
        raise ValueError(f"cannot fuse an FFN with activation {type(ffn.act).__name__}; only linear FFNs fuse")
    fused = FusedFFN(cfg).to(ffn.fc_in.weight.device, ffn.fc_in.weight.dtype)
    w_in, w_out = ffn.fc_in.weight, ffn.fc_out.weight  # parametrized (WN/SN) weights resolve here
    fused.fc.weight.copy_(w_out @ w_in)
    if fused.fc.bias is not None:
        b_in = ffn.fc_in.bias if ffn.fc_in.bias is not None else torch.zeros_like(ffn.fc_in.weight[:, 0])
        b_out = ffn.fc_out.bias if ffn.fc_out.bias is not None else torch.zeros_like(ffn.fc_out.weight[:, 0])
        fused.fc.bias.copy_(w_out @ b_in + b_out)
    return fused
