"""`privlm sweep SWEEP.yaml --launcher slurm`: a sweep's unfinished runs as one SLURM job array, through submitit.

The sweep is planned exactly as for the local pool (`privlm.sweep.run_sweep`: configs checked against existing
run directories, finished runs skipped, a run directory without a checkpoint moved aside, `--max-runs`); the
runs left are submitted as one array (submitit's `AutoExecutor` translates the resources into sbatch options)
and each array task trains its run with `privlm train` semantics: a run directory with config.yaml is resumed
(exactly, from its last checkpoint, or from step 0 when it has none), a finished one is left alone. The command
then waits, and the results table is written by the same code as for `local`.

Resources per run come from the sweep file's ``slurm:`` mapping and the command-line flags (flags win)::

    slurm: {partition: gpu, time: "4:00:00", cpus: 8, gpus: 1, mem: 64G, account: proj,
            sbatch_args: ["--qos=high", "--constraint=h100"]}

Nothing is pickled: submitit's usual path writes the function to run into a pickle that the job unpickles, and
privlm never executes what it reads from disk (docs/DECISIONS.md, "SLURM launcher"). Each array task runs
``python -m privlm.launchers.slurm MANIFEST`` instead; MANIFEST is a JSON file in DIR/slurm/ naming the runs of
the array in order, with their configs; the task picks entry SLURM_ARRAY_TASK_ID.

The sweep directory records, per run in sweep.json: ``job_id`` (``<array id>_<index>``), ``jobs`` (every job id
the run was ever submitted as) and ``log`` (SLURM's output file of the latest attempt, DIR/slurm/<job>_0_log.out).
A rerun of the same command first asks SLURM about recorded jobs: a pending or running one is waited for (never
submitted twice), one that ended without its run finishing (cancelled, node failure, time-out, error) is
submitted again and resumes from its last checkpoint. Ctrl-C (or SIGTERM) cancels the array this command
submitted unless `--detach` was given, which submits and returns at once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from privlm.errors import CheckpointError, ConfigError, PrivlmError, bounded_float, bounded_int

RESOURCE_KEYS = ("partition", "time", "cpus", "gpus", "mem", "account", "sbatch_args")
MANIFEST_FORMAT = "privlm-slurm-array/1"
# SLURM job states in which the job may still train (anything else has ended)
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
               "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class SlurmError(PrivlmError):
    """SLURM is not reachable, or refused a submission (the message quotes SLURM's reason)."""


# ---------------------------------------------------------------------------------------- resources
@dataclass
class SlurmResources:
    """Per-run resources of the job array (None: SLURM's default, except ``time`` which must be given)."""
    partition: Optional[str] = None
    time: Optional[str] = None  # SLURM's forms: minutes, MM:SS, H:MM:SS, D-HH[:MM[:SS]]; SLURM checks it
    cpus: Optional[int] = None
    gpus: Optional[int] = None
    mem: Optional[str] = None  # as sbatch --mem: 16G, 4000M...
    account: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)

    def merged(self, **flags: Any) -> "SlurmResources":
        """These resources with the given (not None) values replacing them; sbatch args are appended."""
        extra = list(flags.pop("sbatch_args", None) or [])
        new = dataclasses.replace(self, **{k: v for k, v in flags.items() if v is not None})
        new.sbatch_args = list(self.sbatch_args) + extra
        _check_sbatch_args(new.sbatch_args, "--sbatch-arg")
        return new


def _check_sbatch_args(args: list[str], origin: str) -> dict[str, Any]:
    """['--qos=high', '--exclusive'] -> {'qos': 'high', 'exclusive': True} (submitit's additional_parameters)."""
    out: dict[str, Any] = {}
    for a in args:
        if not isinstance(a, str) or not a.startswith("--") or len(a) < 3 or " " in a.split("=", 1)[0]:
            raise ConfigError(f"{origin}: '{a}' is not a long sbatch option (--name=value or --flag)")
        key, eq, value = a[2:].partition("=")
        out[key] = value if eq else True
    return out


