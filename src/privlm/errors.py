"""Exceptions whose message is shown to the user as one line (the CLI exits non-zero on them)."""


class PrivlmError(Exception):
    """Base of every user-facing error: bad config, bad data, corrupt checkpoint, divergence."""

    exit_code = 2


class DataError(PrivlmError):
    """Missing, empty or unusable data."""


class CheckpointError(PrivlmError):
    """Missing or corrupt run directory / checkpoint."""


class DivergenceError(PrivlmError):
    """Training produced NaN/Inf; the last good checkpoint is kept."""

    exit_code = 3
