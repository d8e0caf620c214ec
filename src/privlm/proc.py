"""Child processes that die with their parent, and temporary files that die with it too.

Standard library only: imported in the main environment and in the SPU environment (no torch there).

Every process privlm starts (SPU parties, delay proxies, sweep workers, the `privlm pi run` of the demo,
micro-benchmark parties) is started so that it cannot outlive the process that started it:

- **parent-death signal**: the child asks the kernel (Linux `prctl(PR_SET_PDEATHSIG)`) for a signal when its
  parent dies, then checks that its parent is still the one that started it (the parent may have died
  before the request: then it goes at once). A child started by `spawn` learns its parent from
  ``$PRIVLM_PARENT_PID`` (`adopt_parent`, called first thing by every privlm program); a multiprocessing
  child is given the pid as an argument (`die_with_parent`). The kernel sends the signal when the *thread*
  that started the child ends: start children from a thread that outlives them (privlm starts them from
  the main thread).
- **process groups**: `spawn` puts each child in a session of its own, so a Ctrl-C at the terminal reaches
  only the parent, which stops its children in order (`stop`: SIGTERM to the child's group, SIGKILL after
  a grace period); `interrupt_on_term` turns SIGTERM into KeyboardInterrupt in the parent so that its
  ``finally`` blocks run.
- **janitor**: what must not outlive a run even when its process is SIGKILLed (a temporary export holding
  the server's weights, network namespaces) is registered with a small janitor process
  (``python -m privlm.proc janitor``, one per parent, started on first use). The janitor reads its orders
  on a pipe that only the parent holds open; when the pipe closes — the parent exited, normally or
  killed — it carries out what is still registered and exits. `private_tempdir` is the temporary
  directory (mode 0700) of a run, registered there.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

PARENT_ENV = "PRIVLM_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(expected_ppid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, then make sure the parent is still
    ``expected_ppid``: if it died before the request, this process was re-parented and ends itself now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != expected_ppid:
        os.kill(os.getpid(), sig)
        time.sleep(1)  # a signal whose handler returns (not SIGKILL): leave anyway
        os._exit(128 + int(sig))


def adopt_parent(sig: int = signal.SIGKILL) -> None:
    """Called first by every privlm program: if it was started by `spawn` (``$PRIVLM_PARENT_PID`` set), die
    with that parent. The variable is removed so that processes this one starts do not inherit it."""
    value = os.environ.pop(PARENT_ENV, None)
    if value and value.isdigit():
        die_with_parent(int(value), sig)


def child_env(env: Optional[dict] = None) -> dict:
    """The environment of a child started by this process (``$PRIVLM_PARENT_PID`` names this process)."""
    out = dict(os.environ if env is None else env)
    out[PARENT_ENV] = str(os.getpid())
    return out


def spawn(argv: list[str], *, env: Optional[dict] = None, **popen_kwargs) -> subprocess.Popen:
    """Start a privlm program as a child that dies with this process (see the module doc): its own session
    and process group, ``$PRIVLM_PARENT_PID`` set. Stop it with `stop`."""
    return subprocess.Popen(argv, env=child_env(env), start_new_session=True, **popen_kwargs)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        pgid = os.getpgid(p.pid)
    except ProcessLookupError:
        return
    try:
        if pgid == p.pid and pgid != os.getpgid(0):  # its own group (spawn): everything it started too
            os.killpg(pgid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


def stop(procs: Iterable[Optional[subprocess.Popen]], grace: float = 3.0) -> None:
    """Stop children that are still running: SIGTERM to each one's process group, SIGKILL to those still
    there after ``grace`` seconds; every child is waited for (no zombies)."""
    procs = [p for p in procs if p is not None]
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def interrupt_on_term() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt in the main thread while inside, as Ctrl-C does, so that
    ``finally`` blocks stop the children and remove temporary files. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(_signum, _frame):
        raise KeyboardInterrupt
    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def signal_name(returncode: int) -> str:
    """'SIGKILL' for a Popen returncode of -9."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


# ---- janitor ------------------------------------------------------------------------------------------
class Janitor:
    """Undoes what this process registered if it dies without undoing it itself (see the module doc)."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._owner = 0
        self._next = 0
        self._lock = threading.Lock()

    def _alive(self) -> bool:
        return self._proc is not None and self._owner == os.getpid() and self._proc.poll() is None

    def _start(self) -> None:
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = spawn([sys.executable, "-m", "privlm.proc", "janitor"], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self._owner = os.getpid()

    def _send(self, order: dict) -> None:
        for _ in range(2):  # a janitor killed by someone is replaced (its earlier orders are lost)
            if not self._alive():
                self._start()
            try:
                self._proc.stdin.write(json.dumps(order) + "\n")
                self._proc.stdin.flush()
                return
            except OSError:
                self._proc = None

    def register(self, *, rmtree: Optional[str] = None, run: Optional[list[str]] = None) -> int:
        """Remove the directory ``rmtree`` / run the command ``run`` if this process dies first; returns a
        token for `done`."""
        with self._lock:
            self._next += 1
            self._send({"id": self._next, "rmtree": rmtree, "run": run})
            return self._next

    def done(self, token: int) -> None:
        """This process undid ``token`` itself."""
        with self._lock:
            if self._alive():
                self._send({"done": token})


JANITOR = Janitor()


def _janitor_main() -> int:
    """Read orders until the parent's end of the pipe closes, then carry out those still registered (newest
    first). SIGTERM/SIGINT/SIGHUP end the wait the same way."""
    def wake(_signum, _frame):
        raise EOFError
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, wake)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes the pipe
    pending: dict[int, dict] = {}
    try:
        for line in sys.stdin:
            try:
                order = json.loads(line)
            except ValueError:
                continue
            if "done" in order:
                pending.pop(order["done"], None)
            else:
                pending[order["id"]] = order
    except EOFError:
        pass
    for _, order in sorted(pending.items(), reverse=True):
        if order.get("rmtree"):
            shutil.rmtree(order["rmtree"], ignore_errors=True)
        if order.get("run"):
            subprocess.run(order["run"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


@contextlib.contextmanager
def private_tempdir(prefix: str) -> Iterator[Path]:
    """A new temporary directory (mode 0700) removed at exit, and by the janitor if this process is killed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o700)
    token = JANITOR.register(rmtree=str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        JANITOR.done(token)


if __name__ == "__main__":
    if sys.argv[1:] == ["janitor"]:
        os.environ.pop(PARENT_ENV, None)  # its parent's death is the end of its input, no signal needed
        sys.exit(_janitor_main())
    print("usage: python -m privlm.proc janitor", file=sys.stderr)
    sys.exit(2)