def parse_resources(raw: Any, origin: str) -> SlurmResources:
    """The sweep file's ``slurm:`` mapping, checked (one-line ConfigError naming the key)."""
    if raw is None:
        return SlurmResources()
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: 'slurm' must be a mapping with keys {list(RESOURCE_KEYS)}")
    unknown = sorted(set(raw) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"{origin}: unknown key(s) {unknown} under 'slurm'; known: {list(RESOURCE_KEYS)}")
    res = SlurmResources()
    for key in ("partition", "mem", "account", "time"):
        value = raw.get(key)
        if key == "time" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # minutes
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{origin}: slurm.{key} must be a non-empty string, not {value!r}")
        setattr(res, key, value)
    for key in ("cpus", "gpus"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (key == "cpus")):
            raise ConfigError(f"{origin}: slurm.{key} must be an integer >= {int(key == 'cpus')}, not {value!r}")
        setattr(res, key, value)
    args = raw.get("sbatch_args") or []
    if not isinstance(args, list):
        raise ConfigError(f"{origin}: slurm.sbatch_args must be a list like ['--qos=high']")
    _check_sbatch_args(args, f"{origin}: slurm.sbatch_args")
    res.sbatch_args = list(args)
    return res


# ---------------------------------------------------------------------------------------- talking to SLURM
def check_reachable() -> None:
    """One line when there is no SLURM here, or its controller does not answer."""
    for tool in ("sbatch", "scontrol", "squeue", "srun"):
        if shutil.which(tool) is None:
            raise SlurmError(f"--launcher slurm: no SLURM here ('{tool}' is not on PATH)")
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmError("--launcher slurm: the SLURM controller is not reachable (scontrol ping: no answer "
                         "within 60 s)") from None
    down = "DOWN" in proc.stdout
    if proc.returncode != 0 or down:
        lines = [x.strip() for x in proc.stdout.splitlines() if "DOWN" in x] or \
                [x.strip() for x in proc.stderr.splitlines() if x.strip()] or [f"exit status {proc.returncode}"]
        raise SlurmError(f"--launcher slurm: the SLURM controller is not reachable (scontrol ping: {lines[-1]})")


def _quiet_submitit():
    import submitit
    logging.getLogger("submitit").setLevel(logging.ERROR)  # sacct failures are handled here (squeue fallback)
    return submitit


def sbatch_reason(stderr: str) -> str:
    """SLURM's reason from sbatch's error output: its last 'sbatch: error:' line without the prefix."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x.split("error:", 1)[1].strip() for x in lines if "error:" in x]
    return (errors or lines or ["sbatch failed without a message"])[-1]


def executor(folder: Path, resources: SlurmResources, name: str):
    """submitit's AutoExecutor for SLURM with the resources of one run (ConfigError on a value it refuses)."""
    submitit = _quiet_submitit()
    if not resources.time:
        raise ConfigError("--launcher slurm needs a time limit per run: give --time (e.g. --time 2:00:00) or "
                          "'time' under 'slurm' in the sweep file")
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = {"name": name, "stderr_to_stdout": True, "slurm_time": resources.time}
    if resources.cpus is not None:
        params["cpus_per_task"] = resources.cpus
    if resources.gpus:
        params["gpus_per_node"] = resources.gpus
    for key in ("partition", "mem", "account"):
        if getattr(resources, key) is not None:
            params[f"slurm_{key}"] = getattr(resources, key)
    if resources.sbatch_args:
        params["slurm_additional_parameters"] = _check_sbatch_args(resources.sbatch_args, "--sbatch-arg")
    try:
        ex.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as exc:
        raise ConfigError(f"--launcher slurm: {str(exc).splitlines()[0]}") from None
    return ex


def submit_array(ex, command: str, n: int) -> list[str]:
    """Submit ``command`` as an array of ``n`` tasks with the executor's sbatch options; returns the task job ids
    '<array id>_<i>'. submitit's own array path minus the pickles: the cluster executor with ``map_count`` set
    (as `SlurmExecutor._internal_process_submissions` does) submits a shell command."""
    submitit = _quiet_submitit()
    slurm_ex = ex._executor
    slurm_ex.parameters["map_count"] = n
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # submitit prints sbatch's stderr too: one line is ours
            job = slurm_ex._submit_command(command)
    except submitit.core.utils.FailedJobError as exc:
        raise SlurmError(f"--launcher slurm: sbatch refused the job array: {sbatch_reason(str(exc))}") from None
    finally:
        slurm_ex.parameters.pop("map_count", None)
    return [f"{job.job_id}_{i}" for i in range(n)]


