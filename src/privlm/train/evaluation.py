"""Validation perplexity: exp of the mean next-token cross-entropy over every token of the split."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from privlm.entropy.measure import measure_model, privlm_entropy
from privlm.train.batches import eval_batches
from privlm.train.distributed import DistInfo, all_reduce_sum
from privlm.train.precision import Precision


def shift_targets(chunk: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a [B, T] chunk; the last position has none (-100 = ignored), as HF's
    causal-LM loss on T-token chunks: T-1 predictions per chunk, the model still sees all T tokens."""
    targets = torch.full_like(chunk, -100)
    targets[:, :-1] = chunk[:, 1:]
    return targets


class EvalResult(NamedTuple):
    loss: float  # mean token cross-entropy (nats)
    ppl: float
    tokens: int  # predicted tokens it averages over

    def to_dict(self) -> dict:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens}


def perplexity(mean_ce: float) -> float:
    """PPL = exp(mean token cross-entropy); inf when it overflows."""
    try:
        return math.exp(mean_ce)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate(model: torch.nn.Module, chunks: np.ndarray, batch_size: int, precision: Precision,
             dist_info: Optional[DistInfo] = None, max_batches: Optional[int] = None) -> EvalResult:
    """Token-weighted mean CE over the split (sum of per-token losses / number of predicted tokens)."""
    info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=precision.device)  # [sum CE, tokens]
    for chunk in eval_batches(chunks, batch_size, info.rank, info.world, max_batches):
        chunk = chunk.to(precision.device, non_blocking=True)
        targets = shift_targets(chunk)
        with precision.autocast():
            out = model(chunk, targets)
        n = (targets != -100).sum()
        total[0] += out.loss.double() * n
        total[1] += n
    model.train(was_training)
    all_reduce_sum(total, info)
    tokens = int(total[1].item())
    if tokens == 0:
        from privlm.errors import DataError
        raise DataError("the validation split is empty: nothing to evaluate")
    loss = float(total[0].item() / tokens)
    return EvalResult(loss, perplexity(loss), tokens)


def measure_entropy(model: torch.nn.Module, chunks: np.ndarray, batch_size: int, precision: Precision,
                    max_batches: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head attention entropy [L, H] (Eq. 7: mean over queries, averaged over sequences) and the
    per-layer NaN counts [L] of the attention matrices, on the given chunks, under the run's precision."""
    def entropy_under_autocast(m: torch.nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with precision.autocast():
            return privlm_entropy(m, idx)

    matrix, nans, _ = measure_model(model, eval_batches(chunks, batch_size, max_batches=max_batches),
                                    precision.device, entropy_under_autocast)
    return torch.from_numpy(matrix).float(), torch.from_numpy(nans).long()
