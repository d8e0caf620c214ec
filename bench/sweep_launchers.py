"""Wall time of one tiny sweep from the command's start to its collected results table: `--launcher local`
(the process pool) vs `--launcher slurm` (one job array), side by side on the same machine.

    python bench/sweep_launchers.py [--runs 4] [--steps 6] [--rounds 1] [--out bench/results/sweep_launchers.md]

Both launchers train the same N tiny runs (L2 d64 T64 on 20 stdlib modules, the data cache built beforehand)
two at a time with one thread each (`--jobs 2 --threads 1` vs a job array with `--cpus 1` on a node of 2 CPUs),
and both commands end by writing results.md / results.json / report.html. Timed from the process's start to its
exit, rounds alternating local and slurm so machine load hits both alike. SLURM: the cluster `scontrol ping`
reaches, or else a private single-node cluster started for the measurement (tests/slurm_cluster.py; needs root
and `make slurm`). Times are per command: job start (srun, a fresh interpreter importing torch per task) and
SLURM's scheduling interval are what the slurm column adds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from train_throughput import append_record  # noqa: E402

PRESETS = ["SM+LN+G", "SM+R", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)", "SM+LN+R", "SM+G", "SM", "SM+LN"]


def _reachable() -> bool:
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "DOWN" not in p.stdout


def _timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.strip()[-500:]}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4, help=f"runs in the sweep (at most {len(PRESETS)})")
    ap.add_argument("--steps", type=int, default=6, help="training steps per run")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per launcher (alternating)")
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    args = ap.parse_args(argv)
    from small_corpus import stdlib_corpus_overrides

    with tempfile.TemporaryDirectory(prefix="privlm-bench-launchers-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        where = "the reachable SLURM cluster"
        if not _reachable():
            from slurm_cluster import SlurmCluster
            stack.enter_context(SlurmCluster(tmp / "slurm", cpus=os.cpu_count() or 1))
            where = f"a private single-node SLURM cluster ({os.cpu_count()} CPUs; tests/slurm_cluster.py)"
        corpus = stdlib_corpus_overrides(tmp, 20)
        sweep = tmp / "sweep.yaml"
        sweep.write_text(json.dumps({"name": "bench-launchers", "runs": PRESETS[:args.runs], "overrides": corpus + [
            "train.batch_size=2", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
            "train.eval_max_batches=2", f"train.save_every={args.steps}", f"train.entropy_every={args.steps}",
            f"train.log_every={args.steps}"]}))
        base = [sys.executable, "-m", "privlm.cli", "sweep", str(sweep)]
        times: dict[str, list[float]] = {"local": [], "slurm": []}
        for i in range(args.rounds):
            times["local"].append(_timed(base + ["--out", str(tmp / f"local-{i}"), "--jobs", "2", "--threads", "1"]))
            times["slurm"].append(_timed(base + ["--out", str(tmp / f"slurm-{i}"), "--launcher", "slurm",
                                                 "--cpus", "1", "--time", "10", "--poll", "1"]))
        load = os.getloadavg()[0]
    lines = [f"# {args.runs} runs x {args.steps} steps (L2 d64 T64, batch 2), 2 at a time, 1 thread each; "
             f"SLURM: {where}; load average {load:.1f} at the end"]
    for name, ts in times.items():
        lines.append(f"{name:<6} {statistics.median(ts):7.1f} s from start to results table  "
                     f"(rounds: {', '.join(f'{t:.1f}' for t in ts)})")
    lines.append(f"slurm / local: x{statistics.median(times['slurm']) / statistics.median(times['local']):.2f}")
    print("\n".join(lines))
    if args.out:
        append_record(args.out, "sweep_launchers.py", argv, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
