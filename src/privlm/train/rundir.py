"""A run directory's lifecycle and resume diffing, for the training loop: claiming the directory (lock, checks,
leftovers of a killed writer), restarting a run that died before its first checkpoint, what a resume's config
changes (and the record of them), and whether the data built now is the run's."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from privlm.config import RESUME_OVERRIDABLE, Config, ConfigError, config_changes, to_yaml
from privlm.errors import CheckpointError
from privlm.fileio import RunDirectory
from privlm.train.checkpoint import LOCK, RunLock, has_checkpoint, latest_checkpoint, remove_leftovers

# Records of a failed attempt that `--resume` of a run without any checkpoint replaces when it starts again.
ATTEMPT_RECORDS = ("metrics.jsonl", "summary.json", "entropy.json", "tb")


def check_run_dir(run_dir: Path, resume: bool) -> bool:
    """A new run never writes into a non-empty directory; a resume needs a run directory. Returns whether
    there is a checkpoint to continue from (a resume without one starts the run again from step 0)."""
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"cannot resume: '{run_dir}' is not a run directory (no config.yaml)")
        if not has_checkpoint(run_dir):
            return False
        latest_checkpoint(run_dir)
        return True
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out '{run_dir}' exists and is not a directory")
    if run_dir.is_dir() and any(p.name != LOCK and not p.name.endswith(".tmp") for p in run_dir.iterdir()):
        if (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"run directory '{run_dir}' is not empty: it holds a run; choose another --out or "
                                  f"continue it with --resume {run_dir}")
        raise CheckpointError(f"--out '{run_dir}' already exists and is not empty (and is not a run "
                              f"directory); choose another --out")
    return False


def claim_run_dir(run_dir: Path, resume: bool) -> tuple[RunLock, bool]:
    """Take the run's writer lock (refusing at once if another process holds it), check the directory,
    remove what a killed writer left behind. Returns (lock, whether a checkpoint exists). A directory holding a
    symbolic link anywhere is refused before anything is written (see `RunDirectory.check_tree`)."""
    RunDirectory(run_dir).check_tree()
    lock = RunLock(run_dir)
    try:
        if os.path.lexists(lock.path):  # a live writer is the first thing to report
            lock.acquire()
        check_run_dir(run_dir, resume)  # before creating anything in a directory we may not use
        run_dir.mkdir(parents=True, exist_ok=True)
        if not lock.held:
            lock.acquire()
        remove_leftovers(run_dir)
        return lock, check_run_dir(run_dir, resume)  # again under the lock: the state may have changed
    except BaseException:
        lock.release()
        raise


def resume_config_changes(run_dir: Path, cfg: Config) -> dict[str, list]:
    """What the config given for a resume changes in the run's config.yaml; only the optimizer, schedule,
    cadences, device and regularizer strength may change (RESUME_OVERRIDABLE)."""
    from privlm.run import load_run_config
    changes = config_changes(load_run_config(run_dir), cfg)
    changes.pop("model.vocab_size", None)  # set from the tokenizer, not by the user
    fixed = [k for k in changes if k not in RESUME_OVERRIDABLE]
    if fixed:
        raise ConfigError(f"{fixed[0]} cannot change when resuming a run (it would no longer be the run its "
                          f"checkpoint describes); changeable: {', '.join(sorted(RESUME_OVERRIDABLE))}")
    return changes


def record_config(run: RunDirectory, cfg: Config, step: int, changes: dict[str, list], rewrite: bool) -> None:
    """Write config.yaml; on a resume with overrides also log them, with the step they take effect at,
    to config_history.jsonl."""
    if rewrite and changes:  # a new or restarted run wrote its config.yaml before anything else
        run.write_text("config.yaml", to_yaml(cfg))
    if changes:
        with run.open_append("config_history.jsonl") as fh:
            fh.write(json.dumps({"step": step, "changes": changes}) + "\n")
        print(f"from step {step + 1}: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
              flush=True)


def clear_failed_attempt(run: RunDirectory) -> None:
    """A --resume of a run without any checkpoint starts it again: its records and uncommitted
    checkpoints go."""
    for name in ATTEMPT_RECORDS:
        run.remove(name)
    for rel in run.entries("state", pattern="step-*"):  # never committed (no LATEST): incomplete
        run.remove(rel)


def owns_data(run_dir: Path) -> bool:
    """Whether the run directory already holds the run's tokenizer and data manifest (a resumed run, or
    a restarted one that got as far)."""
    return (run_dir / "tokenizer.json").is_file() and (run_dir / "data_manifest.json").is_file()


def split_fingerprint(manifest: dict) -> Any:
    """What identifies the token splits in a data manifest (hashes and counts, not cache paths or timings)."""
    splits = {name: {k: v for k, v in split.items() if k in ("sha256", "documents", "bytes", "tokens", "chunks")}
              for name, split in manifest.get("splits", {}).items()}
    return {"splits": splits, "tokenizer": manifest.get("tokenizer", {}).get("sha256"),
            "seq_len": manifest.get("seq_len")}


def check_run_data(run_dir: Path, manifest: dict) -> None:
    """The data built now must be the run's (its data_manifest.json): resuming on other data would not continue
    the same run."""
    from privlm.validate import read_json
    saved = read_json(run_dir / "data_manifest.json")  # size, depth, schema
    if split_fingerprint(saved) != split_fingerprint(manifest):
        raise CheckpointError(f"the data built now differs from the run's data_manifest.json "
                              f"({split_fingerprint(manifest)} vs {split_fingerprint(saved)}); "
                              f"resuming would not continue the same run")


def run_status(run_dir: Path) -> str:
    """'done' (summary.json), 'resumable' (a checkpoint), 'incomplete' (a dir without checkpoint), 'new'."""
    if (run_dir / "summary.json").is_file():
        return "done"
    if not run_dir.exists():
        return "new"
    from privlm.train.checkpoint import latest_checkpoint
    try:
        latest_checkpoint(run_dir)
        return "resumable"
    except CheckpointError:
        return "incomplete" if any(run_dir.iterdir()) else "new"
