"""Atomic checkpoints of a run directory (layout in docs/CONTRACTS.md).

A checkpoint is a directory ``state/step-XXXXXXXX/`` (weights, regularizer thresholds, optimizer,
scheduler, grad scaler, RNG states, data position) made visible by atomically rewriting the pointer file
``state/LATEST``; ``state/BEST`` then names the checkpoint of lowest validation loss, whose weights become
``model.safetensors`` and ``entropy_reg.safetensors`` at the top of the run (link/copy to a temp name +
rename), and every checkpoint other than the latest and the best is deleted. A SIGKILL at any moment leaves
either the previous or the new checkpoint complete, never a mix, and never loses the best one. Every write and
deletion goes through `privlm.fileio.RunDirectory` (no symbolic link is followed).

Nothing in a checkpoint is pickled: a run directory may come from anyone, and unpickling runs code. The
optimizer/scheduler/scaler and RNG states are nested Python structures holding tensors; `save_state`
stores the tensors as safetensors and the structure around them as JSON in the file's metadata, so
loading one can only ever produce tensors, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from privlm.errors import CheckpointError
from privlm.fileio import RunDirectory, fsync_dir, path_state, use_umask

WEIGHTS = "model.safetensors"
REG_WEIGHTS = "entropy_reg.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
RNG_STATE = "rng.safetensors"
BEST = "BEST"  # state/BEST names the checkpoint of lowest validation loss; state/LATEST the newest
STATE_FORMAT = "privlm-state/1"
PICKLED_STATE = ("optimizer.pt", "rng.pt")  # the format before STATE_FORMAT; never unpickled


def _encode(obj, tensors: dict):
    """A JSON-able mirror of ``obj`` with every tensor moved into ``tensors`` (tuples, non-string dict keys
    and numpy arrays are tagged so that `_decode` rebuilds exactly the same types)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state file")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":  # numbers only: an object array would hold arbitrary Python values
            raise ValueError(f"array of dtype {dtype} is not allowed")
        return np.asarray(obj["__ndarray__"], dtype=dtype)
    if "__tuple__" in obj:
        return tuple(_decode(x, tensors) for x in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(path: Path, obj) -> None:
    """Write a nested structure of tensors, numbers, strings, lists, tuples and dicts without pickle."""
    tensors: dict = {}
    structure = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "structure": json.dumps(structure)})


def load_state(path: Path):
    """Read what `save_state` wrote; CheckpointError (one line, naming the file) if it is not such a file."""
    from safetensors import safe_open

    from privlm.validate import parse_json, safetensors_header
    safetensors_header(path)  # lengths bounded by the file before the library reads them
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} file (format {meta.get('format')!r})")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return _decode(parse_json(meta["structure"], f"'{path}' structure"), tensors)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or hand-edited files all mean "malformed"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint state file '{path}' is malformed: {first}") from None


LOCK = ".lock"


class RunLock:
    """The one writer of a run directory: an exclusive `flock` on ``RUN_DIR/.lock`` held for a whole
    train/resume (the kernel drops it when the process dies, so a SIGKILL never leaves a stale lock).
    Readers (eval, entropy, cost, report) never take it. The lock file is opened without following links
    (`RunDirectory.open_lock`): a ``.lock`` that is a link is refused, never truncated through."""

    def __init__(self, run_dir: Path):
        self.dir = RunDirectory(run_dir)
        self.path = self.dir.root / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        fd = self.dir.open_lock(LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"run directory '{self.path.parent}' is being written by another privlm "
                                  f"process (pid {holder}); wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and directories of a writer that was killed (only call while holding the RunLock)."""
    rd = RunDirectory(run_dir)
    for rel in [*rd.entries(pattern=".*.tmp"), *rd.entries("state", pattern=".*.tmp")]:
        rd.remove(rel)


def _atomic_place(rd: RunDirectory, src: Path, name: str) -> None:
    """Make ``rd.root / name`` a hard link (or copy) of ``src`` atomically."""
    dst = rd.path(name)
    tmp = f".{name}.tmp"
    rd.remove(tmp)
    try:
        os.link(src, rd.path(tmp))
    except OSError:  # file systems without hard links
        shutil.copyfile(src, rd.path(tmp))
    os.replace(rd.path(tmp), dst)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, source: Path | str = "the checkpoint") -> None:
    try:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except Exception as exc:  # noqa: BLE001 - wrong types/sizes from a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"checkpoint state file '{source}' holds an unusable RNG state: {first}") from None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, reg: Optional[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler, scaler, trainer_state: dict,
                    rng_states: list[dict], valid_loss: Optional[float] = None) -> Path:
    """Write checkpoint ``step`` (``valid_loss``: the validation loss of its weights, None without validation
    data) and return its directory. ``trainer_state`` is JSON (position, counters).

    Kept afterwards: the latest checkpoint (``state/LATEST``, what `--resume` continues) and the best one
    (``state/BEST``: lowest validation loss, the newer on a tie; the latest when no loss is known), whose
    weights are the run's ``model.safetensors``. Every other ``state/step-*`` is deleted."""
    rd = RunDirectory(run_dir)
    state_root = rd.mkdir("state")
    final = rd.path("state", f"step-{step:08d}")
    tmp = Path(tempfile.mkdtemp(dir=state_root, prefix=f".step-{step:08d}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
        if reg is not None:
            save_file({"theta": reg.theta.detach().float().cpu().contiguous()}, str(tmp / REG_WEIGHTS),
                      metadata={"step": str(step)})
        save_state(tmp / OPTIMIZER_STATE, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                           "scaler": scaler.state_dict() if scaler is not None else None})
        save_state(tmp / RNG_STATE, rng_states)
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "valid_loss": valid_loss},
                                                     indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        use_umask(tmp)  # safetensors writes 0600 files and mkdtemp a 0700 directory
        if path_state(final) is not None:  # a re-save of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(state_root)
    rd.write_text(Path("state") / "LATEST", final.name + "\n")  # the commit point
    best = best_checkpoint(run_dir)
    if best is None or _better(valid_loss, checkpoint_valid_loss(best)):
        rd.write_text(Path("state") / BEST, final.name + "\n")
        best = final
    _atomic_place(rd, best / WEIGHTS, WEIGHTS)
    if reg is not None and (best / REG_WEIGHTS).is_file():
        _atomic_place(rd, best / REG_WEIGHTS, REG_WEIGHTS)
    for rel in rd.entries("state", pattern="step-*"):
        if rel.name not in (final.name, best.name):
            rd.remove(rel)
    for rel in rd.entries("state", pattern=".step-*.tmp"):  # leftovers of a killed save
        rd.remove(rel)
    return final


