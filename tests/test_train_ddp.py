"""`privlm train` under torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from privlm.config import load_config
from small_corpus import stdlib_corpus_overrides
from privlm.train import train

pytestmark = pytest.mark.slow  # make test-fast leaves this file out


def test_two_process_ddp_matches_single_process(tmp_path):
    common = stdlib_corpus_overrides(tmp_path, 30) + [
        "train.max_steps=6", "train.log_every=1", "train.eval_every=6", "train.save_every=6",
        "train.entropy_every=3", "train.grad_accum=2", "train.lr=3e-3"]

    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "privlm.cli", "train", "SM+LN+G", *common, "train.batch_size=2",
                           "--out", str(ddp_dir), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = train(load_config("SM+LN+G", [*common, "train.batch_size=4"]), tmp_path / "single", quiet=True)

    def recs(run, kind):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]

    d_train, s_train = recs(ddp_dir, "train"), recs(tmp_path / "single", "train")
    # rank 0 alone writes: one record per step, and the global batch is counted once
    assert [r["step"] for r in d_train] == list(range(1, 7)) == [r["step"] for r in s_train]
    assert [r["tokens"] for r in d_train] == [r["tokens"] for r in s_train] == [i * 2 * 2 * 2 * 64 for i in range(1, 7)]
    assert [r["loss"] for r in d_train] == pytest.approx([r["loss"] for r in s_train], rel=1e-5)
    assert [r["grad_norm"] for r in d_train] == pytest.approx([r["grad_norm"] for r in s_train], rel=1e-4)
    assert d_train[-1]["loss"] < d_train[0]["loss"]  # it trained
    d_ent, s_ent = recs(ddp_dir, "entropy"), recs(tmp_path / "single", "entropy")
    assert [r["step"] for r in d_ent] == [3, 6]
    for a, b in zip(d_ent, s_ent):
        assert sum(a["head_entropy"], []) == pytest.approx(sum(b["head_entropy"], []), rel=1e-4)
    d_eval = json.loads((ddp_dir / "summary.json").read_text())
    assert d_eval["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
    assert d_eval["tokens_trained"] == single["tokens_trained"]
