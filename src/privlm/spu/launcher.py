"""Start SPU party processes in the SPU environment (``.venv-spu``) from the main environment.

The SPU interpreter is ``$PRIVLM_SPU_PYTHON`` if set, else ``<repo>/.venv-spu/bin/python`` (built by
``make spu-setup``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np

from privlm.errors import PrivlmError


class SPUError(PrivlmError):
    """The SPU environment is missing or a party process failed."""


REPO_ROOT = Path(__file__).resolve().parents[3]


def spu_python() -> Path:
    env = os.environ.get("PRIVLM_SPU_PYTHON")
    path = Path(env) if env else REPO_ROOT / ".venv-spu" / "bin" / "python"
    if not path.exists():
        where = "PRIVLM_SPU_PYTHON" if env else "the default location"
        raise SPUError(f"SPU environment not found at {path} ({where}); run `make spu-setup` "
                       f"(or point PRIVLM_SPU_PYTHON at a Python with spu==0.9.5 and privlm installed)")
    return path


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # the main environment's paths must not leak into the SPU interpreter, but the parties must run the
    # same privlm source as this process (not whatever checkout the SPU environment was installed from)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def _fail(proc_name: str, rc: int, stderr: str) -> SPUError:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no error output"
    return SPUError(f"{proc_name} exited with status {rc}: {last}")


def spu_module(module: str, args: list[str], timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` in the SPU environment, raising SPUError on failure."""
    proc = subprocess.run([str(spu_python()), "-m", module, *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)
    if proc.returncode != 0:
        raise _fail(module, proc.returncode, proc.stderr)
    return proc


def run_parties(work: Path, public: Path, *, weights: Optional[Path], tokens: Optional[list[int]], T: int,
                protocol: str, mode: str, peers: Optional[list[str]] = None, party: Optional[int] = None,
                head: str = "all", chunks: int = 1, matmul_block: Optional[int] = None,
                timeout: Optional[float] = None, spu_profile: str = "default", sequences: int = 1,
                wan=None) -> Optional[tuple[dict, np.ndarray]]:
    """Run the 2PC forward; returns (result, logits) where the client runs here, else None.

    tokens: one prompt (list of ids) or ``sequences`` prompts of equal length (a list of lists).
    mode "sim": both parties as threads of one SPU process (in-memory link).
    mode "2proc": each party its own OS process over brpc; ``party`` runs only that one (two machines);
    ``wan`` (a `privlm.spu.wan.WanLink`) puts the two processes in two network namespaces joined by a
    rate-limited veth pair, with the one-way delay added by `privlm.spu.delayproxy`.
    """
    work.mkdir(parents=True, exist_ok=True)
    ids_file = work / "ids.json"
    common = ["--public", str(public), "--protocol", protocol, "--head", head, "--chunks", str(chunks),
              "--spu-profile", spu_profile]
    if matmul_block is not None:
        common += ["--matmul-block", str(matmul_block)]
    out = work / "result.json"
    if mode == "sim":
        ids_file.write_text(json.dumps(tokens))
        spu_module("privlm.spu.party", ["--sim", *common, "--tokens", str(ids_file), "--weights", str(weights),
                                        "--out", str(out), "--log", str(work / "spu_sim.log"),
                                        "--audit", str(work / "audit_sim.json")], timeout=timeout)
        return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))
    prefix: dict[int, list[str]] = {0: [], 1: []}
    proxies = []
    if wan is not None:  # each party in its namespace, reaching the other through a delay proxy
        p0, p1, x0, x1 = free_ports(4)
        proxies = [wan.delay_proxy(1, x0, p0), wan.delay_proxy(0, x1, p1)]
        peers_of = {0: [f"{wan.addresses[0]}:{p0}", f"127.0.0.1:{x1}"],
                    1: [f"127.0.0.1:{x0}", f"{wan.addresses[1]}:{p1}"]}
        prefix = {r: wan.prefix(r) for r in (0, 1)}
    else:
        if peers is None:
            peers = [f"127.0.0.1:{p}" for p in free_ports(2)]
        if len(peers) != 2:
            raise SPUError(f"--peer must be given exactly twice (party 0 then party 1), got {len(peers)}")
        peers_of = {0: peers, 1: peers}
    cmds: dict[int, list[str]] = {}
    if party in (None, 1):
        cmds[1] = ["--rank", "1", *common, "--peers", ",".join(peers_of[1]), "--weights", str(weights), "--T", str(T),
                   "--sequences", str(sequences),
                   "--log", str(work / "spu_party1.log"), "--audit", str(work / "audit_party1.json")]
    if party in (None, 0):
        ids_file.write_text(json.dumps(tokens))
        cmds[0] = ["--rank", "0", *common, "--peers", ",".join(peers_of[0]), "--tokens", str(ids_file), "--out", str(out),
                   "--log", str(work / "spu_party0.log"), "--audit", str(work / "audit_party0.json")]
    procs = {r: subprocess.Popen([*prefix[r], str(spu_python()), "-m", "privlm.spu.party", *a], env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, a in sorted(cmds.items(), reverse=True)}
    errors = {}
    try:
        for r, p in procs.items():
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                errors[r] = _fail(f"party {r} ({'client' if r == 0 else 'server'})", p.returncode, err)
    finally:
        for p in [*procs.values(), *proxies]:
            if p.poll() is None:
                p.kill()
                p.wait()
    if errors:
        raise errors[min(errors)]
    if 0 not in cmds:
        return None
    return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))
