"""Reliability and security of run directories: nothing in a run directory executes code, one writer per run,
no dead-end directories, overrides on resume take effect, only sane checkpoints are kept, paths with '=' are
paths, disk-full saves lose nothing, and metrics after a crash + resume equal the uninterrupted run's."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlm.cli import main
from privlm.config import is_override, load_config, split_args
from privlm.errors import CheckpointError, DivergenceError
from privlm.fileio import strict_json
from privlm.train import loop as loop_mod
from privlm.train.checkpoint import RunLock, latest_checkpoint, load_state, save_state
from privlm.train.loop import train
from privlm.train.optim import lr_multiplier
from privlm.train.cli import resume_config
from small_corpus import stdlib_corpus_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves this file out

SRC = Path(__file__).resolve().parent.parent / "src" / "privlm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    return stdlib_corpus_overrides(tmp_path_factory.mktemp("corpus"), 12)


def cfg_of(corpus: list[str], *extra: str):
    return load_config("SM+LN+G", corpus + ["train.batch_size=4", "train.eval_max_batches=2", *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def timeless(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in recs]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------------
# 1. no code runs from a run directory

class _Payload:
    """Unpickling this creates the marker file: the harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickles_never_run(tmp_path, corpus):
    run = tmp_path / "run"
    train(cfg_of(corpus, "train.max_steps=2", "train.save_every=2"), run, quiet=True)
    ckpt = latest_checkpoint(run)
    marker = tmp_path / "PWNED"
    for name in ("optimizer.pt", "rng.pt"):  # planted beside the real state: never even opened
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads((ckpt / "rng.pt").read_bytes())  # the payload works when unpickled ...
    assert marker.exists()
    marker.unlink()
    train(resume_config(run, ["train.max_steps=3"]), run, resume=True, quiet=True)  # ... privlm never does
    assert not marker.exists()
    # a run in the old pickled format (no safetensors state) is refused with one line, nothing unpickled
    ckpt = latest_checkpoint(run)
    for new, old in (("optimizer.safetensors", "optimizer.pt"), ("rng.safetensors", "rng.pt")):
        (ckpt / new).unlink()
        (ckpt / old).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="old pickled state format"):
        train(resume_config(run, ["train.max_steps=4"]), run, resume=True, quiet=True)
    assert not marker.exists()


def test_no_unpickling_anywhere_in_the_package():
    """torch.load only with weights_only=True, no pickle/joblib/dill imports, no numpy allow_pickle=True."""
    bad = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{f.name}: {m.group(0)}")
        for pat in (r"^\s*import (pickle|cPickle|dill|joblib|cloudpickle)\b", r"^\s*from (pickle|dill|joblib) import",
                    r"allow_pickle\s*=\s*True", r"yaml\.load\(", r"yaml\.unsafe_load", r"(?<![.\w])(?<!def )eval\(", r"(?<![.\w])(?<!def )exec\("):
            bad += [f"{f.name}: {m.group(0).strip()}" for m in re.finditer(pat, text, re.M)]
    assert not bad, bad


def test_state_files_round_trip_exactly(tmp_path):
    import random
    import numpy as np
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "fused": None}]}}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert torch.equal(back["torch"], state["torch"]) and back["python"] == state["python"]
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]  # tuples and int keys come back as such
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])


# ---------------------------------------------------------------------------------------------------
# 2. one writer per run

def test_second_writer_is_refused_while_readers_work(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC.parent)}
    writer = subprocess.Popen([sys.executable, "-m", "privlm.cli", "train", "SM+LN+G", *corpus,
                               "train.batch_size=4", "train.max_steps=100000", "train.save_every=2",
                               "train.log_every=1", "train.eval_every=100000", "--out", str(run), "--quiet"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "state" / "LATEST").is_file():
            assert writer.poll() is None, writer.stderr.read()
            time.sleep(0.05)
        for argv in (["train", "--resume", run], ["train", "SM+LN+G", *corpus, "--out", run]):
            code, _, err = run_cli(capsys, *argv)
            lines = err.strip().splitlines()
            assert code != 0 and len(lines) == 1, err
            assert f"'{run}' is being written by another privlm process (pid {writer.pid})" in lines[0]
        code, out, err = run_cli(capsys, "eval", run, "--json", "--max-batches", "1")  # readers keep working
        assert code == 0 and json.loads(out)["tokens"] > 0, err
        assert writer.poll() is None
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    recs = metrics(run)  # the refused writers added nothing: one record per step, in order
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))
    # the kernel dropped the dead writer's lock: the run can be resumed at once
    RunLock(run).acquire().release()


