"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's packages
(`make slurm` installs them), started in the foreground in a private directory with a private munge key and
configuration, each by its own PID, and stopped by those PIDs after every job is cancelled.

SLURM needs root here (slurmd starts jobs as their user); the test suite runs as root (`make test`). Missing
packages or no root is a failure, not a skip: the tests of the SLURM launcher must run.

Notes (measured on Debian 12, 2 cores, no systemd): the node reports idle about 1.2 s after the start.
- submitit polls `sacct`, which needs slurmdbd; a small stand-in on PATH answers from slurmctld's memory
  (`squeue -t all`, completed jobs kept for MinJobAge=600 s).
- munged refuses a socket whose parent directories lack o+x (pytest's temporary directories are 0700): the
  socket lives in a 0755 directory of its own.
- Jobs still running when slurmd stops leave their slurmstepd behind: cancel and drain the queue first.
- proctrack/linuxproc + task/none: no cgroups needed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONF = """ClusterName=privlm-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=sched_interval=1
MinJobAge=600
ReturnToService=2
SlurmctldPort={p1}
SlurmdPort={p2}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

# submitit asks `sacct -o JobID,State,NodeList --parsable2 -j ID ...`; without slurmdbd answer from slurmctld
SACCT = """#!/bin/sh
ids=$(printf '%s\\n' "$@" | awk 'p{print;p=0} $0=="-j"{p=1}' | paste -sd, -)
echo 'JobID|State|NodeList'
exec squeue -h -t all ${ids:+-j "$ids"} -o '%i|%T|%N'
"""

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scancel", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


class SlurmCluster:
    """``with SlurmCluster(dir) as c:`` starts the daemons and sets SLURM_CONF / PATH in os.environ for the
    block (jobs inherit them: sbatch's default --export=ALL); the exit cancels every job, waits for the queue
    to drain, stops the daemons by PID (slurmd, slurmctld, munged) and restores the environment."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = Path(root), cpus
        self.procs: list[subprocess.Popen] = []
        self._env: dict = {}
        self._sockdir = ""

    def __enter__(self) -> "SlurmCluster":
        missing = [c for c in NEEDED if shutil.which(c) is None]
        if missing or os.geteuid() != 0:
            raise RuntimeError(f"the SLURM tests need root and Debian's slurmctld, slurmd, slurm-client and munge "
                               f"(`make slurm`); missing: {missing or 'root'}")
        d = self.root
        for sub in ("state", "spool", "bin"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self._sockdir = tempfile.mkdtemp(prefix="privlm-munge-")
        os.chmod(self._sockdir, 0o755)
        sock = f"{self._sockdir}/sock"
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf = d / "slurm.conf"
        self.conf.write_text(CONF.format(host=socket.gethostname().split(".")[0], sock=sock, d=d, cpus=self.cpus,
                                         p1=_free_port(), p2=_free_port()))
        (d / "bin" / "sacct").write_text(SACCT)
        (d / "bin" / "sacct").chmod(0o755)
        self._env = dict(os.environ)
        os.environ.update(SLURM_CONF=str(self.conf), PATH=f"{d / 'bin'}:{os.environ['PATH']}")
        try:
            self._spawn("munged", "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d}/munged.pid",
                        f"--seed-file={d}/munged.seed", f"--log-file={d}/munged.log")
            while not os.path.exists(sock):
                if self.procs[0].poll() is not None:
                    raise RuntimeError(f"munged did not start: {(d / 'munged.out').read_text()[-500:]}")
                time.sleep(0.05)
            self._spawn("slurmctld", "-D", "-i")
            self._spawn("slurmd", "-D")
            deadline = time.monotonic() + 60
            while _out("sinfo", "-h", "-o", "%t") != "idle":
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"SLURM did not come up; logs in {d}")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _spawn(self, *cmd: str) -> None:
        with open(self.root / f"{cmd[0]}.out", "w") as log:
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def drain(self, timeout: float = 60) -> None:
        """Cancel every job and wait until the queue is empty."""
        subprocess.run(["scancel", "--user=root"], capture_output=True)
        end = time.monotonic() + timeout
        while _out("squeue", "-h", "-t", "PD,R,CG,CF,S") and time.monotonic() < end:
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        try:
            if len(self.procs) == 3 and all(p.poll() is None for p in self.procs):
                self.drain()
        finally:
            for p in reversed(self.procs):  # slurmd, slurmctld, munged: only what we started, by PID
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(15)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
            self.procs.clear()
            if self._env:
                os.environ.clear()
                os.environ.update(self._env)
            if self._sockdir:
                shutil.rmtree(self._sockdir, ignore_errors=True)
