"""Reference perplexities a trained model must beat, computed with the run's own tokenizer."""
from __future__ import annotations

import math

import numpy as np


def unigram_ppl(train: np.ndarray, valid: np.ndarray, vocab_size: int, block: int = 1 << 20) -> tuple[float, float]:
    """(mean CE, PPL) of the add-one-smoothed unigram distribution of the training tokens, scored on the same
    validation targets as the model (positions 1..T-1 of every chunk). A context-free model: any LM worth
    the name must be far below it."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    flat = train.reshape(-1)
    for i in range(0, flat.size, block):  # bounded memory over a memory-mapped array
        counts += np.bincount(np.asarray(flat[i:i + block]), minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    targets = np.asarray(valid[:, 1:]).reshape(-1)
    loss = float(-log_p[targets].mean())
    return loss, math.exp(loss)
