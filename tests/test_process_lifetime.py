"""Every process privlm starts dies with its parent, a 2PC party whose peer dies or never comes exits with one
line naming it, and nothing temporary (the server's weights above all) outlives a killed run.

The SPU runs are the tiny model of tests/test_pi_spu.py. Each command runs with its own TMPDIR, so its
temporary directories and the command lines of its processes carry a path unique to the test: "nothing left"
is checked with `pgrep -f` on that path and by listing that directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import PROMPT, write_tiny_run

pytestmark = pytest.mark.slow  # make test-fast leaves this file out

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PRIVLM = [sys.executable, "-m", "privlm.cli"]
EXIT_WITHIN = 60  # seconds: the bound the contract promises after a death (docs/CONTRACTS.md)


def _env(tmpdir: Path) -> dict:
    tmpdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(SRC)}


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _wait_while(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still true after {seconds} s: {what}")
        time.sleep(0.2)


def _leftovers(tmpdir: Path) -> list[str]:
    """privlm's temporary files under tmpdir (work directories, exports, weights)."""
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*")
                  if p.name.startswith("privlm-") or p.suffix == ".safetensors")


# ---- privlm.proc: parent-death signal, janitor ---------------------------------------------------------
CHILD = "from privlm.proc import adopt_parent; adopt_parent(); print('ready', flush=True); import time; time.sleep(600)"
PARENT = f"""
import subprocess, sys, time
from privlm.proc import private_tempdir, spawn
child = spawn([sys.executable, "-c", "{CHILD}"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"  # past its parent check: only the parent-death signal can end it
with private_tempdir("privlm-test-") as tmp:
    (tmp / "weights.safetensors").write_bytes(b"secret")
    print(child.pid, tmp, flush=True)
    time.sleep(600)
"""


