"""A run killed with SIGKILL and resumed reproduces the uninterrupted run bit-exactly on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privlm.config import load_config
from small_corpus import stdlib_corpus_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves this file out


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "privlm.cli", "train", *args]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    over = stdlib_corpus_overrides(tmp_path, 40) + [
        # log_every does not divide save_every: the kill lands inside a log interval, whose partial sum the
        # checkpoint must carry for the first record after the resume to equal the uninterrupted run's
        "train.max_steps=60", "train.batch_size=8", "train.log_every=3", "train.save_every=5",
        "train.eval_every=25", "train.entropy_every=7", "train.lr=2e-3",
        "model.embd_dropout=0.1"]  # dropout draws random numbers: the RNG state must be restored too
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs: same thread count, no oversubscription
    ref = subprocess.Popen(train_cmd("SM+LN+G", *over, "--out", str(ref_dir), "--quiet"), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(train_cmd("SM+LN+G", *over, "--out", str(run_dir), "--quiet"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        f = run_dir / "metrics.jsonl"
        if f.is_file() and any(r["kind"] == "train" and r["step"] >= 12 for r in metrics(f.parent)):
            break
        time.sleep(0.01)
    assert victim.poll() is None, f"run ended before it could be killed: {victim.stderr.read()}"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    killed_at = max(r["step"] for r in metrics(run_dir) if r["kind"] == "train")
    saved = int((run_dir / "state" / "LATEST").read_text().strip().split("-")[1])
    assert 10 <= saved < killed_at < 60 and saved % 5 == 0
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(train_cmd("--resume", str(run_dir), "--quiet"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    got, want = metrics(run_dir), metrics(ref_dir)
    # same records in the same order, every float identical (not approximately: bit-exact)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "tok_per_s"} for r in recs]  # noqa: E731
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(3, 61, 3))
    assert not list((run_dir / "state").glob(".*.tmp"))
    assert strip(got) == strip(want)
    wa, wb = load_file(str(run_dir / "model.safetensors")), load_file(str(ref_dir / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert sa == sb and sa["steps"] == 60


def test_resume_rejects_changed_data(tmp_path):
    over = stdlib_corpus_overrides(tmp_path, 40) + ["train.max_steps=4", "train.save_every=2", "train.eval_every=100"]
    from privlm.errors import CheckpointError
    from privlm.train import train
    run = tmp_path / "run"
    train(load_config("SM+LN+G", over), run, quiet=True)
    # the corpus changes under the run: resuming must refuse rather than continue on other data
    corpus = Path(over[0].split(":", 1)[1]).parent
    sorted(corpus.glob("*.py"))[0].write_text("x = 1\n" * 500)
    from privlm.train.cli import resume_config
    with pytest.raises(CheckpointError, match="differs from the run's data_manifest.json"):
        train(resume_config(run, ["train.max_steps=6"]), run, resume=True, quiet=True)


def test_degrading_resumed_run_keeps_its_good_checkpoint(tmp_path, capsys):
    """`--resume GOOD train.lr=0.1 train.grad_clip=0`: the loss rises without NaN and within the 2x-median rule,
    so the new checkpoints are sane and saved; the best one (lowest validation loss) is still kept, and the
    run's model.safetensors (what eval/sample/pi load) still has the validation loss it had before."""
    from privlm.cli import main
    from privlm.train import train
    from privlm.train.checkpoint import best_checkpoint, checkpoint_valid_loss, latest_checkpoint
    from privlm.train.cli import resume_config

    def eval_loss(run: Path) -> float:
        capsys.readouterr()
        assert main(["eval", str(run), "--json", "--max-batches", "4"]) == 0
        return json.loads(capsys.readouterr().out)["loss"]

    over = stdlib_corpus_overrides(tmp_path, 12) + [
        "train.batch_size=4", "train.eval_max_batches=2", "train.max_steps=10", "train.save_every=5",
        "train.eval_every=5", "train.log_every=5", "train.lr=3e-3"]
    run = tmp_path / "run"
    train(load_config("SM+LN+G", over), run, quiet=True)
    good_loss = eval_loss(run)
    good_weights = load_file(str(run / "model.safetensors"))
    assert best_checkpoint(run).name == latest_checkpoint(run).name == "step-00000010"

    summary = train(resume_config(run, ["train.max_steps=20", "train.lr=0.1", "train.grad_clip=0",
                                        "train.schedule=constant", "train.warmup_frac=0"]),
                    run, resume=True, quiet=True)
    assert not summary["diverged"]
    latest, best = latest_checkpoint(run), best_checkpoint(run)
    assert latest.name == "step-00000020" and best.name == "step-00000010"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["BEST", "LATEST", "step-00000010", "step-00000020"]
    # it did degrade: the latest checkpoint's validation loss (and the final one) is far above the best's
    assert checkpoint_valid_loss(latest) > checkpoint_valid_loss(best) + 0.5
    assert summary["final_loss"] > summary["best_loss"] + 0.5 and summary["best_step"] == 10
    # the run's weights are the good checkpoint's, bit for bit, with the same validation loss
    kept = load_file(str(run / "model.safetensors"))
    assert kept.keys() == good_weights.keys() and all(torch.equal(kept[k], good_weights[k]) for k in kept)
    assert eval_loss(run) == good_loss
    # resume continues from the latest checkpoint, not the best
    train(resume_config(run, ["train.max_steps=21"]), run, resume=True, quiet=True)
    assert latest_checkpoint(run).name == "step-00000021" and best_checkpoint(run).name == "step-00000010"