def log_path(folder: Path, job_id: str) -> Path:
    """SLURM's output file of one array task (stdout and stderr), as submitit names it."""
    return _quiet_submitit().core.utils.JobPaths(folder, job_id=job_id, task_id=0).stdout


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT',
    'NODE_FAIL', ...; 'UNKNOWN' when SLURM no longer knows the job). From sacct through submitit's watcher,
    and from squeue for jobs sacct does not report (a cluster without accounting)."""
    if not job_ids:
        return {}
    submitit = _quiet_submitit()
    watcher = submitit.SlurmJob.watcher
    for j in job_ids:
        watcher.register_job(j)
    watcher.update()
    states = {j: watcher.get_state(j, mode="cache").split()[0].upper() for j in job_ids}
    unknown = [j for j, s in states.items() if s == "UNKNOWN"]
    if unknown:
        base = sorted({j.split("_")[0] for j in unknown})
        proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(base), "-o", "%i|%T"],
                              capture_output=True, text=True, timeout=120)
        seen = dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)
        for j in unknown:
            states[j] = seen.get(j, "UNKNOWN").upper()
    return states


def last_log_line(path: Path) -> str:
    """The last line of a task's log that says why it ended (srun's own "task 0: Exited with exit code N",
    which follows the program's last words, is skipped)."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    while lines and re.match(r"srun: error: .*task \d+: (Exited with exit code|Killed)", lines[-1]):
        lines.pop()
    return lines[-1] if lines else ""


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=120)