def test_sigkilled_parent_takes_its_child_and_temporary_directory(tmp_path):
    """A parent SIGKILLed while its child runs and its private temporary directory exists: the child dies
    (parent-death signal) and the janitor removes the directory."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=_env(tmp_path / "tmp"), stdout=subprocess.PIPE,
                              text=True)
    child_pid, tmp = parent.stdout.readline().split()
    child_pid, tmp = int(child_pid), Path(tmp)
    try:
        assert _alive(child_pid) and (tmp / "weights.safetensors").is_file()
        assert os.stat(tmp).st_mode & 0o777 == 0o700
        parent.kill()
        parent.wait()
        _wait_while(lambda: _alive(child_pid), 10, f"child {child_pid} of a SIGKILLed parent is running")
        _wait_while(tmp.exists, 10, f"{tmp} of a SIGKILLed parent exists")
        assert _leftovers(tmp_path / "tmp") == []
    finally:
        if _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


WAN_PARENT = """
import time
from privlm.spu.wan import WanLink, wan_namespaces
with wan_namespaces(WanLink.parse("100mbit:10ms")) as net:
    proxy = net.delay_proxy(0, 45901, 45902)
    print(proxy.pid, *net.namespaces, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tc") is None, reason="network namespaces need root and tc")
def test_sigkilled_wan_parent_leaves_no_namespace_and_no_proxy(tmp_path):
    """`pi run --wan`'s network namespaces (with their veth pair) and delay proxies do not outlive a
    SIGKILLed launcher: the proxy dies with it, the janitor deletes the namespaces."""
    parent = subprocess.Popen([sys.executable, "-c", WAN_PARENT], env=_env(tmp_path / "tmp"), stdout=subprocess.PIPE,
                              text=True)
    proxy, *namespaces = parent.stdout.readline().split()
    listed = lambda: subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout  # noqa: E731
    assert len(namespaces) == 2 and all(n in listed() for n in namespaces) and _alive(int(proxy))
    parent.kill()
    parent.wait()
    _wait_while(lambda: _alive(int(proxy)), 10, "the delay proxy of a SIGKILLed launcher is running")
    _wait_while(lambda: any(n in listed() for n in namespaces), 10, f"namespaces {namespaces} exist")


def test_child_whose_parent_is_already_gone_ends_itself():
    """The check after asking for the parent-death signal: a child whose expected parent is not its parent
    (the parent died before the request) kills itself at once."""
    code = "from privlm.proc import adopt_parent; adopt_parent(); import time; time.sleep(600)"
    env = {**os.environ, "PYTHONPATH": str(SRC), "PRIVLM_PARENT_PID": "1"}  # not its parent
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    env["PRIVLM_PARENT_PID"] = str(os.getpid())  # its parent: it runs until told otherwise
    with subprocess.Popen([sys.executable, "-c", code], env=env) as p:
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(3)
        p.kill()


def test_tcp_states_see_a_connection_open_and_closed():
    """PeerWatch's view of this process's TCP connections (/proc), against sockets made here."""
    from privlm.spu.party import _tcp_states
    base = _tcp_states().count("01")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    assert _tcp_states().count("01") == base + 2  # both ends are this process's
    assert "0A" in _tcp_states()  # the listener
    client.close()
    accepted.close()
    server.close()
    assert _tcp_states().count("01") == base


def test_bad_peer_addresses_are_one_line_errors(tmp_path):
    from privlm.spu.launcher import SPUError, check_peers
    for peers, msg in [(["localhost", "127.0.0.1:5"], "must be HOST:PORT"),
                       (["127.0.0.1:0", "127.0.0.1:5"], "1..65535"),
                       (["127.0.0.1:5", "127.0.0.1:70000"], "1..65535"),
                       (["127.0.0.1:5", "127.0.0.1:x"], "1..65535"),
                       (["no-such-host.invalid:5", "127.0.0.1:6"], "does not resolve"),
                       (["127.0.0.1:5", "127.0.0.1:5"], "same address"),
                       (["localhost:5", "127.0.0.1:5"], "same address"),
                       (["127.0.0.1:5"], "exactly twice")]:
        with pytest.raises(SPUError, match=msg):
            check_peers(peers)
    assert check_peers(["127.0.0.1:5", "localhost:6"]) == ["127.0.0.1:5", "localhost:6"]


# ---- 2PC runs ------------------------------------------------------------------------------------------
def _spu_available() -> bool:
    from privlm.spu.launcher import SPUError, spu_python
    try:
        spu_python()
        return True
    except SPUError:
        return False


needs_spu = pytest.mark.skipif(not _spu_available(), reason="needs the SPU environment (make spu-setup)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory in the docs/CONTRACTS.md layout: config.yaml, model.safetensors, tokenizer.json."""
    return write_tiny_run(tmp_path_factory.mktemp("run"))


def _start(args: list[str], tmpdir: Path) -> subprocess.Popen:
    return subprocess.Popen([*PRIVLM, *args], env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def _until_protocol_runs(tmpdir: Path, launchers: list[subprocess.Popen]) -> None:
    """Wait until the SPU parties have started the forward pass (the SPU log of each party has lines)."""
    def running() -> bool:
        for p in launchers:
            assert p.poll() is None, p.communicate()
        logs = [f for f in tmpdir.glob("privlm-pi-*/spu_party*.log") if f.stat().st_size > 0]
        return len(logs) == 2
    _wait_while(lambda: not running(), 600, "the parties have not started the forward pass")


def _party_pid(tmpdir: Path, rank: int) -> int:
    pids = _pids(f"privlm.spu.party --rank {rank} .*{tmpdir}")
    assert len(pids) == 1, pids
    return pids[0]


def _one_line_error(p: subprocess.Popen) -> str:
    _, err = p.communicate(timeout=EXIT_WITHIN)
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def _nothing_left(tmpdir: Path) -> None:
    _wait_while(lambda: _pids(str(tmpdir)), EXIT_WITHIN, f"processes of {tmpdir} are running")
    _wait_while(lambda: _leftovers(tmpdir), EXIT_WITHIN, f"temporary files are left under {tmpdir}")


@needs_spu
def test_killed_client_party_is_named_and_the_server_is_stopped(tiny_run, tmp_path):
    """`pi run --mode 2proc` (both parties here): SIGKILL the client party mid-run. The launcher stops the
    server at once and its one line names the party that died; no process and no temporary export remain."""
    tmpdir = tmp_path / "tmp"
    launcher = _start(["pi", "run", str(tiny_run), "--prompt", PROMPT, "--mode", "2proc"], tmpdir)
    _until_protocol_runs(tmpdir, [launcher])
    server = _party_pid(tmpdir, 1)
    os.kill(_party_pid(tmpdir, 0), signal.SIGKILL)
    err = _one_line_error(launcher)
    assert err.startswith("privlm pi: error: party 0 (client) was killed by SIGKILL"), err
    assert "party 1 (server) stopped" in err, err
    assert not _alive(server)
    _nothing_left(tmpdir)


@needs_spu
def test_killed_server_party_on_two_machines_both_sides_exit_with_one_line(tiny_run, tmp_path):
    """The two-machine set-up (one `pi run --party N` each, here on loopback): SIGKILL the server party
    mid-run. Its launcher names it; the client party notices on its own (its peer's connections closed) and
    its launcher's one line names the lost peer. Nothing is left running, no temporary export remains."""
    tmpdir = tmp_path / "tmp"
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    peers = ["--peer", f"127.0.0.1:{ports[0]}", "--peer", f"127.0.0.1:{ports[1]}", "--peer-timeout", "30"]
    common = ["pi", "run", str(tiny_run), "--mode", "2proc", *peers]
    server = _start([*common, "--party", "1", "--T", str(len(PROMPT.split()))], tmpdir)
    client = _start([*common, "--party", "0", "--prompt", PROMPT], tmpdir)
    _until_protocol_runs(tmpdir, [server, client])
    os.kill(_party_pid(tmpdir, 1), signal.SIGKILL)
    assert _one_line_error(server) == "privlm pi: error: party 1 (server) was killed by SIGKILL"
    err = _one_line_error(client)
    assert err.startswith(f"privlm pi: error: party 0 (client): lost party 1 (server) at 127.0.0.1:{ports[1]}"), err
    _nothing_left(tmpdir)


@needs_spu
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_launcher_leaves_no_party_and_no_export(tiny_run, tmp_path, sig):
    """SIGKILL `privlm pi run --mode 2proc` itself mid-run: both parties die with it (parent-death signal) and
    the temporary directory with the server's exported weights is removed (janitor). SIGTERM: the launcher
    stops the parties itself, cleans up and says it was interrupted."""
    tmpdir = tmp_path / "tmp"
    launcher = _start(["pi", "run", str(tiny_run), "--prompt", PROMPT, "--mode", "2proc"], tmpdir)
    _until_protocol_runs(tmpdir, [launcher])
    parties = [_party_pid(tmpdir, 0), _party_pid(tmpdir, 1)]
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=EXIT_WITHIN)
    if sig == signal.SIGTERM:
        assert launcher.returncode == 130 and err == "privlm pi: interrupted\n", err
    _nothing_left(tmpdir)
    # a SIGKILLed multi-threaded party loses its command line (pgrep) before its last thread has exited
    _wait_while(lambda: any(_alive(p) for p in parties), EXIT_WITHIN, f"parties {parties} are running")


@needs_spu
def test_party_without_peer_exits_within_its_timeout(tiny_run, tmp_path):
    """`--party 0` started alone: it ends with one line naming the peer that never came, after the
    configured --peer-timeout (not the link's defaults of minutes)."""
    tmpdir = tmp_path / "tmp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    client = _start(["pi", "run", str(tiny_run), "--prompt", PROMPT, "--mode", "2proc", "--party", "0",
                     "--peer", "127.0.0.1:1", "--peer", f"127.0.0.1:{port}", "--peer-timeout", "5"], tmpdir)
    # the CLI itself needs torch and the SPU runtime's start-up beside the 5 s; EXIT_WITHIN bounds it all
    err = _one_line_error(client)
    assert err == (f"privlm pi: error: party 0 (client): party 1 (server) at 127.0.0.1:{port} did not connect "
                   f"within 5 s"), err
    _nothing_left(tmpdir)


