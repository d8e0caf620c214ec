"""Training: loop, optimizer and schedule, checkpoints, telemetry, DDP (see loop.train). The names below are
imported on first use (`privlm train --help` imports no torch)."""
from typing import TYPE_CHECKING

from privlm.lazy import lazy_exports

if TYPE_CHECKING:
    from privlm.train.loop import Trainer, train

__all__ = ["Trainer", "train"]
lazy_exports(__name__, dict.fromkeys(__all__, "privlm.train.loop"))