# ---------------------------------------------------------------------------------------- the sweep
def run_slurm(sweep, out: Path, resources: SlurmResources, *, plan, threads: Optional[int], detach: bool,
              max_runs: Optional[int], command: Optional[str], poll: float = 15.0, log=print) -> Optional[dict]:
    """Submit the sweep's unfinished runs as one job array and wait for them (or return at once with
    ``detach``: None). ``plan`` is the sweep's planner (`privlm.sweep.run_sweep`, passed in so that the launcher
    does not import the sweep that imports it), called with ``launcher=``. Returns sweep.json's state like
    `run_sweep`; raises CheckpointError naming every failed run with its SLURM state and log."""
    check_reachable()
    folder = out.resolve() / "slurm"
    ex = executor(folder, resources, f"privlm-{sweep.name}")  # checks the resources before anything is planned
    state_file = out / "sweep.json"
    records = json.loads(state_file.read_text()).get("runs", {}) if state_file.is_file() else {}
    recorded = {r.name: records[r.name]["job_id"] for r in sweep.runs if records.get(r.name, {}).get("job_id")}
    states = job_states(list(recorded.values()))
    live = {name: j for name, j in recorded.items() if states.get(j) in LIVE_STATES}
    for name, j in live.items():
        log(f"{name}: job {j} is {states[j].lower()}; waiting for it (not submitted again)")
    planned = dataclasses.replace(sweep, runs=[r for r in sweep.runs if r.name not in live])
    threads = threads or resources.cpus or 1

    def launch(sweep_, out_, todo, records_, state, log_):
        submitted: list[str] = []
        if todo:
            manifest = folder / f"array-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
            folder.mkdir(parents=True, exist_ok=True)
            from privlm.config import to_dict
            from privlm.fileio import atomic_write_json
            atomic_write_json(manifest, {"format": MANIFEST_FORMAT, "sweep_dir": str(out_.resolve()),
                                         "threads": threads,
                                         "runs": [{"name": r.name, "config": to_dict(r.cfg)} for _, r, _ in todo]})
            task = " ".join([shlex.quote(sys.executable), "-u", "-m", "privlm.launchers.slurm",
                             shlex.quote(str(manifest))])
            submitted = submit_array(ex, task, len(todo))
            for (i, r, resume), j in zip(todo, submitted):
                rec = records_[r.name]
                rec.update(status="submitted", job_id=j, log=str(log_path(folder, j)), launcher="slurm",
                           submitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                rec["jobs"] = rec.get("jobs", []) + [j]
                rec.pop("error", None)
            _save(out_, state)
            log_(f"submitted {len(todo)} run(s) as SLURM job array {submitted[0].split('_')[0]} "
                 f"(logs: {folder}/<job>_0_log.out)")
        if detach:
            log_(f"--detach: not waiting; `privlm sweep {sweep.path} --out {out} --status` shows the runs, "
                 f"the same command without --detach waits for them and writes the results")
            return
        watch = {r.name: records_[r.name]["job_id"] for _, r, _ in todo}
        watch.update(live)
        _wait(sweep, out_, watch, submitted, records_, state, poll, log_)

    state = plan(planned, out, max_runs, command=command, log=log, launcher=launch)
    if detach:
        return None
    return state


def _save(out: Path, state: dict) -> None:
    from privlm.fileio import atomic_write_text
    atomic_write_text(out / "sweep.json", json.dumps(state, indent=2, default=str) + "\n")


def _wait(sweep, out: Path, watch: dict[str, str], submitted: list[str], records: dict, state: dict,
          poll: float, log) -> None:
    """Poll SLURM until every watched job has ended; each run's outcome comes from its run directory
    (summary.json) and its job's final state. Ctrl-C / SIGTERM cancel the jobs this command submitted."""
    index = {r.name: i for i, r in enumerate(sweep.runs, 1)}
    n = len(sweep.runs)
    failures: list[str] = []
    pending = dict(watch)

    def _terminated(_signum, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        while pending:
            states = job_states(list(pending.values()))
            changed = False
            for name, j in list(pending.items()):
                s, rec = states.get(j, "UNKNOWN"), records[name]
                if s in LIVE_STATES:
                    if rec.get("status") != s.lower():
                        rec["status"] = s.lower()
                        changed = True
                        log(f"[{index[name]}/{n}] {name}: {s.lower()} (job {j})")
                    continue
                del pending[name]
                changed = True
                summary_file = out / name / "summary.json"
                summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
                if summary is not None and summary.get("diverged"):
                    rec.update(status="diverged", diagnosis=summary.get("diagnosis"))
                    log(f"[{index[name]}/{n}] {name}: diverged ({summary.get('diagnosis')})")
                elif summary is not None:
                    rec.update(status="done", final_ppl=summary.get("final_ppl"))
                    log(f"[{index[name]}/{n}] {name}: done, PPL {summary.get('final_ppl'):.3f}")
                else:
                    last = last_log_line(Path(rec["log"])) if rec.get("log") else ""
                    why = f"{s}{': ' + last if last else ''} (log: {rec.get('log')})"
                    rec.update(status="failed", error=why, slurm_state=s)
                    failures.append(f"{name}: {why}")
                    log(f"[{index[name]}/{n}] {name}: failed, job {j} {why}")
            if changed:
                _save(out, state)
            if pending:
                time.sleep(poll)
    except KeyboardInterrupt:
        mine = [j for j in pending.values() if j in submitted]
        cancel(mine)
        for name, j in pending.items():
            if j in mine:
                records[name].update(status="interrupted")
        _save(out, state)
        if mine:
            log(f"cancelled {len(mine)} job(s) of this command; the same command resumes them")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failures:
        raise CheckpointError(f"{len(failures)} run(s) failed: {'; '.join(failures)}")


# ---------------------------------------------------------------------------------------- --status
def status_rows(sweep, out: Path) -> list[dict]:
    """Each run's state (done, diverged, pending, running, failed (SLURM state), interrupted, resumable,
    incomplete, new), job id and log path, from the run directories, sweep.json and SLURM."""
    from privlm.train.rundir import run_status

    state_file = out / "sweep.json"
    records = json.loads(state_file.read_text()).get("runs", {}) if state_file.is_file() else {}
    jobs = {r.name: records[r.name]["job_id"] for r in sweep.runs if records.get(r.name, {}).get("job_id")}
    states: dict[str, str] = {}
    if jobs:
        check_reachable()
        states = job_states(list(jobs.values()))
    rows = []
    for r in sweep.runs:
        rec = records.get(r.name, {})
        on_disk = run_status(out / r.name)
        j = jobs.get(r.name)
        s = states.get(j, "") if j else ""
        if on_disk == "done":
            summary = json.loads((out / r.name / "summary.json").read_text())
            what = "diverged" if summary.get("diverged") else "done"
        elif s in LIVE_STATES:
            what = s.lower()
        elif j:
            what = f"failed ({s})" if s not in ("", "UNKNOWN", "COMPLETED") else rec.get("status", on_disk)
            if what == "failed" and rec.get("slurm_state"):
                what = f"failed ({rec['slurm_state']})"
        else:
            what = rec.get("status") if rec.get("status") in ("failed", "interrupted") else on_disk
        log = rec.get("log") or (str(out / "logs" / f"{r.name}.log") if (out / "logs" / f"{r.name}.log").is_file()
                                 else "")
        rows.append({"name": r.name, "state": what, "job_id": j or "", "log": log})
    return rows


def print_status(sweep, out: Path) -> int:
    rows = status_rows(sweep, out)
    width = max([4] + [len(r["name"]) for r in rows])
    swidth = max([5] + [len(r["state"]) for r in rows])
    print(f"{'run':<{width}}  {'state':<{swidth}}  {'job':<10}  log")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']:<{swidth}}  {r['job_id'] or '-':<10}  {r['log'] or '-'}")
    return 0


# ---------------------------------------------------------------------------------------- CLI flags
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster", "where the runs train; resources apply to each run with --launcher slurm "
                             "and override the sweep file's 'slurm:' mapping")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: this machine's process pool (default); slurm: one SLURM job array via submitit")
    g.add_argument("--status", action="store_true", help="print each run's state, SLURM job and log path; train nothing")
    g.add_argument("--detach", action="store_true",
                   help="(slurm) submit and return; without it the command waits, and Ctrl-C cancels what it submitted")
    g.add_argument("--partition", help="(slurm) partition")
    g.add_argument("--time", help="(slurm) time limit per run: minutes or [D-]H:MM:SS (required here or in the file)")
    g.add_argument("--cpus", type=bounded_int(1, 4096), metavar="N", help="(slurm) CPUs per run (also its torch threads)")
    g.add_argument("--gpus", type=bounded_int(0, 1024), metavar="N", help="(slurm) GPUs per run")
    g.add_argument("--mem", help="(slurm) memory per run, as sbatch --mem (e.g. 32G)")
    g.add_argument("--account", help="(slurm) account to charge")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPT[=VALUE]", dest="sbatch_args",
                   help="(slurm) extra sbatch option, repeatable (e.g. --sbatch-arg=--qos=high)")
    g.add_argument("--poll", type=bounded_float(0.01, 86400), default=15.0, metavar="SECONDS",
                   help="(slurm) seconds between two queries of the job states (default 15)")




