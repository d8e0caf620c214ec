"""Atomic checkpoints of a run directory (layout in docs/CONTRACTS.md).

A checkpoint is a directory ``state/step-XXXXXXXX/`` (weights, regularizer thresholds, optimizer,
scheduler, grad scaler, RNG states, data position) made visible by atomically rewriting the pointer file
``state/LATEST``; ``model.safetensors`` and ``entropy_reg.safetensors`` at the top of the run are then
replaced (link/copy to a temp name + rename). A SIGKILL at any moment leaves either the previous or the
new checkpoint complete, never a mix.
"""
from __future__ import annotations

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
from privlm.fileio import atomic_write_text, fsync_dir

WEIGHTS = "model.safetensors"
REG_WEIGHTS = "entropy_reg.safetensors"


def _atomic_place(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link (or copy) of ``src`` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, reg: Optional[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler, scaler, trainer_state: dict,
                    rng_states: list[dict], keep: int = 1) -> Path:
    """Write checkpoint ``step``; return its directory. ``trainer_state`` is JSON (position, counters)."""
    run_dir = Path(run_dir)
    state_root = run_dir / "state"
    state_root.mkdir(exist_ok=True)
    final = state_root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=state_root, prefix=f".step-{step:08d}.", suffix=".tmp"))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
        if reg is not None:
            save_file({"theta": reg.theta.detach().float().cpu().contiguous()}, str(tmp / REG_WEIGHTS),
                      metadata={"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-save of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(state_root)
    atomic_write_text(state_root / "LATEST", final.name + "\n")  # the commit point
    _atomic_place(final / WEIGHTS, run_dir / WEIGHTS)
    if reg is not None:
        _atomic_place(final / REG_WEIGHTS, run_dir / REG_WEIGHTS)
    old = sorted(p for p in state_root.glob("step-*") if p.is_dir() and p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in state_root.glob(".step-*.tmp"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    pointer = Path(run_dir) / "state" / "LATEST"
    if not pointer.is_file():
        raise CheckpointError(f"'{run_dir}' has no checkpoint to resume from (missing {pointer})")
    ckpt = pointer.parent / pointer.read_text().strip()
    if not (ckpt / "trainer.json").is_file() or not (ckpt / WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' named by {pointer} is missing or incomplete")
    return ckpt


def load_checkpoint(ckpt: Path, model: torch.nn.Module, reg: Optional[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, scheduler, scaler) -> tuple[dict, list[dict]]:
    """Restore everything saved by `save_checkpoint`; return (trainer_state, per-rank RNG states)."""
    try:
        load_model(model, str(ckpt / WEIGHTS), strict=True)
        if reg is not None:
            theta = load_file(str(ckpt / REG_WEIGHTS))["theta"]
            with torch.no_grad():
                reg.theta.copy_(theta)
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        if scaler is not None and opt["scaler"] is not None:
            scaler.load_state_dict(opt["scaler"])
        rngs = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False)
        trainer_state = json.loads((ckpt / "trainer.json").read_text())
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decode/shape problem is a corrupt checkpoint
        raise CheckpointError(f"cannot load checkpoint '{ckpt}': {str(exc).splitlines()[0]}") from None
    return trainer_state, rngs