# ---- sweep ---------------------------------------------------------------------------------------------
def test_sigkilled_parallel_sweep_leaves_no_run_behind_and_reruns(tmp_path):
    """SIGKILL `privlm sweep --jobs 2` while both runs train: its training processes die with it (none
    left in its session, no run lock held), and the same command resumes both runs to the end, each run's
    steps logged once (nothing repeated, nothing lost) and no run directory duplicated."""
    steps = ["model.n_embd=32", "train.max_steps=40", "train.batch_size=2", "train.eval_every=20",
             "train.eval_max_batches=2", "train.save_every=5", "train.entropy_every=20", "train.log_every=5"]
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({"name": "t", "config": str(REPO / "configs" / "cpu" / "tiny.yaml"),
                                 "overrides": steps, "runs": ["SM+LN+G", "SM+ScFuFFN"]}))
    out = tmp_path / "out"
    cmd = [*PRIVLM, "sweep", str(sweep), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=_env(tmp_path / "tmp"))
    dirs = [out / "sm-ln-g", out / "sm-scfuffn"]
    _wait_while(lambda: not all((d / "state" / "LATEST").is_file() for d in dirs), 600, "no checkpoints yet")
    workers = [int(p) for p in subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split() if int(p) != proc.pid]
    assert len(workers) >= 2, workers  # the two runs (and multiprocessing's resource tracker)
    proc.kill()
    proc.wait()
    _wait_while(lambda: any(_alive(p) for p in workers), EXIT_WITHIN, f"workers of the killed sweep: {workers}")
    # on a loaded machine the faster run may have finished between its partner's first checkpoint and the kill
    killed_mid_run = [d for d in dirs if not (d / "summary.json").is_file()]
    assert killed_mid_run, "both runs finished before the kill: nothing was tested"

    import fcntl
    for d in dirs:  # no lock is held: a writer could take each at once
        with open(d / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(tmp_path / "tmp"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": resuming") == len(killed_mid_run), res.stdout
    assert res.stdout.count("already finished, skipped") == 2 - len(killed_mid_run), res.stdout
    state = json.loads((out / "sweep.json").read_text())
    assert {k: v["status"] for k, v in state["runs"].items()} == {"sm-ln-g": "done", "sm-scfuffn": "done"}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("sm-")) == ["sm-ln-g", "sm-scfuffn"]
    for d in dirs:
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(5, 41, 5))
        assert json.loads((d / "summary.json").read_text())["steps"] == 40