def flags_resources(sweep, args: argparse.Namespace) -> SlurmResources:
    return sweep.slurm.merged(partition=args.partition, time=args.time, cpus=args.cpus, gpus=args.gpus,
                              mem=args.mem, account=args.account, sbatch_args=args.sbatch_args)


def command_flags(args: argparse.Namespace) -> list[str]:
    """The launcher flags as given, for the command recorded in sweep.json / results.json."""
    out = ["--launcher", "slurm"]
    for flag in ("partition", "time", "cpus", "gpus", "mem", "account"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    out += [f"--sbatch-arg={a}" for a in args.sbatch_args]
    return out


# ---------------------------------------------------------------------------------------- the array task
def task_main(argv: list[str]) -> int:
    """One array task: train run SLURM_ARRAY_TASK_ID of the manifest (resume it if its directory holds a run,
    nothing if it is finished); exit status of `privlm train` (0 done, 3 diverged, 2 other one-line errors)."""
    from privlm.config import from_dict
    from privlm.run import load_run_config

    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # submitit's --signal=USR2@90 warning: train to the limit
    manifest = json.loads(Path(argv[0]).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        print(f"privlm slurm task: '{argv[0]}' is not a {MANIFEST_FORMAT} manifest", flush=True)
        return 2
    task = int(os.environ["SLURM_ARRAY_TASK_ID"])
    entry = manifest["runs"][task]
    run_dir = Path(manifest["sweep_dir"]) / entry["name"]
    if (run_dir / "summary.json").is_file():
        print(f"{entry['name']}: already finished, nothing to do", flush=True)
        return 0
    resume = (run_dir / "config.yaml").is_file()
    try:
        cfg = load_run_config(run_dir) if resume else from_dict(entry["config"])
    except PrivlmError as exc:
        print(f"privlm train: {exc}", flush=True)
        return exc.exit_code
    print(f"{entry['name']}: {'resuming' if resume else 'training'} {cfg.model.preset} in {run_dir} "
          f"(job {os.environ.get('SLURM_JOB_ID')}, array task {task}, node {os.environ.get('SLURMD_NODENAME')})",
          flush=True)
    import torch
    from privlm.train.loop import train
    torch.set_num_threads(int(manifest.get("threads") or 1))
    try:
        train(cfg, run_dir, resume=resume, quiet=True)
    except PrivlmError as exc:  # the log's last line, as `privlm train` prints it
        print(f"privlm train: {exc}", flush=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(task_main(sys.argv[1:]))
