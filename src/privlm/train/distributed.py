"""DDP set-up from the launcher's environment: ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
SLURM's ``srun`` (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the step's node list, the job id).

Under srun the master is the first host of the step's node list (``scontrol show hostnames``) and the port is
derived from the job and step ids, so every task of a step computes the same address without talking to the
others; MASTER_ADDR / MASTER_PORT in the environment take precedence. The world size is the *step's* task count
(SLURM_STEP_NUM_TASKS): an sbatch script with ``--ntasks=4`` that runs ``privlm train`` without srun is one
process (SLURM_NTASKS=4 there, but no step), and trains alone instead of waiting for three ranks that never come.
torchrun inside a SLURM allocation (``srun ... torchrun --nproc_per_node 8``) keeps torchrun's variables.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from privlm.errors import PrivlmError

# MASTER_PORT under srun: PORT_BASE + (job id mod 1000) * 15 + (step id mod 15), i.e. 15000-29999, below Linux's
# ephemeral range (32768+); distinct for the concurrent steps of one job and for 1000 consecutive jobs.
PORT_BASE = 15000


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


@dataclass
class LaunchEnv:
    """Who launched this process and where its rendezvous is: ``launcher`` is 'single', 'torchrun' or 'slurm';
    ``master_addr``/``master_port`` are set for 'slurm' (torchrun exports its own)."""
    launcher: str
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list ('gpu[003-004,010],cpu1' -> 'gpu003'), through scontrol."""
    try:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrivlmError(f"cannot expand the SLURM node list '{nodelist}' (scontrol show hostnames: {exc}); "
                          f"set MASTER_ADDR") from None
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise PrivlmError(f"cannot expand the SLURM node list '{nodelist}' (scontrol show hostnames: {why}); "
                          f"set MASTER_ADDR")
    return hosts[0]


def slurm_port(job_id: str, step_id: str) -> int:
    return PORT_BASE + (int(job_id) % 1000) * 15 + int(step_id or 0) % 15


def launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read the launcher's variables (``env`` defaults to os.environ); resolves nothing over the network."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    world = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if world > 1:
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(env["SLURM_JOB_ID"],
                                                                                  env.get("SLURM_STEP_ID", "0"))
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")),
                         env.get("MASTER_ADDR") or None, port)
    return LaunchEnv("single")


def world_size() -> int:
    """Processes of this training (1 outside torchrun/srun), without joining anything."""
    return launch_env().world


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun or srun with more than one process (gloo on CPU, NCCL on
    CUDA)."""
    launch = launch_env()
    if launch.world <= 1:
        return DistInfo()
    local = launch.local_rank
    if device_type == "cuda" and torch.cuda.device_count() > 0:
        local %= torch.cuda.device_count()  # srun --gpus-per-task=1 shows each task only its own GPU
    info = DistInfo(launch.rank, launch.world, local)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        if launch.launcher == "slurm":
            addr = launch.master_addr or first_host(os.environ.get("SLURM_STEP_NODELIST")
                                                    or os.environ["SLURM_JOB_NODELIST"])
            dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{launch.master_port}",
                                    rank=info.rank, world_size=info.world)
        else:
            dist.init_process_group(backend=backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
