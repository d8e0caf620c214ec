"""Deterministic, resumable batch order over pre-chunked token arrays, sharded over DDP ranks.

Each epoch visits the training chunks in a permutation drawn from (seed, epoch); an optimizer step takes
the next ``world * batch_size * grad_accum`` chunks of it (an incomplete tail is dropped, so every step
sees a full global batch). The whole order is a function of (seed, epoch, cursor), which is all that a
checkpoint needs to store for a bit-exact resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Position:
    epoch: int = 0
    cursor: int = 0  # chunks of the epoch's permutation already consumed (globally, all ranks)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


def epoch_permutation(n_chunks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


class BatchSchedule:
    """Yields, per optimizer step, this rank's ``grad_accum`` micro-batches as int64 tensors [b, T]."""

    def __init__(self, chunks: np.ndarray, batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world: int = 1, position: Position | None = None):
        self.chunks, self.b, self.accum, self.seed = chunks, batch_size, grad_accum, seed
        self.rank, self.world = rank, world
        self.global_batch = world * batch_size * grad_accum
        if len(chunks) < self.global_batch:
            from privlm.errors import DataError
            raise DataError(f"the training split has {len(chunks)} chunks, fewer than one global batch of "
                            f"{self.global_batch} (= processes {world} x train.batch_size {batch_size} x "
                            f"train.grad_accum {grad_accum}); use more data or a smaller batch")
        self.position = position or Position()
        self._perm = epoch_permutation(len(chunks), seed, self.position.epoch)

    def next_step(self) -> list[torch.Tensor]:
        pos = self.position
        if pos.cursor + self.global_batch > len(self._perm):
            pos.epoch, pos.cursor = pos.epoch + 1, 0
            self._perm = epoch_permutation(len(self.chunks), self.seed, pos.epoch)
        ids = self._perm[pos.cursor: pos.cursor + self.global_batch]
        pos.cursor += self.global_batch
        # micro-batch m of the global batch is [m*world*b, (m+1)*world*b); rank r takes its r-th slice, so
        # the union over ranks of each micro-batch equals the single-process micro-batch of size world*b.
        per_micro = self.world * self.b
        micro = []
        for m in range(self.accum):
            sel = np.sort(ids[m * per_micro + self.rank * self.b: m * per_micro + (self.rank + 1) * self.b])
            # sorted indices read the memmap sequentially; order inside a micro-batch does not matter
            micro.append(torch.from_numpy(np.asarray(self.chunks[sel], dtype=np.int64)))
        return micro


def eval_batches(chunks: np.ndarray, batch_size: int, rank: int = 0, world: int = 1,
                 max_batches: int | None = None):
    """Consecutive batches of the validation chunks; rank r takes every world-th batch."""
    n_batches = (len(chunks) + batch_size - 1) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for i in range(rank, n_batches, world):
        yield torch.from_numpy(np.asarray(chunks[i * batch_size:(i + 1) * batch_size], dtype=np.int64))