# ---------------------------------------------------------------------------------------------------
# 3. no dead-end run directory; 8. metrics after a crash equal the uninterrupted run's

class _Crash(Exception):
    pass


def _crash_at_save(monkeypatch, at_step: int):
    """Make the trainer die (like a kill) when it reaches the save of `at_step`, before writing it."""
    real = loop_mod.Trainer._save

    def save(self):
        if self.step == at_step:
            raise _Crash()
        real(self)
    monkeypatch.setattr(loop_mod.Trainer, "_save", save)


def test_failure_before_first_checkpoint_is_resumable_from_scratch(tmp_path, corpus, capsys, monkeypatch):
    over = ["train.max_steps=6", "train.save_every=3", "train.log_every=2", "train.eval_every=3",
            "train.entropy_every=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(cfg_of(corpus, *over), ref, quiet=True)
    _crash_at_save(monkeypatch, 3)
    with pytest.raises(_Crash):
        train(cfg_of(corpus, *over), run, quiet=True)
    monkeypatch.undo()
    assert (run / "config.yaml").is_file() and not (run / "state" / "LATEST").exists()
    code, _, err = run_cli(capsys, "train", "SM+LN+G", *corpus, "--out", run)
    assert code != 0 and f"continue it with --resume {run}" in err  # the advice ...
    code, out, err = run_cli(capsys, "train", "--resume", run, "--quiet")  # ... works: starts again from 0
    assert code == 0, err
    assert "no checkpoint: starting the run again from step 0" in out
    assert timeless(metrics(run)) == timeless(metrics(ref))
    wa, wb = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_metrics_after_crash_and_resume_equal_uninterrupted(tmp_path, corpus, monkeypatch):
    # log_every does not divide save_every: the crash falls inside a log interval
    over = ["train.max_steps=14", "train.save_every=5", "train.log_every=3", "train.eval_every=4",
            "train.entropy_every=3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(cfg_of(corpus, *over), ref, quiet=True)
    _crash_at_save(monkeypatch, 10)
    with pytest.raises(_Crash):
        train(cfg_of(corpus, *over), run, quiet=True)
    monkeypatch.undo()
    assert max(r["step"] for r in metrics(run)) == 9  # records after the step-5 checkpoint exist ...
    (run / "state" / ".LATEST.abc123.tmp").write_text("step-00000010\n")  # ... and a killed pointer write
    train(resume_config(run, []), run, resume=True, quiet=True)
    assert timeless(metrics(run)) == timeless(metrics(ref))
    assert not list((run / "state").glob(".*.tmp"))
    # resuming the finished run again changes no record (no duplicate eval)
    before = (run / "metrics.jsonl").read_text()
    train(resume_config(run, []), run, resume=True, quiet=True)
    assert (run / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------------
# 4. overrides on resume

def test_resume_overrides_reach_optimizer_and_schedule(tmp_path, corpus):
    run = tmp_path / "run"
    train(cfg_of(corpus, "train.max_steps=6", "train.log_every=1", "train.warmup_frac=0"), run, quiet=True)
    assert metrics(run)[-2]["kind"] == "train"
    train(resume_config(run, ["train.max_steps=10", "train.lr=0.01", "train.min_lr=0.001"]), run,
          resume=True, quiet=True)
    lrs = {r["step"]: r["lr"] for r in metrics(run) if r["kind"] == "train"}
    # the logged lr of step s is the lr its update used: step s-1 of the new schedule (peak 0.01, end 0.001)
    for step in range(7, 11):
        want = 0.01 * lr_multiplier(step - 1, 10, 0.0, "linear", 0.001 / 0.01)
        assert lrs[step] == pytest.approx(want, rel=1e-12) and lrs[step] > 0.001
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history == [{"step": 6, "changes": {"train.max_steps": [6, 10], "train.lr": [0.001, 0.01],
                                                "train.min_lr": [0.0, 0.001]}}]
    saved = resume_config(run, [])
    assert (saved.train.lr, saved.train.max_steps, saved.train.min_lr) == (0.01, 10, 0.001)


# ---------------------------------------------------------------------------------------------------
# 5. only sane checkpoints are kept

def test_blow_up_keeps_the_last_sane_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    over = ["train.max_steps=4", "train.save_every=1", "train.log_every=1", "train.warmup_frac=0",
            "train.grad_clip=0", "train.schedule=constant"]
    train(cfg_of(corpus, *over), run, quiet=True)
    good = load_file(str(run / "model.safetensors"))
    with pytest.raises(DivergenceError) as err:  # lr 1e4: the weights after step 5 are huge but maybe finite
        train(resume_config(run, ["train.max_steps=12", "train.lr=1e4"]), run, resume=True, quiet=True)
    assert "last good checkpoint: step 4" in str(err.value)
    assert (run / "state" / "LATEST").read_text().strip() == "step-00000004"
    kept = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(kept[k], good[k]) for k in kept)
    assert max(v.abs().max().item() for v in kept.values()) < 100


def test_checkpoint_sanity_rule(tmp_path, corpus):
    trainer = loop_mod.Trainer(cfg_of(corpus, "train.max_steps=2"), tmp_path / "run", quiet=True)
    try:
        trainer.step_once()
        assert trainer.checkpoint_problem() is None
        trainer.recent_losses.extend([1.0] * 10)  # median 1: the last loss (about log V) is far above 2x
        assert "exceeds 2 x the median training loss" in trainer.checkpoint_problem()
        trainer.recent_losses.clear()
        with torch.no_grad():
            trainer.model.blocks[0].attn.q_proj.weight.mul_(1e30)
            trainer.model.blocks[0].attn.k_proj.weight.mul_(1e30)
        assert "loss of the weights to save is nan" in trainer.checkpoint_problem()
        with torch.no_grad():
            trainer.model.blocks[0].attn.q_proj.weight.fill_(float("inf"))
        assert trainer.checkpoint_problem() == "non-finite weights"
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------------
# 6. paths containing '='

def test_existing_paths_with_equals_are_paths(tmp_path, corpus, capsys):
    run = tmp_path / "sweep" / "sm-lr=0.001"
    train(cfg_of(corpus, "train.max_steps=2"), run, quiet=True)
    assert not is_override(str(run)) and is_override("train.lr=0.001")
    assert split_args([str(run), "model.n_layer=4"]) == ([str(run)], ["model.n_layer=4"])
    code, out, err = run_cli(capsys, "cost", run, "--format", "json")
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["T"] == 64 and row["n_layer"] == 2  # the run's own config, not the default GPT-2
    code, out, err = run_cli(capsys, "cost", run, "model.n_layer=4", "--format", "json")
    assert code == 0 and json.loads(out)[0]["n_layer"] == 4, err
    code, out, err = run_cli(capsys, "train", "--resume", run, "--quiet", "train.max_steps=3")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", run, "--json", "--max-batches", "1")
    assert code == 0 and json.loads(out)["run"] == str(run), err


# ---------------------------------------------------------------------------------------------------
# 7. JSON output and disk full

def test_eval_json_is_strict_json(tmp_path, corpus, capsys, monkeypatch):
    assert strict_json({"ppl": float("inf"), "x": [float("nan"), 1.5]}) == '{"ppl": null, "x": [null, 1.5]}'
    import privlm.evaluate as ev
    monkeypatch.setattr(ev, "evaluate_run", lambda *a, **k: {"run": "r", "loss": 800.0, "ppl": float("inf"),
                                                             "tokens": 3, "seq_len": 4, "data": "d"})
    code, out, err = run_cli(capsys, "eval", tmp_path, "--json")

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    assert code == 0 and json.loads(out, parse_constant=no_constants)["ppl"] is None


def test_disk_full_during_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    import privlm.train.checkpoint as ck
    run = tmp_path / "run"
    real = ck.save_state
    calls = []

    def full(path, obj):
        calls.append(path)
        if len(calls) > 2:  # the second checkpoint's first state file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)
    monkeypatch.setattr(ck, "save_state", full)
    code, _, err = run_cli(capsys, "train", "SM+LN+G", *corpus, "train.batch_size=4", "train.max_steps=4",
                           "train.save_every=2", "train.eval_every=100", "--out", run, "--quiet")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert (run / "state" / "LATEST").read_text().strip() == "step-00000002"
    assert not list((run / "state").glob(".*")) and [p.name for p in (run / "state").iterdir()] != []
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "--resume", run, "--quiet")  # and the run continues from step 2
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