def _better(new: Optional[float], old: Optional[float]) -> bool:
    """Whether a checkpoint of validation loss ``new`` replaces the best one of loss ``old`` (None: unknown;
    a known loss beats an unknown one, and with no loss known at all the newer checkpoint is the best)."""
    return old is None or (new is not None and new <= old)


def checkpoint_valid_loss(ckpt: Path) -> Optional[float]:
    """The validation loss recorded in a checkpoint's trainer.json (None when unknown or unreadable)."""
    try:
        loss = json.loads((Path(ckpt) / "trainer.json").read_text()).get("valid_loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / "state" / "LATEST").is_file()


def _named_checkpoint(pointer: Path) -> tuple[Path, bool]:
    name = pointer.read_text(errors="replace").strip()
    ckpt = pointer.parent / name
    ok = name.startswith("step-") and "/" not in name and (ckpt / "trainer.json").is_file() \
        and (ckpt / WEIGHTS).is_file()
    return ckpt, ok


def best_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``state/BEST`` names (lowest validation loss), None when there is none or it is gone."""
    pointer = Path(run_dir) / "state" / BEST
    if not pointer.is_file():
        return None
    ckpt, ok = _named_checkpoint(pointer)
    return ckpt if ok else None


def latest_checkpoint(run_dir: Path) -> Path:
    pointer = Path(run_dir) / "state" / "LATEST"
    if not pointer.is_file():
        raise CheckpointError(f"'{run_dir}' has no checkpoint to resume from (missing {pointer})")
    ckpt, ok = _named_checkpoint(pointer)
    if not ok:
        raise CheckpointError(f"checkpoint '{ckpt}' named by {pointer} is missing or incomplete")
    if not (ckpt / OPTIMIZER_STATE).is_file() and any((ckpt / f).exists() for f in PICKLED_STATE):
        raise CheckpointError(f"checkpoint '{ckpt}' uses the old pickled state format (optimizer.pt, rng.pt), "
                              f"which privlm no longer loads because unpickling can run code; its weights still "
                              f"serve eval/sample/entropy/cost, but it cannot be resumed")
    return ckpt


def load_checkpoint(ckpt: Path, model: torch.nn.Module, reg: Optional[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler, scaler) -> tuple[dict, list[dict]]:
    """Restore everything saved by `save_checkpoint`; return (trainer_state, per-rank RNG states)."""
    from privlm.validate import ANY, check_finite, read_json, safetensors_header
    current = ckpt / WEIGHTS
    safetensors_header(current)
    try:
        load_model(model, str(current), strict=True)
        check_finite(model.state_dict().items(), f"'{current}'")
        if reg is not None:
            current = ckpt / REG_WEIGHTS
            safetensors_header(current)
            theta = load_file(str(current))["theta"]
            with torch.no_grad():
                reg.theta.copy_(theta)
        current = ckpt / OPTIMIZER_STATE
        opt = load_state(current)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        if scaler is not None and opt["scaler"] is not None:
            scaler.load_state_dict(opt["scaler"])
        current = ckpt / RNG_STATE
        rngs = load_state(current)
        if not isinstance(rngs, list) or not all(isinstance(r, dict) and {"torch", "numpy", "python"} <= r.keys()
                                                 for r in rngs):
            raise CheckpointError(f"checkpoint state file '{current}' is malformed: not a list of per-rank "
                                  f"RNG states")
        current = ckpt / "trainer.json"
        trainer_state = read_json(current, ANY)  # size and depth bounded; its shape is checked below
        position = trainer_state.get("position") if isinstance(trainer_state, dict) else None
        if not (isinstance(position, dict) and set(position) == {"epoch", "cursor"}
                and all(isinstance(trainer_state.get(k), int) for k in ("step", "tokens"))
                and all(isinstance(v, int) and v >= 0 for v in position.values())):
            raise CheckpointError(f"checkpoint file '{current}' is malformed: it needs integer step, tokens and "
                                  f"position {{epoch, cursor}}")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode/shape problem is a corrupt checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot load checkpoint file '{current}': {first}") from None
    return trainer_state, rngs
