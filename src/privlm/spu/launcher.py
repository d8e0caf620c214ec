"""Start SPU party processes in the SPU environment (``.venv-spu``) from the main environment.

The SPU interpreter is ``$PRIVLM_SPU_PYTHON`` if set, else ``<repo>/.venv-spu/bin/python`` (built by
``make spu-setup``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

from privlm.errors import PrivlmError
from privlm.proc import interrupt_on_term, signal_name, spawn, stop
from privlm.spu.party import EXIT_PEER, PEER_TIMEOUT_S, SIM_NAME, party_name


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


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _describe(name: str, p: subprocess.Popen, err: Path) -> str:
    """One line on how a child ended: killed by a signal, its own last line, or its status."""
    line = _last_line(err)
    if p.returncode is None:
        return f"{name} stopped answering" + (f" ({line})" if line else "")
    if p.returncode < 0:
        return f"{name} was killed by {signal_name(p.returncode)}"
    if line:
        return line if line.startswith(name) else f"{name} failed: {line}"
    return f"{name} exited with status {p.returncode} and no message"


def supervise(children: dict[str, tuple[subprocess.Popen, Path]], timeout: Optional[float] = None,
              daemons: Optional[dict[str, tuple[subprocess.Popen, Path]]] = None) -> None:
    """Wait for the SPU children (name -> (process, its stderr file)) to finish. At the first failure the
    others are stopped and SPUError names the one that failed: a party that exits with `EXIT_PEER` (its peer
    went away or never came) is the survivor, so the error names its peer, the party that died. A
    ``daemons`` process (a delay proxy) must not exit before the children. SIGTERM/SIGINT of this process
    stop every child too (KeyboardInterrupt); whatever happens, none is left running."""
    daemons = daemons or {}
    deadline = None if timeout is None else time.monotonic() + timeout
    everyone = {**children, **daemons}
    try:
        with interrupt_on_term():
            while any(p.poll() is None for p, _ in children.values()):
                for name, (p, err) in daemons.items():
                    if p.poll() is not None:
                        raise SPUError(_describe(name, p, err) if p.returncode else f"{name} exited")
                failed = [n for n, (p, _) in children.items() if p.poll() not in (None, 0)]
                if failed:
                    raise SPUError(_blame(failed, children, EXIT_PEER))
                if deadline is not None and time.monotonic() > deadline:
                    raise SPUError(f"{', '.join(n for n, (p, _) in children.items() if p.poll() is None)} did "
                                   f"not finish within {timeout:g} s")
                time.sleep(0.1)
            failed = [n for n, (p, _) in children.items() if p.returncode != 0]
            if failed:
                raise SPUError(_blame(failed, children, EXIT_PEER))
    finally:
        stop(p for p, _ in everyone.values())


def _blame(failed: list[str], children: dict, exit_peer: int) -> str:
    # a party that failed on its own (killed, crashed) is the one to name; one that only lost its peer
    # points at that peer, whose exit status may still be on its way
    own = [n for n in failed if children[n][0].returncode != exit_peer]
    if not own and len(children) == 2:
        survivor = failed[0]
        other = next(n for n in children if n != survivor)
        try:
            children[other][0].wait(5)
        except subprocess.TimeoutExpired:
            pass
        if children[other][0].returncode in (None, 0):
            return _describe(survivor, *children[survivor])  # its line names the peer it lost
        own = [other]
    name = (own or failed)[0]
    msg = _describe(name, *children[name])
    stopped = [n for n, (p, _) in children.items() if n != name and p.poll() is None]
    return msg + (f"; {' and '.join(stopped)} stopped" if stopped else "")


def start_spu(module: str, args: list[str], err: Path, prefix: Optional[list[str]] = None) -> subprocess.Popen:
    """``python -m <module> args`` in the SPU environment as a child that dies with this process (stderr to
    ``err``; ``prefix``, e.g. ``ip netns exec NS``, runs it inside a namespace). Wait for it with `supervise`."""
    with open(err, "w") as f:
        return spawn([*(prefix or []), str(spu_python()), "-m", module, *args], env=_env(), stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=f)


def spu_module(module: str, args: list[str], work: Path, timeout: Optional[float] = None,
               name: Optional[str] = None) -> None:
    """Run ``python -m <module> args`` in the SPU environment and wait for it, raising SPUError with its last
    stderr line (kept in ``work``) on failure; ``name`` is how the error calls it (default the module)."""
    err = work / f"{module.rsplit('.', 1)[-1]}.stderr"
    supervise({name or module: (start_spu(module, args, err), err)}, timeout)


def check_peers(peers: list[str]) -> list[str]:
    """The two --peer addresses as HOST:PORT strings, or one SPUError line: exactly two, each with a port in
    1..65535 and a host that resolves, not the same address twice."""
    if len(peers) != 2:
        raise SPUError(f"--peer must be given exactly twice (party 0 then party 1), got {len(peers)}")
    resolved = []
    for r, peer in enumerate(peers):
        host, sep, port = peer.rpartition(":")
        if not sep or not host.strip("[]"):
            raise SPUError(f"--peer '{peer}' (party {r}) must be HOST:PORT, e.g. 127.0.0.1:9530")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise SPUError(f"--peer '{peer}' (party {r}): an IPv6 host goes in brackets, e.g. [::1]:9530")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SPUError(f"--peer '{peer}' (party {r}): port '{port}' must be a number in 1..65535")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise SPUError(f"--peer '{peer}' (party {r}): host '{host}' does not resolve "
                           f"({getattr(exc, 'strerror', None) or exc})") from None
        resolved.append({info[4][:2] for info in infos})
    if peers[0] == peers[1] or resolved[0] & resolved[1]:
        raise SPUError(f"--peer '{peers[0]}' and '{peers[1]}' are the same address; each party needs its own")
    return peers


def run_parties(work: Path, public: Path, *, weights: Optional[Path], tokens: Optional[list[int]], T: int,
                protocol: str, mode: str, peers: Optional[list[str]] = None, party: Optional[int] = None,
                head: str = "last", chunks: int = 1, matmul_block: Optional[int] = None,
                timeout: Optional[float] = None, spu_profile: str = "default", sequences: int = 1,
                wan=None, peer_timeout: float = PEER_TIMEOUT_S,
                delete_weights: bool = False) -> Optional[tuple[dict, np.ndarray]]:
    """Run the 2PC forward of the traced program ``public`` (program.json; public.safetensors beside it, the
    server's tensors in ``weights``); returns (result, logits) where the client runs here, else None.

    head: "last" (the client learns only the next token's logits) or "all" (every position's, which reveals more).

    tokens: one prompt (list of ids) or ``sequences`` prompts of equal length (a list of lists).
    mode "sim": both parties as threads of one SPU process (in-memory link).
    mode "2proc": each party its own OS process over brpc; ``party`` runs only that one (two machines);
    ``wan`` (a `privlm.spu.wan.WanNet`) puts the two processes in two network namespaces joined by a
    rate-limited veth pair, with the one-way delay added by `privlm.spu.delayproxy`.
    ``peer_timeout``: a party whose peer does not connect within it, or whose peer's connections close,
    exits with one line naming the peer (`privlm.spu.party.PeerWatch`); here the first party to fail stops
    the other and is the one named (`supervise`). ``delete_weights``: the server party removes the weights
    file once loaded (a temporary export).
    """
    work.mkdir(parents=True, exist_ok=True)
    ids_file = work / "ids.json"
    common = ["--public", str(public), "--protocol", protocol, "--head", head, "--chunks", str(chunks),
              "--spu-profile", spu_profile]
    drop = ["--delete-weights"] if delete_weights else []
    if matmul_block is not None:
        common += ["--matmul-block", str(matmul_block)]
    out = work / "result.json"
    if mode == "sim":
        ids_file.write_text(json.dumps(tokens))
        spu_module("privlm.spu.party", ["--sim", *common, "--tokens", str(ids_file), "--weights", str(weights),
                                        *drop, "--out", str(out), "--log", str(work / "spu_sim.log"),
                                        "--audit", str(work / "audit_sim.json")], work, timeout=timeout,
                   name=SIM_NAME)
        return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))
    prefix: dict[int, list[str]] = {0: [], 1: []}
    if wan is None:
        if peers is None:
            peers = [f"127.0.0.1:{p}" for p in free_ports(2)]
        peers_of = {0: check_peers(peers), 1: peers}
    else:  # each party in its namespace, reaching the other through a delay proxy
        p0, p1, x0, x1 = free_ports(4)
        peers_of = {0: [f"{wan.addresses[0]}:{p0}", f"127.0.0.1:{x1}"],
                    1: [f"127.0.0.1:{x0}", f"{wan.addresses[1]}:{p1}"]}
        prefix = {r: wan.prefix(r) for r in (0, 1)}
    cmds: dict[int, list[str]] = {}
    if party in (None, 1):
        cmds[1] = ["--rank", "1", *common, "--peers", ",".join(peers_of[1]), "--weights", str(weights), *drop,
                   "--T", str(T), "--sequences", str(sequences), "--peer-timeout", str(peer_timeout),
                   "--log", str(work / "spu_party1.log"), "--audit", str(work / "audit_party1.json")]
    if party in (None, 0):
        ids_file.write_text(json.dumps(tokens))
        cmds[0] = ["--rank", "0", *common, "--peers", ",".join(peers_of[0]), "--tokens", str(ids_file), "--out", str(out),
                   "--peer-timeout", str(peer_timeout),
                   "--log", str(work / "spu_party0.log"), "--audit", str(work / "audit_party0.json")]
    children: dict[str, tuple[subprocess.Popen, Path]] = {}
    daemons: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        if wan is not None:
            daemons = {f"the delay proxy of party {side}'s namespace": (wan.delay_proxy(side, x, p), work / "-")
                       for side, x, p in ((1, x0, p0), (0, x1, p1))}
        for r, args in sorted(cmds.items(), reverse=True):  # the server first: it listens for the client
            err = work / f"spu_party{r}.stderr"
            children[party_name(r)] = (start_spu("privlm.spu.party", args, err, prefix[r]), err)
    except BaseException:
        stop(p for p, _ in [*children.values(), *daemons.values()])
        raise
    supervise(children, timeout, daemons)
    if 0 not in cmds:
        return None
    return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))
