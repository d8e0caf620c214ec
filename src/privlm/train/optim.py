"""AdamW with the paper's decay groups and the learning-rate schedules (docs/DECISIONS.md#training-recipe)."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn

from privlm.config import TrainConfig


def lr_multiplier(step: int, max_steps: int, warmup_frac: float, schedule: str, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) as a fraction of the peak lr.

    Linear warmup over ``round(warmup_frac * max_steps)`` steps (nanoGPT's (s+1)/(w+1), so the first step
    already moves), then ``linear`` decay to min_lr (HF's polynomial schedule with power 1, as in the
    CodeParrot runs), ``cosine`` decay to min_lr (Languini), or ``constant``.
    """
    warmup = round(warmup_frac * max_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra_no_decay: Optional[nn.Module] = None,
                    device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``GPT.optimizer_groups``: no decay on vectors and scalars nor on what the modules declare in
    ``no_weight_decay()`` (temperatures, WN gains, and the entropy regularizer's thresholds theta)."""
    groups = [g for g in model.optimizer_groups(cfg.weight_decay, extra=extra_no_decay) if g["params"]]
    if extra_no_decay is not None:
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        if any(id(p) in decayed for p in extra_no_decay.parameters()):
            raise RuntimeError("entropy thresholds landed in the weight-decay group; see GPT.optimizer_groups")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device_type in ("cuda", "cpu"):  # the fused kernel: one launch for all parameters
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # dtype/device combination without a fused kernel
            pass
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of the config's schedule. ``steps_done`` > 0 (a resume) starts it after that many steps:
    the optimizer's groups must hold ``initial_lr`` (the peak learning rate), and their ``lr`` is set to that of
    the next step, ``initial_lr * lr_multiplier(steps_done)``, by the scheduler itself."""
    fn = functools.partial(lr_multiplier, max_steps=cfg.max_steps, warmup_frac=cfg.warmup_frac,
                           schedule=cfg.schedule, min_ratio=cfg.min_lr / cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=steps_done - 1)
