"""Training: loop, optimizer and schedule, checkpoints, telemetry, DDP (see loop.train)."""
from privlm.train.loop import Trainer, train

__all__ = ["Trainer", "train"]
