"""One party of the two-party private forward pass (runs in the SPU environment: jax + spu, no torch).

Party 0 is the client: it holds the prompt's token ids (as a one-hot matrix) and learns the logits.
Party 1 is the server: it holds the weights, in the clear, and never shares them. Every input is private
to its owner: SPU's colocated sharing (`make_shares(x, VIS_SECRET, owner_rank)`) gives the owner a share
holding the value and the other party a share that does not depend on it, which that party builds
itself from zeros of the public shape. So nothing crosses the link before the forward pass (no weight
shares, no prompt shares), and CHEETAH runs its cheaper secret x private kernels for every product with a
weight. Every step of the traced program (`privlm.spu.program.program_from_trace`, from program.json and the
public constants beside it) runs as its own SPU executable on shares, and at the end the server sends its share
of the logits the client asked for (``--head``) to the client, who alone reconstructs them.

    python -m privlm.spu.party --rank 0 --public program.json --tokens ids.json --peers A,B --out res.json
    python -m privlm.spu.party --rank 1 --public program.json --weights server.safetensors --T 16 --peers A,B
    python -m privlm.spu.party --sim --public ... --tokens ... --weights ... --out res.json   (both, threads)

``--tokens`` holds one list of ids or a list of N equally long lists (``pi eval``: N sequences through
one session; the server then needs ``--sequences N``). The result JSON of party 0 (or of ``--sim``) holds
per-step link counters of the first sequence (from SPU's own profile log, see `privlm.spu.linkstats`),
per-sequence totals, wall times and the logits. ``--audit FILE`` writes what this process received on its
command line and over the link outside SPU's runs, which files it opened (Python audit hook) and a digest
of every input share it held, so tests can check the privacy split.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

AUDIT: dict = {"argv": list(sys.argv), "opened": [], "loaded": [], "plaintext": [], "received_shares": [],
               "local_shares": [], "share_digests": {}}


def _audit_hook(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if not path.startswith((sys.prefix, sys.base_prefix, "/proc", "/dev", "/sys", "/usr", "/etc")):
            AUDIT["opened"].append(path)


def start_audit() -> None:
    """Record every file this process opens from now on (AUDIT["opened"]; `--audit` writes it)."""
    sys.addaudithook(_audit_hook)


import numpy as np  # noqa: E402  (after the hook so nothing is opened unseen)

from privlm.spu.link import PEER_TIMEOUT_S, make_link  # noqa: E402,F401  (re-exported: launcher, generate, cli)

PROTOCOLS = ("cheetah", "semi2k")


def run_ranks(target, ranks) -> None:
    """Run target(rank) for each rank in its own thread (the in-process simulator's two parties) and
    re-raise the first failure in the calling thread."""
    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            target(rank)
        except BaseException as exc:  # surface a thread's failure in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in ranks]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


# How long a party's connections to a peer that is running may all be closed before the party concludes the
# peer is gone (brpc keeps one connection each way open for the whole session; they close when the peer's
# process ends).
LOST_GRACE_S = 2.0
# Exit status of a party whose peer never connected or went away (the launcher then blames the peer).
EXIT_PEER = 4
ROLE = {0: "client", 1: "server"}
SIM_NAME = "SPU simulator"  # how errors of `--sim` (both parties in one process) name it


def party_name(rank: int) -> str:
    return f"party {rank} ({ROLE[rank]})"


class PeerLost(Exception):
    """The peer never connected or went away (the message names it)."""


def _tcp_states() -> list[str] | None:
    """States (hex, /proc/net/tcp) of this process's TCP sockets; '01' is ESTABLISHED, '0A' LISTEN. None where
    there is no /proc to read (not Linux): then a lost peer is left to the link's own timeouts."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states, tables = [], 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[9] in inodes:
                states.append(cols[3])
    return states if tables else None


def _peer_connected() -> bool:
    """Has this process an established TCP connection (brpc's to or from the peer)? True when unknown."""
    states = _tcp_states()
    return states is None or "01" in states


class PeerWatch:
    """Watchdog of one 2PC party: a thread (SPU's link and runtime calls release the GIL) that ends the process.

    connecting: the peer must connect within ``timeout`` s, else one line and exit `EXIT_PEER`.
    running: the party's connections with its peer (observed in /proc, nothing is sent) must not all be
    closed for `LOST_GRACE_S`, else one line naming the peer and exit `EXIT_PEER`.
    closing: the result is written; a peer gone while the link shuts down ends the party with status 0."""

    def __init__(self, rank: int, peer_addr: str, timeout: float, poll: float = 0.5) -> None:
        self.rank, self.peer_addr, self.timeout, self.poll = rank, peer_addr, timeout, poll
        self.phase = "connecting"
        self.lost_since: float | None = None
        self._start = time.monotonic()
        threading.Thread(target=self._loop, daemon=True, name="privlm-peer-watch").start()

    @property
    def peer(self) -> str:
        return f"{party_name(1 - self.rank)} at {self.peer_addr}"

    def no_connect_message(self) -> str:
        return f"{self.peer} did not connect within {self.timeout:g} s"

    def lost_message(self) -> str:
        return f"lost {self.peer}: its connections closed (its process ended or was killed)"

    def connected(self) -> None:
        self.phase = "running"

    def closing(self) -> None:
        self.phase = "closing"

    def disarm(self) -> None:
        self.phase = "off"

    def _exit(self, message: str | None, status: int) -> None:
        if message:
            print(f"{party_name(self.rank)}: {message}", file=sys.stderr, flush=True)
        os._exit(status)

    def _loop(self) -> None:
        while self.phase != "off":
            time.sleep(self.poll)
            if self.phase == "connecting":
                if time.monotonic() - self._start > self.timeout:
                    self._exit(self.no_connect_message(), EXIT_PEER)
                continue
            if self.phase == "off":
                return
            if _peer_connected():
                self.lost_since = None
                continue
            now = time.monotonic()
            self.lost_since = self.lost_since or now
            if now - self.lost_since >= LOST_GRACE_S:
                self._exit(None if self.phase == "closing" else self.lost_message(),
                           0 if self.phase == "closing" else EXIT_PEER)

    def peer_gone(self, wait: float = LOST_GRACE_S + 1.0) -> bool:
        """After an error in the protocol: are the peer's connections closed (waiting up to ``wait`` s)?"""
        deadline = time.monotonic() + wait
        while True:
            if not _peer_connected():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(self.poll)


def connect(rank: int, peers: list[str], peer_timeout_s: float = PEER_TIMEOUT_S):
    """(link, watch): this party's brpc link to its peer, watched by a `PeerWatch` from before connecting
    (the watch bounds the connect to ``peer_timeout_s``). Raises PeerLost when the peer never connects."""
    import socket

    host, _, port = peers[rank].rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # brpc's own failure here is a C++ stack; say which address cannot be used
            s.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            raise OSError(f"cannot listen on {peers[rank]} (this party's --peer address): "
                          f"{exc.strerror or exc}") from None
    watch = PeerWatch(rank, peers[1 - rank], peer_timeout_s)
    try:
        lctx = make_link(rank, peers, peer_timeout_s=peer_timeout_s)
    except Exception:
        raise PeerLost(watch.no_connect_message()) from None
    watch.connected()
    return lctx, watch


def one_line(exc: BaseException) -> str:
    """The first informative line of an exception (SPU's C++ errors carry a stack trace after it)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and line != "what:" and not line.startswith(("Stacktrace", "#")):
            return f"{type(exc).__name__}: {line[:300]}"
    return type(exc).__name__


class Party:
    """Holds the link, the SPU runtime and this party's shares of every live tensor."""

    def __init__(self, rank: int, lctx, protocol: str, log_path: Path | None, spu_profile,
                 ring_op: str | None = None):
        """ring_op: run in the ring of that op's kernel (`SPUProfile.rings`; micro-benchmarks only)."""
        import spu.api as spu_api

        from privlm.spu.linkstats import LogTail

        self.rank, self.lctx, self.protocol, self.spu_profile = rank, lctx, protocol, spu_profile
        profile = log_path is not None
        self.rt = spu_api.Runtime(lctx, spu_profile.runtime_config(protocol, link_profile=profile, op=ring_op))
        self.io = spu_api.Io(2, spu_profile.runtime_config(protocol, op=ring_op))
        self.tail = LogTail(log_path) if profile else None
        self.shares: dict[str, object] = {}
        self.share_bytes_sent = 0
        self.share_bytes_recv = 0

    # ---- inputs: private to their owner, the other party's share is data-independent ---------------------
    def share_input(self, name: str, owner: int, value: np.ndarray | None, shape: tuple) -> None:
        """Make this party's share of an input owned by ``owner``. Only the owner passes ``value``; the
        other party builds its share from zeros of ``shape`` (SPU's colocated share of the non-owner does
        not depend on the value), so no message is exchanged."""
        import spu.libspu as libspu

        if self.rank == owner:
            data = np.ascontiguousarray(value, dtype=np.float32)
            if data.shape != tuple(shape):
                raise ValueError(f"input '{name}' has shape {data.shape}, the program expects {tuple(shape)}")
        else:
            data = np.zeros(shape, np.float32)
            AUDIT["local_shares"].append(name)
        share = self.io.make_shares(data, libspu.Visibility.VIS_SECRET, owner)[self.rank]
        self.shares[name] = share
        AUDIT["share_digests"].setdefault(name, share_digest(share))

    def share_public(self, name: str, value: np.ndarray) -> None:
        """A public runtime input (both parties hold the same value, e.g. a decode step's position): each party
        makes its own public share locally; nothing is exchanged."""
        import spu.libspu as libspu

        self.shares[name] = self.io.make_shares(np.ascontiguousarray(value, dtype=np.float32),
                                                libspu.Visibility.VIS_PUBLIC)[self.rank]

    def share_secret(self, name: str, owner: int, value: np.ndarray | None) -> None:
        """Secret-share a value the way an intermediate activation is held: the owner splits it into two
        random-looking shares and sends one (micro-benchmarks use this for activation-like inputs)."""
        import spu.libspu as libspu

        if self.rank == owner:
            shares = self.io.make_shares(np.ascontiguousarray(value, dtype=np.float32),
                                         libspu.Visibility.VIS_SECRET)
            self._send_share(1 - self.rank, shares[1 - self.rank])
            self.shares[name] = shares[self.rank]
        else:
            self.shares[name] = self._recv_share(owner)
            AUDIT["received_shares"].append(name)

    def _send_share(self, peer: int, share) -> None:
        chunks = list(share.share_chunks)
        msgs = [bytes(share.meta), str(len(chunks)).encode()] + [bytes(c) for c in chunks]
        for m in msgs:
            self.lctx.send(peer, m)
            self.share_bytes_sent += len(m)

    def _recv_share(self, peer: int):
        import spu.libspu as libspu

        sh = libspu.Share()
        msgs = [self.lctx.recv(peer), self.lctx.recv(peer)]
        sh.meta = msgs[0]
        sh.share_chunks = [self.lctx.recv(peer) for _ in range(int(msgs[1].decode()))]
        self.share_bytes_recv += sum(len(m) for m in msgs) + sum(len(c) for c in sh.share_chunks)
        return sh

    # ---- one step: set the input shares, run the compiled executable, keep the output shares ----------
    def run(self, exe, inputs: list[str], outputs: list[str]) -> dict:
        for var, name in zip(exe.input_names, inputs):
            self.rt.set_var(var, self.shares[name])
        t0 = time.perf_counter()
        self.rt.run(exe)
        seconds = time.perf_counter() - t0
        for var, name in zip(exe.output_names, outputs):
            self.shares[name] = self.rt.get_var(var)
        for var in list(exe.input_names) + list(exe.output_names):
            self.rt.del_var(var)
        row = {"seconds": seconds}
        if self.tail is not None:
            row.update(self.tail.next_stats().to_dict())
        return row

    def reveal_to(self, name: str, receiver: int):
        """Send this party's share of ``name`` to ``receiver``; the receiver returns the plaintext."""
        peer = 1 - self.rank
        if self.rank != receiver:
            self._send_share(receiver, self.shares[name])
            return None
        other = self._recv_share(peer)
        AUDIT["received_shares"].append(name)
        mine = self.shares[name]
        pair = [mine, other] if self.rank == 0 else [other, mine]
        return np.asarray(self.io.reconstruct(pair))


def share_digest(share) -> str:
    import hashlib
    h = hashlib.sha256(bytes(share.meta))
    for c in share.share_chunks:
        h.update(bytes(c))
    return h.hexdigest()


# Executables already compiled in this process, by what decides them (`_compile_key`): the simulator's two
# party threads, the layers of one model and the prefill/decode programs share their steps' compilations.
_COMPILED: dict[tuple, object] = {}
_COMPILE_LOCK = threading.Lock()


def _compile_key(fn, args: list[np.ndarray], public: tuple[int, ...], copts) -> tuple:
    """The step's jaxpr (ops, shapes, literals), the values of the constants it closes over, which inputs are
    public and the compiler options: equal keys compile to the same executable up to its variable names, which
    `Party.run` maps positionally."""
    import hashlib

    import jax

    closed = jax.make_jaxpr(fn)(*args)
    h = hashlib.sha256(str(closed.jaxpr).encode())
    for c in closed.consts:
        c = np.asarray(c)
        h.update(f"{c.dtype}{c.shape}".encode())
        h.update(np.ascontiguousarray(c).tobytes())
    options = tuple((a, str(getattr(copts, a))) for a in sorted(dir(copts)) if not a.startswith("_"))
    return h.hexdigest(), tuple(sorted(public)), options


def compile_step(fn, arg_shapes: list[tuple], name: str, copts=None, public: tuple[int, ...] = (),
                 exp_iters: int | None = None):
    """Compile one step for SPU; every input is a share named '<step>:in<i>', secret except the indices in
    ``public`` (runtime values both parties know, e.g. a decode step's position). ``exp_iters``: the runtime's
    Taylor exp iterations (`SPUProfile.taylor_exp_iters`); the kernels then write the exp of a small tensor as
    products (`privlm.spu.kernels.exp`: the same function, far fewer bytes under CHEETAH). A step equal to one
    compiled before in this process (`_compile_key`) reuses that executable."""
    import spu.libspu as libspu
    import spu.utils.frontend as spu_fe

    from privlm.spu.kernels import products_for_exp

    copts = copts if copts is not None else libspu.CompilerOptions()
    args = [np.zeros(s, np.float32) for s in arg_shapes]

    def step(*xs):  # a fresh function: JAX's trace cache must not hand back a trace made under another setting
        return fn(*xs)

    with products_for_exp(exp_iters):
        key = (_compile_key(step, args, public, copts), exp_iters)
        with _COMPILE_LOCK:
            if key not in _COMPILED:
                vis = [libspu.Visibility.VIS_PUBLIC if i in public else libspu.Visibility.VIS_SECRET
                       for i in range(len(args))]
                _COMPILED[key], _ = spu_fe.compile(spu_fe.Kind.JAX, step, args, {},
                                                   [f"{name}:in{i}" for i in range(len(args))], vis,
                                                   lambda outs: [f"{name}:out{i}" for i in range(len(outs))],
                                                   copts=copts)
            return _COMPILED[key]


def setup_fn(kernels: dict[str, str]):
    """A function that evaluates one tiny instance of every primitive the forward uses (secret x private
    and secret x secret products, comparison, exp, reciprocal, rsqrt, the profile's kernels), so the
    protocol's one-time and lazily created setup (CHEETAH: OT extension, HE keys, per-primitive OT
    correlations) is paid here and reported as 'setup' instead of being charged to whichever op happens
    to come first. Inputs: a [4, 8] from the client, w [8, 8] from the server."""
    import jax

    from privlm.spu.kernels import kernel

    softmax, gelu, layer_norm = (kernel(op, kernels[op]) for op in ("softmax", "gelu", "layernorm"))

    def fn(a, w):
        x = a @ w
        y = x @ w + (x @ x.T)[:, :1] * 0.1
        return (softmax(y) + layer_norm(y, w[0], w[1], 1e-5) + gelu(y) + jax.nn.gelu(y, approximate=True)
                + jax.nn.softmax(y, axis=-1) + jax.nn.relu(y) * a[:, :1])
    return fn


def plan(program) -> tuple[dict[str, tuple], dict[str, int]]:
    """Shapes of every named tensor (from jax.eval_shape, no data) and the index of each tensor's last use."""
    import jax

    shapes: dict[str, tuple] = dict(program.input_shapes)
    last_use: dict[str, int] = {}
    for i, step in enumerate(program.steps):
        specs = [jax.ShapeDtypeStruct(shapes[n], np.float32) for n in step.inputs]
        outs = jax.eval_shape(step.fn, *specs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for n, o in zip(step.outputs, outs):
            shapes[n] = tuple(o.shape)
        for n in step.inputs:
            last_use[n] = i
    return shapes, last_use


def run_party(rank: int, lctx, program, protocol: str, spu_profile, log_path: Path | None,
              onehots: list[np.ndarray] | None, weights: dict[str, np.ndarray] | None,
              sequences: int = 1) -> dict | None:
    """The whole 2PC forward of ``sequences`` prompts (same T) for one party, in one session (one setup).
    Returns the result dict on the client, None on the server."""
    import spu

    from privlm.spu.program import server_tensors

    t_start = time.perf_counter()
    party = Party(rank, lctx, protocol, log_path, spu_profile)
    shapes, last_use = plan(program)
    copts = spu_profile.compiler_options()
    t0 = time.perf_counter()
    iters = spu_profile.taylor_exp_iters(protocol)
    compiled = {s.name: compile_step(s.fn, [shapes[n] for n in s.inputs], s.name, copts, exp_iters=iters)
                for s in program.steps}
    setup_exe = compile_step(setup_fn(spu_profile.kernels), [(4, 8), (8, 8)], "setup", copts)
    compile_s = time.perf_counter() - t0

    rng = np.random.default_rng(rank)
    party.share_input("setup.a", 0, rng.normal(size=(4, 8)) if rank == 0 else None, (4, 8))
    party.share_input("setup.w", 1, rng.normal(size=(8, 8)) if rank == 1 else None, (8, 8))
    lctx.barrier()
    setup_row = {"name": "setup", "kind": "setup", "census": "fixed", "layer": None, "elements": 0, "flops": 0,
                 **party.run(setup_exe, ["setup.a", "setup.w"], ["setup.out"])}
    party.shares.clear()

    # the server's weights: private to it, made once per session and reused by every sequence
    server = server_tensors(weights, program) if rank == 1 else {}
    for name in program.server_inputs:
        party.share_input(name, 1, server.get(name), shapes[name])
    server.clear()
    weight_shares = {n: party.shares[n] for n in program.server_inputs}

    def moved():  # traffic outside SPU's runs in both directions, as seen by this party
        return party.share_bytes_sent + party.share_bytes_recv

    steps_first: list[dict] = []
    per_sequence: list[dict] = []
    logits_all = []
    first_io = (0, 0)
    t_online = time.perf_counter()
    for k in range(sequences):
        party.shares = dict(weight_shares)
        lctx.barrier()
        t_seq = time.perf_counter()
        before = moved()
        party.share_input("onehot", 0, onehots[k] if rank == 0 else None, shapes["onehot"])
        input_bytes = moved() - before
        rows = [setup_row] if k == 0 else []
        for i, step in enumerate(program.steps):
            row = party.run(compiled[step.name], list(step.inputs), list(step.outputs))
            rows.append({"name": step.name, "kind": step.kind, "census": step.census, "layer": step.layer,
                         "elements": step.elements, "flops": step.flops, **row})
            for n in step.inputs:  # free shares nobody needs any more (weights stay for the next sequence)
                if last_use.get(n) == i and n not in step.outputs and n not in weight_shares:
                    party.shares.pop(n, None)
        before = moved()
        logits = party.reveal_to(program.output, receiver=0)
        output_bytes = moved() - before
        runtime_bytes = sum(r.get("bytes", 0) for r in rows if r["kind"] != "setup")
        per_sequence.append({"bytes_online": runtime_bytes + input_bytes + output_bytes,
                             "seconds": time.perf_counter() - t_seq})
        if k == 0:
            steps_first, first_io = rows, (input_bytes, output_bytes)
        if rank == 0:
            logits_all.append(logits)
    online_s = time.perf_counter() - t_online
    if rank != 0:
        return None
    return {"protocol": protocol, "spu_profile": spu_profile.name, "spu_settings": spu_profile.to_dict(),
            "T": program.T, "spu_version": spu.__version__, "steps": steps_first,
            "sequences": per_sequence, "compile_seconds": compile_s, "online_seconds": online_s,
            "wall_seconds": time.perf_counter() - t_start,
            # traffic outside SPU's runs (first sequence), counted from the messages this code sends: the
            # prompt and the weights are private to their owners, so only the logits' share moves
            "input_share_bytes": first_io[0], "output_share_bytes": first_io[1],
            "logits": logits_all[0] if sequences == 1 else np.stack(logits_all),
            # peak resident memory of this process (both parties in sim mode), Linux reports KiB
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from privlm.proc import adopt_parent

    adopt_parent()  # started by the launcher: die with it
    ap = argparse.ArgumentParser(prog="python -m privlm.spu.party", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, choices=(0, 1))
    ap.add_argument("--sim", action="store_true", help="run both parties as threads over an in-memory link")
    ap.add_argument("--public", required=True, help="program.json of the traced export (public.safetensors beside it)")
    ap.add_argument("--tokens", help="JSON list of token ids, or a list of such lists (client only)")
    ap.add_argument("--weights", help="server.safetensors (server only)")
    ap.add_argument("--delete-weights", action="store_true",
                    help="remove the weights file once loaded (a temporary export of the launcher)")
    ap.add_argument("--T", type=int, help="prompt length (public; the server's only knowledge of the prompt)")
    ap.add_argument("--sequences", type=int, default=1, help="number of prompts (server; public)")
    ap.add_argument("--head", default="last", choices=("all", "last"))
    ap.add_argument("--chunks", type=int, default=1, help="split softmax/activation runs (memory bound)")
    ap.add_argument("--matmul-block", type=int, default=None, help="split products into blocks (memory bound)")
    ap.add_argument("--protocol", default="cheetah", choices=PROTOCOLS)
    ap.add_argument("--spu-profile", default="default", help="SPU profile name (privlm.spu.spu_profile)")
    ap.add_argument("--peers", help="host:port of party 0 and party 1, comma separated (2-process mode)")
    ap.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S,
                    help="seconds to wait for the peer to connect (default %(default)g)")
    ap.add_argument("--out", help="result JSON (client); logits go to the .npy beside it")
    ap.add_argument("--log", required=True, help="SPU system log of this process")
    ap.add_argument("--audit", help="write what this process received and opened here")
    return run_reporting(_run, ap.parse_args(argv))


def run_reporting(run, args) -> int:
    """``run(args)`` of a party process (this one or private generation's) with one stderr line on every failure
    (the launcher shows it); EXIT_PEER when the peer is to blame."""
    name = SIM_NAME if args.sim else party_name(args.rank)
    try:
        return run(args)
    except PeerLost as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        return EXIT_PEER
    except Exception as exc:
        print(f"{name}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 1


def _run(args) -> int:
    sys.addaudithook(_audit_hook)

    import spu.libspu as libspu

    from privlm.spu.program import load_trace, load_weights, one_hot, program_from_trace
    from privlm.spu.spu_profile import load_spu_profile

    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = args.log
    libspu.logging.setup_logging(opts)

    spu_profile = load_spu_profile(args.spu_profile)
    meta, constants = load_trace(Path(args.public).parent)
    AUDIT["loaded"].append(os.path.abspath(args.public))
    roles = (0, 1) if args.sim else (args.rank,)
    onehots = weights = None
    sequences = args.sequences
    if 0 in roles:
        ids = json.loads(Path(args.tokens).read_text())
        AUDIT["loaded"].append(os.path.abspath(args.tokens))
        seqs = ids if ids and isinstance(ids[0], list) else [ids]
        if len({len(s) for s in seqs}) != 1:
            raise ValueError("all sequences must have the same length (T is public and fixed per session)")
        onehots = [one_hot(np.asarray(s), meta["vocab_size"]) for s in seqs]
        AUDIT["plaintext"].append("onehot")
        T, sequences = len(seqs[0]), len(seqs)
    else:
        T = args.T
    if 1 in roles:
        weights = load_weights(args.weights)
        AUDIT["loaded"].append(os.path.abspath(args.weights))
        if args.delete_weights:  # in memory now: the plaintext weights do not stay in a temporary directory
            os.unlink(args.weights)
        AUDIT["plaintext"].extend(sorted(weights))
    # one op graph traced from the torch model (privlm.trace), public constants beside it
    if T != meta["T"]:
        raise ValueError(f"the prompt has {T} tokens; the traced program was exported for T={meta['T']}")
    program = program_from_trace(meta, constants, head=args.head, kernels=spu_profile.kernels, chunks=args.chunks,
                                 matmul_block=args.matmul_block)

    result: dict = {}

    def play(rank: int, lctx) -> None:
        out = run_party(rank, lctx, program, args.protocol, spu_profile, Path(args.log) if rank == 0 else None,
                        onehots if rank == 0 else None, weights if rank == 1 else None, sequences)
        if out is not None:
            result.update(out)
    watch = None
    if args.sim:
        run_ranks(lambda r: play(r, make_link(r, None)), (0, 1))
    else:
        peers = args.peers.split(",")
        lctx, watch = connect(args.rank, peers, args.peer_timeout)
        try:
            play(args.rank, lctx)
        except Exception:  # a send to a peer that is gone fails here before the watch notices
            if watch.peer_gone():
                raise PeerLost(watch.lost_message()) from None
            raise
    if result and args.out:
        out_path = Path(args.out)
        np.save(out_path.with_suffix(".npy"), result.pop("logits"))
        result["mode"] = "sim" if args.sim else "2proc"
        out_path.write_text(json.dumps(result))
    if args.audit:
        Path(args.audit).write_text(json.dumps(AUDIT))
    if watch is not None:
        watch.closing()  # the result is complete: a peer gone while the link shuts down is no failure
        lctx.stop_link()
        watch.disarm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
