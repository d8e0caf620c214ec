"""`privlm sweep --launcher slurm` and `srun privlm train` against a real single-node SLURM cluster started for the
session (tests/slurm_cluster.py): a job array trains the same weights as the local pool, run for run; a sweep
cancelled mid-way completes when the command is run again without training any run twice; `srun -n 2` DDP equals
one process; unreachable SLURM, sbatch refusals and a run failing on the cluster are one line each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from privlm.cli import main
from privlm.config import load_config
from privlm.train import train
from slurm_cluster import SlurmCluster
from small_corpus import stdlib_corpus_overrides

# one cluster per session: every SLURM test on one worker; make test-fast leaves this file out
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.batch_size=2", "train.eval_every=6", "train.eval_max_batches=2", "train.save_every=2",
        "train.entropy_every=3", "train.log_every=2", "train.max_steps=6"]
SLURM = ["--launcher", "slurm", "--time", "10", "--cpus", "1", "--poll", "0.3"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=os.cpu_count() or 1) as c:
        yield c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus_overrides(tmp_path_factory.mktemp("slurm-corpus"), 20)


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def privlm(capsys, monkeypatch):
    """`privlm ARGS` in this process (the jobs are SLURM's processes anyway): exit status, stdout, stderr."""
    import torch
    threads = torch.get_num_threads()

    def call(*args: str, env: dict | None = None) -> Result:
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            capsys.readouterr()
            try:
                rc = main(list(args))
            finally:
                torch.set_num_threads(threads)  # --threads sets this process's torch threads
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return call


def write_sweep(path: Path, corpus: list[str], runs, overrides=FAST, **extra) -> Path:
    path.write_text(json.dumps({"name": "slurm-test", "overrides": corpus + list(overrides), "runs": runs, **extra}))
    return path


def weights(run: Path) -> dict:
    return load_file(run / "model.safetensors")


def records(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())["runs"]


def one_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_job_array_trains_the_same_weights_as_the_local_pool(cluster, corpus, tmp_path, privlm):
    f = write_sweep(tmp_path / "s.yaml", corpus, ["SM+LN+G", "EReg(SM(t)+ScFuFFN)"])  # baseline, regularized
    local = privlm("sweep", str(f), "--out", str(tmp_path / "local"), "--jobs", "2", "--threads", "1")
    assert local.returncode == 0, local.stderr[-2000:]
    out = tmp_path / "slurm"
    sl = privlm("sweep", str(f), "--out", str(out), *SLURM)
    assert sl.returncode == 0, sl.stderr[-2000:]
    assert "submitted 2 run(s) as SLURM job array" in sl.stdout

    names = ["sm-ln-g", "ereg-sm-t-scfuffn"]
    recs = records(out)
    arrays = {recs[n]["job_id"].split("_")[0] for n in names}
    assert len(arrays) == 1  # one job array ...
    assert sorted(recs[n]["job_id"].split("_")[1] for n in names) == ["0", "1"]  # ... one task per run
    for n in names:
        assert recs[n]["status"] == "done" and recs[n]["jobs"] == [recs[n]["job_id"]]
        assert f"{n}: training" in Path(recs[n]["log"]).read_text()  # SLURM's output file of the task
        a, b = weights(tmp_path / "local" / n), weights(out / n)
        assert a.keys() == b.keys() and len(a) > 4
        for k in a:  # bit for bit: same config, data order and seed, one thread each
            assert a[k].dtype == b[k].dtype and (a[k] == b[k]).all(), (n, k)
    # the results table is the local one (same rows, same numbers)
    rl, rs = (json.loads((d / "results.json").read_text())["rows"] for d in (tmp_path / "local", out))
    assert [(r["name"], r["ppl"]) for r in rl] == [(r["name"], r["ppl"]) for r in rs]
    assert (out / "results.md").read_text().count("|") == (tmp_path / "local" / "results.md").read_text().count("|")

    status = privlm("sweep", str(f), "--out", str(out), "--status")
    assert status.returncode == 0, status.stderr
    for n in names:
        line = next(x for x in status.stdout.splitlines() if x.startswith(n + " "))
        assert line.split()[1:] == ["done", recs[n]["job_id"], recs[n]["log"]]


def _wait_for(cond, timeout: float, what: str, proc=None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.communicate()}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_cancelled_sweep_completes_on_rerun_without_training_a_run_twice(cluster, corpus, tmp_path, privlm):
    # long enough that a heavily loaded machine cannot finish them between their first checkpoint and the Ctrl-C
    long = ["train.max_steps=300", "train.save_every=10", "train.eval_every=300", "train.entropy_every=300",
            "train.log_every=10"]
    f = write_sweep(tmp_path / "s.yaml", corpus, [
        {"preset": "SM+LN+G", "name": "short"},
        {"preset": "SM+LN+G", "name": "long-a", "overrides": long},
        {"preset": "SM+R", "name": "long-b", "overrides": long},
        {"preset": "SM", "name": "long-c", "overrides": long}])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "privlm.cli", "sweep", str(f), "--out", str(out), *SLURM]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # Ctrl-C as a terminal delivers it: a suite started as a background job (`make test &`) runs with SIGINT
    # ignored, which children inherit and Python then keeps (no KeyboardInterrupt)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Ctrl-C once the short run has finished and a long one is between two checkpoints
        _wait_for(lambda: (out / "short" / "summary.json").is_file(), 240, "the short run to finish", proc)
        _wait_for(lambda: any((out / n / "state" / "LATEST").is_file() and not (out / n / "summary.json").is_file()
                              for n in ("long-a", "long-b")), 240, "a checkpoint of an unfinished long run", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    first = records(out)
    array = first["short"]["job_id"].split("_")[0]
    live = subprocess.run(["squeue", "-h", "-r", "-j", array, "-t", "PD,R,CG"], capture_output=True, text=True)
    assert live.stdout.strip() == ""  # the command cancelled its array
    unfinished = [n for n in ("long-a", "long-b", "long-c") if not (out / n / "summary.json").is_file()]
    assert unfinished and all(first[n]["status"] == "interrupted" for n in unfinished)
    short_summary = (out / "short" / "summary.json").stat().st_mtime_ns
    # what the rerun keeps of a cancelled run: its records up to the checkpoint it resumes from (the steps logged
    # after that checkpoint are trained again, and logged again with their new timings)
    partial = {}
    for n in unfinished:
        latest = out / n / "state" / "LATEST"
        if latest.is_file() and (out / n / "metrics.jsonl").is_file():
            resumed_from = int(latest.read_text().strip().removeprefix("step-"))
            partial[n] = [x for x in (out / n / "metrics.jsonl").read_text().splitlines()
                          if json.loads(x).get("step", 0) <= resumed_from]

    again = privlm("sweep", str(f), "--out", str(out), *SLURM)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"submitted {len(unfinished)} run(s)" in again.stdout  # only the unfinished ones
    recs = records(out)
    assert recs["short"]["jobs"] == [first["short"]["job_id"]]  # the finished run was not submitted again
    assert (out / "short" / "summary.json").stat().st_mtime_ns == short_summary
    for n in unfinished:
        assert len(recs[n]["jobs"]) == 2 and recs[n]["status"] == "done"
    for n in ("long-a", "long-b", "long-c"):
        steps = [r["step"] for r in map(json.loads, (out / n / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "train"]
        assert steps == list(range(10, 301, 10))  # every step trained exactly once across the two attempts
    for n, lines in partial.items():  # the part up to the checkpoint is kept as it was
        assert (out / n / "metrics.jsonl").read_text().splitlines()[:len(lines)] == lines
    # a run cancelled mid-way and resumed ends with the weights of an uninterrupted run
    resumed = next(n for n in ("long-a", "long-b") if n in partial)
    ref = tmp_path / "ref"
    preset = "SM+LN+G" if resumed == "long-a" else "SM+R"
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the jobs (--cpus 1): the same float sums, bit for bit
    try:
        train(load_config(preset, corpus + FAST + long), ref, quiet=True)
    finally:
        torch.set_num_threads(threads)
    a, b = weights(ref), weights(out / resumed)
    assert all((a[k] == b[k]).all() for k in a)


def test_example_sbatch_script_trains_ddp_over_srun_like_one_process(cluster, corpus, tmp_path):
    """examples/slurm/train-multinode.sbatch, shrunk to one node, two CPU tasks and no GPU by sbatch flags
    (they override its #SBATCH lines): `srun` starts two `privlm train` ranks that find each other from SLURM's
    environment alone, and train exactly as one process with the same global batch."""
    common = corpus + ["train.max_steps=6", "train.log_every=1", "train.eval_every=6", "train.save_every=6",
                       "train.entropy_every=3", "train.grad_accum=2", "train.lr=3e-3"]
    ddp = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `privlm` of this environment
    proc = subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--time=10", f"--output={tmp_path / 'job.out'}",
                           str(ROOT / "examples" / "slurm" / "train-multinode.sbatch"), "SM+LN+G", str(ddp),
                           *common, "train.batch_size=2"], capture_output=True, text=True, timeout=600, env=env)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").is_file() else ""
    assert proc.returncode == 0, (proc.stderr, log[-3000:])
    single = train(load_config("SM+LN+G", [*common, "train.batch_size=4"]), tmp_path / "single", quiet=True)

    def recs(run, kind):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]

    d_train, s_train = recs(ddp, "train"), recs(tmp_path / "single", "train")
    # rank 0 alone writes (one record per step) and the global batch is 2 tasks x 2 sequences x 2 micro-steps
    assert [r["step"] for r in d_train] == list(range(1, 7)) == [r["step"] for r in s_train]
    assert [r["tokens"] for r in d_train] == [r["tokens"] for r in s_train] == [i * 2 * 2 * 2 * 64 for i in range(1, 7)]
    assert [r["loss"] for r in d_train] == pytest.approx([r["loss"] for r in s_train], rel=1e-5)
    assert [r["grad_norm"] for r in d_train] == pytest.approx([r["grad_norm"] for r in s_train], rel=1e-4)
    assert d_train[-1]["loss"] < d_train[0]["loss"]
    d_eval = json.loads((ddp / "summary.json").read_text())
    assert d_eval["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)


def test_unreachable_slurm_and_sbatch_refusals_are_one_line(cluster, corpus, tmp_path, privlm):
    f = write_sweep(tmp_path / "s.yaml", corpus, ["SM+LN+G"])
    out = tmp_path / "out"
    # no SLURM commands at all
    r = privlm("sweep", str(f), "--out", str(out), *SLURM, env={"PATH": "/nonexistent"})
    assert r.returncode != 0 and "no SLURM here ('sbatch' is not on PATH)" in one_line(r.stderr)
    # SLURM installed, its controller down
    dead = tmp_path / "dead.conf"
    dead.write_text(cluster.conf.read_text().replace("SlurmctldPort=", "SlurmctldPort=1#"))
    r = privlm("sweep", str(f), "--out", str(out), *SLURM, env={"SLURM_CONF": str(dead)})
    assert r.returncode != 0 and "SLURM controller is not reachable (scontrol ping:" in one_line(r.stderr)
    assert not out.exists()  # nothing written
    # sbatch refusals quote SLURM's reason
    r = privlm("sweep", str(f), "--out", str(out), *SLURM, "--partition", "nosuch")
    assert r.returncode != 0
    assert one_line(r.stderr).endswith("sbatch refused the job array: Batch job submission failed: "
                                       "Invalid partition name specified")
    r = privlm("sweep", str(f), "--out", str(out), *SLURM[:2], "--time", "soon", *SLURM[4:])
    assert r.returncode != 0 and one_line(r.stderr).endswith("sbatch refused the job array: Invalid --time "
                                                             "specification")
    assert not records(out)["sm-ln-g"].get("job_id")  # nothing was submitted
    # no time limit anywhere
    r = privlm("sweep", str(f), "--out", str(out), "--launcher", "slurm")
    assert r.returncode != 0 and "needs a time limit per run" in one_line(r.stderr)


def test_a_run_failing_on_the_cluster_is_named_with_its_log(cluster, corpus, tmp_path, privlm):
    f = write_sweep(tmp_path / "s.yaml", corpus, [
        "SM+LN+G", {"preset": "SM+R", "name": "broken", "overrides": [f"data.source=files:{tmp_path}/none/*.py"]}],
        slurm={"time": "10", "cpus": 1})
    out = tmp_path / "out"
    r = privlm("sweep", str(f), "--out", str(out), "--launcher", "slurm", "--poll", "0.3")
    assert r.returncode != 0
    recs = records(out)
    log = recs["broken"]["log"]
    line = one_line(r.stderr)
    assert "1 run(s) failed: broken: FAILED: privlm train:" in line and f"(log: {log})" in line
    assert any(x.startswith("privlm train: ") for x in Path(log).read_text().splitlines())  # the run's own error
    assert recs["sm-ln-g"]["status"] == "done" and (out / "sm-ln-g" / "summary.json").is_file()  # unaffected
    status = privlm("sweep", str(f), "--out", str(out), "--status")
    rows = {x.split()[0]: x for x in status.stdout.splitlines()[1:]}
    assert rows["broken"].split()[1:3] == ["failed", "(FAILED)"] and rows["broken"].endswith(log)
    assert rows["sm-ln-g"].split()[1] == "done"


def test_gpu_study_is_submit_ready_with_one_gpu_per_run(tmp_path):
    from privlm.launchers.slurm import executor
    from privlm.sweep import load_sweep

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "gpu-study.yaml")
    assert len(sweep.runs) == 6 and all(r.cfg.train.device == "cuda" for r in sweep.runs)
    res = sweep.slurm.merged(partition="gpu", account="proj", sbatch_args=["--qos=high"])
    script = executor(tmp_path, res, "privlm-gpu-study")._executor._make_submission_file_text("CMD", "x")
    for line in ("--gpus-per-node=1", "--cpus-per-task=8", "--mem=64G", "--time=1:00:00", "--partition=gpu",
                 "--account=proj", "--qos=high", "--job-name=privlm-gpu-study"):
        assert f"#SBATCH {line}\n" in script


