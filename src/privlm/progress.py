"""Live progress of training runs: one line per run -- tokens, tok/s, ETA, loss -- on a terminal only.

``privlm train`` and a serial ``privlm sweep`` draw the line with tqdm from the trainer's telemetry
(`privlm.train.telemetry`). With ``privlm sweep --jobs N`` (and ``privlm demo``) each run trains in its own
process whose console goes to a log file: the process writes a small JSON status file (``status_path``) at
every log step, and the sweep process draws one tqdm line per running run (``ProgressBoard``, ``position=``)
from those files. Off a terminal (or with ``CI`` set) nothing is drawn: log files and pipes get no bars.

A leaf module: standard library, ``privlm.fileio`` and, lazily, tqdm.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from privlm.fileio import atomic_write_json

STATUS_SUFFIX = ".progress.json"


def is_interactive() -> bool:
    """A progress line only makes sense on a terminal, and never in CI logs."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def status_path(log_dir: Path, run_name: str) -> Path:
    """Where the process of run ``run_name`` reports its progress (beside its log file)."""
    return Path(log_dir) / f"{run_name}{STATUS_SUFFIX}"


def eta_seconds(tokens: int, total: int, tok_per_s: float) -> Optional[float]:
    """Seconds left at the current throughput (None before any throughput is known)."""
    if not tok_per_s or not math.isfinite(tok_per_s) or tok_per_s <= 0:
        return None
    return max(total - tokens, 0) / tok_per_s


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def progress_text(tokens: int, total: int, tok_per_s: float, loss: Optional[float]) -> str:
    """``'245.8k/983.0k tok | 5.2k tok/s | ETA 2:21 | loss 4.1234'``: the one line of a run."""
    loss_text = "?" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"
    return (f"{_count(tokens)}/{_count(total)} tok | {_count(tok_per_s)} tok/s | "
            f"ETA {_clock(eta_seconds(tokens, total, tok_per_s))} | loss {loss_text}")


def write_status(path: Path, *, step: int, max_steps: int, tokens: int, total_tokens: int, tok_per_s: float,
                 loss: Optional[float], done: bool = False) -> None:
    """The run's progress for the process that draws it (atomic: a reader never sees half a file)."""
    atomic_write_json(Path(path), {"step": step, "max_steps": max_steps, "tokens": tokens,
                                   "total_tokens": total_tokens, "tok_per_s": tok_per_s,
                                   "loss": loss if loss is None or math.isfinite(loss) else None, "done": done})


def read_status(path: Path) -> Optional[dict]:
    """A status file's content, or None while there is none (or it cannot be read: the next poll will)."""
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


class ProgressBoard:
    """One live line per running run for the sweep process (``--jobs N``), read from the runs' status files.
    Draws nothing when ``enabled`` is False (default: off a terminal)."""

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = is_interactive() if enabled is None else enabled
        self._bars: dict[str, tuple] = {}  # name -> (tqdm line, position)
        self._free: list[int] = []

    def update(self, name: str, path: Path) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        if name not in self._bars:
            pos = self._free.pop(0) if self._free else len(self._bars)
            self._bars[name] = (tqdm(total=0, position=pos, bar_format="{desc}", file=sys.stderr, leave=False,
                                     dynamic_ncols=True), pos)
        status = read_status(path)
        text = "starting" if status is None else progress_text(status["tokens"], status["total_tokens"],
                                                                 status["tok_per_s"], status["loss"])
        self._bars[name][0].set_description_str(f"{name}: {text}")

    def remove(self, name: str) -> None:
        entry = self._bars.pop(name, None)
        if entry is not None:
            self._free.append(entry[1])
            self._free.sort()
            entry[0].close()

    def close(self) -> None:
        for name in list(self._bars):
            self.remove(name)
