"""Exceptions whose message is shown to the user as one line (the CLI exits non-zero on them), and the
argument parser whose usage errors are one line too."""

import argparse


class PrivlmError(Exception):
    """Base of every user-facing error: bad config, bad data, corrupt checkpoint, divergence."""

    exit_code = 2


class ConfigError(PrivlmError, ValueError):
    """A configuration problem, reported as one line naming the offending key (defined here so that both
    privlm.config and the preset table it reads can raise it without importing each other)."""


class DataError(PrivlmError):
    """Missing, empty or unusable data."""


class CheckpointError(PrivlmError):
    """Missing or corrupt run directory / checkpoint."""


class UnsafePathError(PrivlmError):
    """A write, deletion or lock under a run, sweep or export directory that would follow a symbolic link or
    leave the directory (see privlm.fileio.RunDirectory)."""


class ResourceError(PrivlmError):
    """A model, batch or file too large for this machine (estimated before anything is allocated)."""


class DivergenceError(PrivlmError):
    """Training produced NaN/Inf; the last good checkpoint is kept."""

    exit_code = 3


def one_line(text: str) -> str:
    """A message as one line: newlines and other control characters (from a path, say) are escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before a usage error; every other privlm error is one line,
    so usage errors are one line as well (the usage stays in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def bounded_int(lo: int, hi: int):
    """argparse type of an integer option in lo..hi (counts, sizes, seeds): one-line usage errors for words,
    values below ``lo`` and values above ``hi`` (e.g. ``--seed 2**70``, ``--max-new-tokens 10**9``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} must be a positive integer" if lo == 1 else
                                             f"{value} must be >= {lo}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"{value} is too large (at most {hi:,})")
        return value
    parse.__name__ = "int"
    return parse


MAX_COUNT = 2**31 - 1   # batches, runs, steps counted on the command line
MAX_SEED = 2**63 - 1    # torch and numpy take seeds below 2^64; privlm keeps them in a signed 64-bit int
MAX_T = 2**20           # tokens of one sequence (no supported model has more positions)
MAX_BATCH = 2**16       # sequences of one batch
MAX_VOCAB = 2**22       # tokens of a vocabulary (config.UPPER's model.vocab_size)

positive_int = bounded_int(1, MAX_COUNT)
seed_int = bounded_int(0, MAX_SEED)


def bounded_float(lo: float, hi: float, zero_ok: bool = False):
    """argparse type of a real-valued option in [lo, hi] (0 also allowed when ``zero_ok``): NaN, infinities
    and out-of-range values are one-line usage errors."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if not (lo <= value <= hi or (zero_ok and value == 0)):
            raise argparse.ArgumentTypeError(f"{text} must be {'0 or ' if zero_ok else ''}in [{lo:g}, {hi:g}]")
        return value
    parse.__name__ = "float"
    return parse


def finite_float(text: str) -> float:
    """argparse type of real-valued options (--temperature): NaN and infinities are refused."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value