def test_launch_environment_torchrun_srun_and_batch_script():
    from privlm.train.distributed import PORT_BASE, launch_env

    assert launch_env({}).launcher == "single"
    tr = launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "SLURM_STEP_NUM_TASKS": "2",
                     "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})  # torchrun inside an allocation: torchrun's ranks
    assert (tr.launcher, tr.rank, tr.world, tr.local_rank) == ("torchrun", 3, 4, 1)
    step = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_STEP_ID": "2", "SLURM_NTASKS": "16"}
    s = launch_env(step)
    assert (s.launcher, s.rank, s.world, s.local_rank, s.master_addr) == ("slurm", 9, 16, 1, None)
    assert s.master_port == PORT_BASE + 456 * 15 + 2 and s.master_port < 32768  # below the ephemeral ports
    assert launch_env({**step, "SLURM_JOB_ID": "123457"}).master_port != s.master_port
    o = launch_env({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (o.master_addr, o.master_port) == ("10.0.0.1", 29500)
    # the batch script of a 16-task job runs privlm once, without a step: one process, not rank 0 of 16
    assert launch_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}).world == 1


@pytest.mark.parametrize("raw,match", [
    ({"partion": "gpu"}, r"unknown key\(s\) \['partion'\] under 'slurm'"),
    ({"gpus": "one"}, r"slurm.gpus must be an integer >= 0"),
    ({"cpus": 0}, r"slurm.cpus must be an integer >= 1"),
    ({"time": ""}, r"slurm.time must be a non-empty string"),
    ({"sbatch_args": ["-q high"]}, r"'-q high' is not a long sbatch option"),
    ("gpu", r"'slurm' must be a mapping"),
])
def test_bad_slurm_sections_fail_with_one_line(tmp_path, raw, match):
    from privlm.config import ConfigError
    from privlm.sweep import load_sweep

    f = tmp_path / "s.yaml"
    f.write_text(json.dumps({"runs": ["SM"], "slurm": raw}))
    with pytest.raises(ConfigError, match=match) as err:
        load_sweep(f)
    assert "\n" not in str(err.value)


def test_detached_sweep_is_waited_for_not_submitted_again(cluster, corpus, tmp_path, privlm):
    f = write_sweep(tmp_path / "s.yaml", corpus, ["SM+LN+G", "SM"])
    out = tmp_path / "out"
    r = privlm("sweep", str(f), "--out", str(out), *SLURM, "--detach")
    assert r.returncode == 0 and "submitted 2 run(s)" in r.stdout and "--detach: not waiting" in r.stdout
    first = records(out)
    assert not (out / "results.md").exists()
    status = privlm("sweep", str(f), "--out", str(out), "--status")
    states = {x.split()[0]: x.split()[1] for x in status.stdout.splitlines()[1:]}
    assert set(states.values()) <= {"pending", "running", "done"}
    # the same command while the jobs are queued or running: it waits for them, submits nothing
    r = privlm("sweep", str(f), "--out", str(out), *SLURM)
    assert r.returncode == 0, r.stderr
    recs = records(out)
    for n in ("sm-ln-g", "sm"):
        assert recs[n]["jobs"] == [first[n]["job_id"]] and recs[n]["status"] == "done"
    assert "as SLURM job array" not in r.stdout  # nothing submitted by the second command
    assert (out / "results.md").is_file()
