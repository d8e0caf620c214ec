"""SPU's per-run link counters, read from its log.

SPU 0.9.5 has no Python API for the link counters; with ``RuntimeConfig.enable_pphlo_profile`` set, every
``Runtime.run`` ends with one log line ``Link details: total send bytes S, recv bytes R, send actions A,
recv actions B`` holding the counters' change during that run (its own traffic only: the input sharing
done outside ``run`` is counted separately by the caller). The log is written by a background logger,
so `LogTail.next_stats` polls until the line of the run it waits for has appeared.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), "
                     r"recv actions (\d+)")


@dataclass
class LinkStats:
    send_bytes: int = 0
    recv_bytes: int = 0
    send_actions: int = 0
    recv_actions: int = 0

    @property
    def bytes(self) -> int:
        """Traffic on the wire in both directions (what the paper's 'Comm.' counts)."""
        return self.send_bytes + self.recv_bytes

    @property
    def messages(self) -> int:
        return self.send_actions + self.recv_actions

    def __add__(self, other: "LinkStats") -> "LinkStats":
        return LinkStats(self.send_bytes + other.send_bytes, self.recv_bytes + other.recv_bytes,
                         self.send_actions + other.send_actions, self.recv_actions + other.recv_actions)

    def to_dict(self) -> dict:
        return {"send_bytes": self.send_bytes, "recv_bytes": self.recv_bytes, "send_actions": self.send_actions,
                "recv_actions": self.recv_actions, "bytes": self.bytes, "messages": self.messages}


def parse(text: str) -> list[LinkStats]:
    return [LinkStats(*map(int, m)) for m in LINK_RE.findall(text)]


class LogTail:
    """Follows an SPU system log and returns the link counters of each run in order."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        # start at the current end: an existing log holds earlier runs' lines
        self.pos = self.path.stat().st_size if self.path.exists() else 0
        self.pending: list[LinkStats] = []

    def next_stats(self, timeout: float = 30.0) -> LinkStats:
        deadline = time.monotonic() + timeout
        while not self.pending:
            if self.path.exists():
                with open(self.path, "rb") as fh:
                    fh.seek(self.pos)
                    data = fh.read()
                cut = data.rfind(b"\n") + 1  # only whole lines: the last one may still be half written
                self.pos += cut
                self.pending.extend(parse(data[:cut].decode("utf-8", errors="replace")))
            if self.pending:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'Link details' line appeared in {self.path} within {timeout:.0f}s "
                                   f"(is enable_pphlo_profile set on this party?)")
            time.sleep(0.005)
        return self.pending.pop(0)
