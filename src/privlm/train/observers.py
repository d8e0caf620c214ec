"""The observer plug-in of the training loop (a `privlm.train.spec.TrainSpec` composes them): what an observer
is told of a step, and of the run it observes. Observers read the training forward and the loop's records;
they never change training (tests/test_observers.py). A leaf of `privlm.train`: the observers themselves
(telemetry, entropy logging, the flight recorder) import it, and the spec imports them.

The loop's calls, in order, for an optimizer step ``step`` (1-based):
  ``wants_entropy(step)``  the step's forward computes the per-query attention entropy when any observer asks
                           (the fused+entropy path: the same output and gradients); such a step is read on the
                           host;
  ``begin(step)``          before the first micro-batch (attach hooks here, and only for the steps you record);
  ``micro_batch(out, stats)`` after each micro-batch's forward: the model output and the loss terms' statistics
                           (``{stat_names: [S] tensor}``, on entropy steps only), device tensors, not to be
                           changed;
  ``end(loss, grad_norm, lr)`` after the backward and the gradient clipping (device tensors: no host sync);
  ``nonfinite()``          on a step the host reads: whether the observer saw a divergence (NaN attention);
  ``stepped(step)``        after the optimizer update of a step that did not diverge;
and, whenever they happen: ``logged`` (a metrics interval), ``evaluated`` (a validation loss), ``message``
(a console line), ``dump`` (on divergence: write what was kept, return one line for the diagnosis), ``close``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class RunInfo:
    """What an observer may know of the run: its directory, whether this process writes it (rank 0), the
    console mode, the step the run starts from (a resume), tokens per optimizer step, the status file of a
    ``sweep --jobs`` run and the process group (`privlm.train.distributed.DistInfo`)."""
    run_dir: Path
    is_main: bool = True
    quiet: bool = True
    start_step: int = 0
    max_steps: int = 1
    tokens_per_step: int = 1
    status_file: Optional[Path] = None
    dist: Any = None


class Observer:
    """Every event a no-op: an observer overrides the ones it needs."""

    def wants_entropy(self, step: int) -> bool:
        return False

    def begin(self, step: int) -> None:
        pass

    def micro_batch(self, out: Any, stats: dict) -> None:
        pass

    def end(self, loss: Any, grad_norm: Any, lr: Optional[float]) -> None:
        pass

    def nonfinite(self) -> bool:
        return False

    def stepped(self, step: int) -> None:
        pass

    def logged(self, step: int, loss: float, lr: float, tokens: int, tok_per_s: float, grad_norm: float) -> None:
        pass

    def evaluated(self, step: int, loss: float, ppl: float, tokens: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def dump(self, run_dir: Any, step: int, loss: float, grad_norm: float, what: str) -> str:
        return ""

    def close(self) -> None:
        pass
