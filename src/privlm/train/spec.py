"""What a training run is made of, as plug-ins (torchtitan's ``TrainSpec`` is the model): the model builder,
the loss terms added to each micro-batch's cross-entropy, and the observers of the training run. The
loop (`privlm.train.loop`) calls them through ``LossTerm`` below and `privlm.train.observers.Observer` and
knows none of them by name; ``PRIVLM`` is privlm's own spec: the GPT of the config, Algorithm 1's entropy
regularizer when ``reg.enabled`` (``EntropyTerm``), and three observers: the telemetry (metrics.jsonl,
TensorBoard, console), the entropy log (every ``train.entropy_every`` steps) and the divergence flight recorder
(every ``train.flight_every`` steps). ``UNOBSERVED`` is the same run with no observer at all: what
tests/test_observers.py and bench/observer_overhead.py compare against.

A loss term may own trainable parameters (``module``): the loop optimizes them without weight decay,
averages their gradients across DDP ranks (``after_backward``) and checkpoints them. The checkpoint format
has one such module, the entropy thresholds theta (``entropy_reg.safetensors``), so a spec has at most one
term with a ``module``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from privlm.config import Config
from privlm.entropy.regularizer import EntropyRegularizer
from privlm.train.observers import Observer, RunInfo

__all__ = ["TrainSpec", "LossTerm", "Observer", "RunInfo", "EntropyTerm", "PRIVLM", "UNOBSERVED"]


class LossTerm(Protocol):
    module: Optional[nn.Module]  # trainable parameters of the term, or None
    needs_entropy: bool  # whether the forward must compute the per-query attention entropy
    stat_names: tuple[str, ...]  # the statistics ``__call__`` returns, logged with the entropy telemetry

    def __call__(self, out: Any, progress: float,
                 want_stats: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(term to add to this micro-batch's CE or None, statistics [len(stat_names)] on the device or None);
        ``out`` is the model's forward output, ``progress`` = step / max_steps."""
        ...

    def after_backward(self, distributed: bool) -> None: ...

    def final_record(self) -> dict: ...


@dataclass(frozen=True)
class TrainSpec:
    name: str
    build_model: Callable[[Config], nn.Module]
    build_loss_terms: Callable[[Config], list]
    build_observers: Callable[[nn.Module, Config, RunInfo], list]  # -> [Observer]


class EntropyTerm:
    """Algorithm 1 as a loss term: ``EntropyRegularizer.term`` (the HF trainer's implementation too)."""

    needs_entropy = True
    stat_names = EntropyRegularizer.STATS

    def __init__(self, cfg: Config):
        self.module = EntropyRegularizer(cfg.model.n_layer, cfg.model.n_head, cfg.data.seq_len, cfg.reg)

    def __call__(self, out: Any, progress: float,
                 want_stats: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        term, l_ent = self.module.term(out.entropy, progress)
        stats = self.module.stats_tensor(out.entropy, l_ent) if term is not None and want_stats else None
        return term, stats

    def after_backward(self, distributed: bool) -> None:
        if distributed:  # theta lives outside DDP: average its gradient by hand
            self.module.all_reduce_grad()

    def final_record(self) -> dict:
        return {"thresholds": self.module.theta.detach().float().cpu().tolist()}


def _gpt(cfg: Config) -> nn.Module:
    from privlm.model import GPT
    return GPT(cfg.model)


def _loss_terms(cfg: Config) -> list:
    return [EntropyTerm(cfg)] if cfg.reg.enabled else []


def _observers(model: nn.Module, cfg: Config, run: RunInfo) -> list:
    from privlm.train.flight_recorder import FlightRecorder
    from privlm.train.telemetry import EntropyLog, Telemetry
    telemetry = Telemetry.for_run(run)
    return [telemetry, EntropyLog(cfg.train.entropy_every, cfg.data.seq_len, telemetry, run.dist),
            FlightRecorder.for_training(model, cfg.train)]  # hooks only; no extra forward


def _no_observers(model: nn.Module, cfg: Config, run: RunInfo) -> list:
    return []


PRIVLM = TrainSpec("privlm", _gpt, _loss_terms, _observers)
UNOBSERVED = TrainSpec("privlm-unobserved", _gpt, _loss_terms, _no_observers)
