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


def positive_int(text: str) -> int:
    """argparse type of counts (--batch-size, --max-batches, --max-new-tokens...): one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


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
