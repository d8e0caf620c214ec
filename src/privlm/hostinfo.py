"""What machine a measurement ran on (benchmarks and calibrated cost profiles record it)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None


def describe_host() -> str:
    mem = memory_gib()
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs" + (f", {mem:.0f} GiB RAM" if mem else "")
            + f", Python {platform.python_version()}, {platform.system()} {platform.release()}")
