"""The entropy regularizer of Algorithm 1 (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1): learnable per-head thresholds and a two-sided penalty.

    delta_{l,h}   = E^{(l,h)} - theta_{l,h} * E_max,            E_max = log T
    penalty_{l,h} = delta_{l,h}^2 * 1[ |delta_{l,h}| > gamma * E_max ]
    L_ent         = (1/L) sum_l (1/H) sum_h penalty_{l,h},        L_total = L_CE + lambda * L_ent

Two reductions (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1):
  ``paper``          E^{(l,h)} is the head entropy of Eq. 7 estimated on the batch (mean over batch and
                     query positions), then penalized once per head.
  ``released_code``  the penalty is applied to every per-query entropy E_{b,l,h,i} and *summed* over batch
                     and queries, as ``entropy_regularization.py`` of the official repository does; its scale
                     grows with B*T, so lambda means something different (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1).

Everything is vectorized over layers, heads, batch and queries and computed in float32 whatever the
autocast dtype of the forward pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from privlm.entropy.measure import head_entropy

REDUCTIONS = ("paper", "released_code")


def threshold_deviation(entropy, theta, T: int):
    """delta = E - theta * E_max (nats), E_max = log T: how far an entropy lies from its head's threshold.
    Works on torch tensors and numpy arrays; ``theta`` broadcasts against ``entropy``."""
    return entropy - theta * math.log(T)


def outside_band(delta, gamma: float, T: int):
    """The hinge of Algorithm 1: whether a deviation leaves the tolerance band |delta| <= gamma * E_max."""
    return abs(delta) > gamma * math.log(T)


def regularization_loss(entropy: torch.Tensor, theta: torch.Tensor, T: int, gamma: float,
                        reduction: str = "paper") -> torch.Tensor:
    """Algorithm 1: L_entropy (before lambda) from per-query entropies.

    entropy: [L, B, H, T_q] per-query attention entropy in nats (``GPT(...)(idx, output_entropy=True).entropy``);
    theta: [L, H] thresholds as fractions of E_max; T: the context size defining E_max = log T;
    gamma: tolerance-margin factor (margin = gamma * E_max); reduction: ``paper`` | ``released_code``.
    NaN entropies propagate (a NaN attention matrix means training already diverged; hiding it would
    let the run continue on a corrupt model).
    """
    if entropy.dim() != 4:
        raise ValueError(f"entropy must have shape [L, B, H, T], got {tuple(entropy.shape)}")
    L, _, H, _ = entropy.shape
    if tuple(theta.shape) != (L, H):
        raise ValueError(f"theta must have shape [L, H] = [{L}, {H}], got {tuple(theta.shape)}")
    if T < 2:
        raise ValueError(f"T={T}: E_max = log T needs T >= 2")
    # at least float32: under autocast the squared deviations must not be taken in bf16/fp16
    dtype = torch.promote_types(torch.promote_types(entropy.dtype, theta.dtype), torch.float32)
    ent, theta = entropy.to(dtype), theta.to(dtype)
    if reduction == "paper":
        delta = threshold_deviation(head_entropy(ent), theta, T)  # [L, H]: Eq. 7 head entropy on this batch
        penalty = delta.square() * outside_band(delta, gamma, T)
        return penalty.mean()  # mean over heads then layers (equal counts: same as the overall mean)
    if reduction == "released_code":
        delta = threshold_deviation(ent, theta[:, None, :, None], T)  # [L, B, H, T]
        penalty = delta.square() * outside_band(delta, gamma, T)
        return penalty.sum(dim=(1, 3)).mean()  # sum over batch x queries, mean over heads then layers
    raise ValueError(f"reduction='{reduction}' is not one of {', '.join(REDUCTIONS)}")


class EntropyRegularizer(nn.Module):
    """Holds the learnable thresholds theta in R^{L x H} and evaluates Algorithm 1.

    ``reg(entropy) -> l_ent``: the scalar L_entropy before lambda; ``reg.term(entropy, progress)`` is what both
    trainers add to the CE (``lambda_ * l_ent`` while the penalty is on); ``reg.stats_tensor(...)`` the logged
    statistics, on the device.

    The parameter is registered as ``reg_threshold_weights`` (the official name), declared in
    ``no_weight_decay()`` so that ``GPT.optimizer_groups(wd, extra=reg)`` never decays it, and is reachable as
    ``reg.theta``.

    DDP: theta is an ordinary parameter. If the regularizer is not inside the DDP-wrapped module, call
    ``reg.all_reduce_grad()`` after backward so that every rank applies the same update. The ``paper``
    reduction estimates E^{(l,h)} from the *local* micro-batch (as the official code does per process); the
    expected gradient differs from a global-batch estimate only through the hinge, which is negligible for
    batches of thousands of query rows.
    """

    def __init__(self, n_layer: int, n_head: int, seq_len: int, reg_cfg) -> None:
        super().__init__()
        if reg_cfg.reduction not in REDUCTIONS:
            raise ValueError(f"reg.reduction='{reg_cfg.reduction}' is not one of {', '.join(REDUCTIONS)}")
        self.n_layer, self.n_head, self.seq_len = n_layer, n_head, seq_len
        self.gamma = float(reg_cfg.gamma)
        self.lambda_ = float(reg_cfg.lambda_)
        self.reduction = reg_cfg.reduction
        self.start_frac = float(reg_cfg.start_frac)
        self.stop_frac = float(reg_cfg.stop_frac)
        self.reg_threshold_weights = nn.Parameter(torch.full((n_layer, n_head), float(reg_cfg.theta_init)))

    def no_weight_decay(self) -> set[str]:
        # thresholds are targets in nats, not weights: decay would pull every head's target toward zero entropy
        return {"reg_threshold_weights"}

    @property
    def theta(self) -> nn.Parameter:
        return self.reg_threshold_weights

    @property
    def e_max(self) -> float:
        return math.log(self.seq_len)

    def active(self, progress: float) -> bool:
        """Whether the penalty is on at ``progress`` = step / max_steps (start inclusive, stop exclusive,
        except that stop_frac = 1 keeps it on through the last step)."""
        return self.start_frac <= progress and (progress < self.stop_frac or self.stop_frac >= 1.0)

    def forward(self, entropy: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
        """entropy [L, B, H, T] -> L_ent before lambda. ``T`` overrides the context size that defines
        E_max = log T (default: the ``seq_len`` given at construction)."""
        T = self.seq_len if T is None else T
        return regularization_loss(entropy, self.theta, T, self.gamma, self.reduction)

    def term(self, entropy: torch.Tensor, progress: float, T: Optional[int] = None,
             keep_in_graph: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Algorithm 1 for one micro-batch, the one implementation both trainers use (privlm's loop and
        ``EntropyRegularizedTrainer``): ``(lambda * L_ent, L_ent)`` to add to that micro-batch's CE when the
        penalty is on at ``progress`` = step / max_steps, else ``(None, None)``; with ``keep_in_graph`` an
        inactive penalty returns ``0 * theta.sum()`` instead of None (theta inside a DDP-wrapped model must take
        part in every backward). Lambda is ``reg.lambda_`` (from the run's ``RegConfig``), its only source. The
        caller scales the term with the CE for gradient accumulation."""
        if not self.active(progress):
            return (0.0 * self.theta.sum() if keep_in_graph else None), None
        l_ent = self(entropy, T)
        return self.lambda_ * l_ent, l_ent

    STATS = ("l_ent", "outside_share", "mean_abs_dev", "theta_mean", "theta_std")

    @torch.no_grad()
    def stats_tensor(self, entropy: torch.Tensor, l_ent: Optional[torch.Tensor] = None,
                     T: Optional[int] = None) -> torch.Tensor:
        """The ``STATS`` as one float32 tensor on the entropy's device (no host sync): L_ent (NaN when not
        given), the share of heads whose batch head entropy lies outside theta*E_max +- gamma*E_max, mean
        |E - theta*E_max| in nats, and theta mean/std."""
        T = self.seq_len if T is None else T
        dev = threshold_deviation(head_entropy(entropy.detach()), self.theta.detach().float(), T)
        outside = outside_band(dev, self.gamma, T).float().mean()
        theta = self.theta.detach().float()
        return torch.stack([
            l_ent.detach().float() if l_ent is not None else torch.tensor(float("nan"), device=dev.device),
            outside, dev.abs().mean(), theta.mean(), theta.std(unbiased=False),
        ])

    def stats(self, entropy: torch.Tensor, l_ent: Optional[torch.Tensor] = None,
              T: Optional[int] = None) -> dict[str, float]:
        """``stats_tensor`` as a dict of floats (one host sync)."""
        return dict(zip(self.STATS, self.stats_tensor(entropy, l_ent, T).tolist()))

    def all_reduce_grad(self) -> None:
        """Average theta's gradient across DDP ranks (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and self.theta.grad is not None:
            dist.all_reduce(self.theta.grad)  # SUM then divide: gloo has no ReduceOp.AVG
            self.theta.grad.div_(dist.get_world_size())

    def extra_repr(self) -> str:
        return (f"L={self.n_layer}, H={self.n_head}, T={self.seq_len}, gamma={self.gamma}, "
                f"lambda={self.lambda_}, reduction={self.reduction}")
