"""One party of private text generation with a secret-shared key/value cache (SPU environment: jax + spu).

Two traced programs (`privlm.generate_trace`, each a directory with program.json + public.safetensors, the
server's server.safetensors beside them): ``prefill`` (P prompt tokens -> last logits + every layer's K/V padded
to the capacity C) and ``decode`` (one token at public position t + the cache -> logits + the updated cache).
Each program's steps are compiled once; the decode program serves every position below C.

Per session: setup; the client's one-hot prompt and the server's tensors as colocated shares (nothing crosses
the link); prefill; then for each new token: the token choice, the client's one-hot of that token (its own
secret input, again colocated), the public position inputs (each party makes them locally), the decode step.
The cache outputs stay in each party's runtime as shares between steps: they are never revealed and never
rebuilt from plaintext. What is revealed, to the client only: greedy, the token id chosen by an argmax under
2PC; sampling, the logits of each step (the client samples with its own randomness).

    python -m privlm.spu.generate --sim --export DIR --tokens ids.json --new N --weights-dir DIR --out res.json
    python -m privlm.spu.generate --rank 0 --export DIR --tokens ids.json --new N --peers A,B --out res.json
    python -m privlm.spu.generate --rank 1 --export DIR --weights-dir DIR --P P --new N --peers A,B
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from privlm.spu.party import (AUDIT, PEER_TIMEOUT_S, Party, PeerLost, compile_step, start_audit, connect,
                              make_link, plan, run_ranks, run_reporting, setup_fn)

import numpy as np  # noqa: E402

from privlm.opschema import DECODE, PREFILL  # noqa: E402  (the export's program directories)


def load_programs(export: Path, kernels: dict[str, str]):
    """(prefill Program, decode Program or None) of an export directory; prefill computes the last logits only."""
    from privlm.spu.program import load_trace, program_from_trace

    pre_doc, pre_const = load_trace(export / PREFILL)
    prefill = program_from_trace(pre_doc, pre_const, head="last", kernels=kernels)
    decode = None
    if (export / DECODE).is_dir():
        doc, const = load_trace(export / DECODE)
        decode = program_from_trace(doc, const, head="all", kernels=kernels)
    return prefill, decode


def position_inputs(t: int, C: int) -> dict[str, np.ndarray]:
    """The decode step's public inputs for a token at position t: its one-hot row, its cache slot, the mask."""
    sel = np.zeros((1, C), np.float32)
    sel[0, t] = 1.0
    bias = np.where(np.arange(C) <= t, 0.0, -100.0).astype(np.float32)  # opschema.MASK_VALUE
    return {"input:sel": sel, "input:slot": sel[0].copy(), "input:bias": bias}


def capacity(prefill, decode) -> int:
    """C: the cache positions of the decode program (its ``sel`` input [1, C]); P without one (one new token)."""
    return prefill.T if decode is None else decode.meta["inputs"]["sel"]["shape"][1]


def cache_names(program) -> list[str]:
    """The decode program's secret runtime inputs (the cache), in the order of the prefill's extra outputs."""
    return [f"input:{k}" for k, v in program.meta["inputs"].items() if v["kind"] == "secret"]


def choose(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """The client's sampling from revealed logits (temperature, top-k), with its own randomness."""
    z = np.asarray(logits, np.float64).reshape(-1) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.sort(z)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def tree_argmax(logits):
    """Index of the largest of the last row's logits (the first on ties, as numpy's argmax) by a tournament:
    log2(V) levels of one vectorized comparison + two selects each, so its rounds grow with log2(V). Under SPU
    (CHEETAH, V=2048) it needs about a third of the message flights of `jnp.argmax` (239 vs 768 sends)."""
    import jax.numpy as jnp

    v = logits[-1]
    idx = jnp.arange(v.shape[0], dtype=jnp.int32)  # integers: the selects need no truncation
    while v.shape[0] > 1:
        if v.shape[0] % 2:
            v, idx = jnp.concatenate([v, v[-1:]]), jnp.concatenate([idx, idx[-1:]])
        first = v[0::2] >= v[1::2]
        v, idx = jnp.where(first, v[0::2], v[1::2]), jnp.where(first, idx[0::2], idx[1::2])
    return idx[0]


class _Runner:
    """One party's compiled programs and the loop that runs their steps on its shares."""

    def __init__(self, party: Party, programs: dict, copts):
        self.party, self.programs = party, programs
        self.plans = {k: plan(p) for k, p in programs.items()}
        t0 = time.perf_counter()
        self.compiled = {}
        iters = party.spu_profile.taylor_exp_iters(party.protocol)
        for key, prog in programs.items():
            shapes = self.plans[key][0]
            for s in prog.steps:
                public = tuple(i for i, n in enumerate(s.inputs) if n in prog.public_inputs)
                self.compiled[key, s.name] = compile_step(s.fn, [shapes[n] for n in s.inputs], f"{key}.{s.name}",
                                                          copts, public, exp_iters=iters)
        V = programs[PREFILL].meta["vocab_size"]
        self.argmax = compile_step(tree_argmax, [(1, V)], "argmax", copts)
        self.compile_seconds = time.perf_counter() - t0

    def run(self, key: str, weights: dict, live: dict) -> tuple[list[dict], dict]:
        """Run every step of program ``key`` on this party's shares (its weight shares + ``live``); returns the
        per-step rows and the shares of its outputs (kept, never revealed)."""
        prog, (_, last_use) = self.programs[key], self.plans[key]
        party = self.party
        party.shares = {**weights, **live}
        rows = []
        for i, step in enumerate(prog.steps):
            row = party.run(self.compiled[key, step.name], list(step.inputs), list(step.outputs))
            rows.append({"program": key, "name": step.name, "kind": step.kind, "census": step.census, **row})
            for n in step.inputs:
                if last_use.get(n) == i and n not in step.outputs and n not in weights and n not in prog.outputs:
                    party.shares.pop(n, None)
        outs = {o: party.shares[o] for o in prog.outputs}
        party.shares = {}
        return rows, outs


def share_ring_sample(share, n: int = 256) -> list[int]:
    """The first n ring elements (int64, fixed point with the runtime's fraction bits) of this party's share of a
    secret: its first chunk is a serialized ValueChunkProto, a few bytes of header (< 8) and then the elements
    (SPU 0.9.5, 64-bit field)."""
    raw = bytes(share.share_chunks[0])
    return np.frombuffer(raw[len(raw) % 8:], dtype=np.int64)[:n].tolist()


def _sum(rows: list[dict], key: str):
    return sum(r.get(key, 0) for r in rows)


def run_generation(rank: int, lctx, programs: dict, protocol: str, spu_profile, log_path: Path | None,
                   prompt: list[int] | None, weights: dict | None, P: int, new_tokens: int,
                   sampling: dict | None) -> dict | None:
    """The whole private generation for one party; the result dict on the client, None on the server.
    ``sampling``: None for greedy (argmax under 2PC, the token id revealed to the client), else
    {"temperature", "top_k", "seed"} (the logits revealed to the client, who samples)."""
    import spu

    from privlm.spu.program import one_hot, server_tensors

    t_start = time.perf_counter()
    party = Party(rank, lctx, protocol, log_path, spu_profile)
    prefill, decode = programs[PREFILL], programs.get(DECODE)
    runner = _Runner(party, programs, spu_profile.compiler_options())
    V = prefill.meta["vocab_size"]

    rng_setup = np.random.default_rng(rank)
    party.share_input("setup.a", 0, rng_setup.normal(size=(4, 8)) if rank == 0 else None, (4, 8))
    party.share_input("setup.w", 1, rng_setup.normal(size=(8, 8)) if rank == 1 else None, (8, 8))
    setup_exe = compile_step(setup_fn(spu_profile.kernels), [(4, 8), (8, 8)], "setup",
                             spu_profile.compiler_options())
    lctx.barrier()
    setup_row = party.run(setup_exe, ["setup.a", "setup.w"], ["setup.out"])

    # the server's tensors of each program: private to it, colocated shares made once per session
    weight_shares: dict[str, dict] = {}
    for key, prog in programs.items():
        server = server_tensors(weights[key], prog) if rank == 1 else {}
        shapes = runner.plans[key][0]
        party.shares = {}
        for name in prog.server_inputs:
            party.share_input(name, 1, server.get(name), shapes[name])
        weight_shares[key] = dict(party.shares)
        server.clear()
    if weights is not None:
        weights.clear()

    def moved():
        return party.share_bytes_sent + party.share_bytes_recv

    rng = np.random.default_rng(sampling["seed"]) if sampling is not None and rank == 0 else None
    tokens: list[int] = []
    per_token: list[dict] = []
    lctx.barrier()
    t_online = time.perf_counter()
    cache = None
    for j in range(new_tokens):
        t0 = time.perf_counter()
        before = moved()
        party.shares = {}
        if j == 0:
            party.share_input("onehot", 0, one_hot(np.asarray(prompt), V) if rank == 0 else None, (P, V))
            rows, outs = runner.run(PREFILL, weight_shares[PREFILL], {"onehot": party.shares["onehot"]})
            names = prefill.outputs
        else:
            t = P + j - 1  # the previous token's position: it is fed back and written into the cache
            party.share_input("onehot", 0, one_hot(np.asarray([tokens[-1]]), V) if rank == 0 else None, (1, V))
            live = {"onehot": party.shares["onehot"], **cache}
            for name, value in position_inputs(t, decode.meta["inputs"]["sel"]["shape"][1]).items():
                party.share_public(name, value)
                live[name] = party.shares[name]
            rows, outs = runner.run(DECODE, weight_shares[DECODE], live)
            names = decode.outputs
        logits_share = outs[names[0]]
        if decode is not None:  # the cache: the program's outputs become the next decode step's inputs, as shares
            cache = dict(zip(cache_names(decode), [outs[n] for n in names[1:]]))
        party.shares = {"logits": logits_share}
        if sampling is None:
            rows.append({"program": "choose", "name": "argmax", "kind": "argmax", "census": "argmax",
                         **party.run(runner.argmax, ["logits"], ["token"])})
            revealed = party.reveal_to("token", receiver=0)
            token = int(round(float(np.asarray(revealed).reshape(-1)[0]))) if rank == 0 else None
        else:
            revealed = party.reveal_to("logits", receiver=0)
            token = choose(revealed, sampling["temperature"], sampling["top_k"], rng) if rank == 0 else None
        party.shares = {}
        tokens.append(token)
        per_token.append({"index": j, "position": P + j - 1 if j else P - 1, "token": token,
                          "program": PREFILL if j == 0 else DECODE,
                          "bytes": _sum(rows, "bytes") + moved() - before, "messages": _sum(rows, "messages"),
                          "send_actions": _sum(rows, "send_actions"), "online_seconds": time.perf_counter() - t0,
                          "reveal_bytes": moved() - before, "steps": rows})
    online_s = time.perf_counter() - t_online
    if cache is not None:  # the audit: what this party holds of the cache (ring elements of its share, a sample)
        AUDIT["cache_share_sample"] = {name: share_ring_sample(share) for name, share in cache.items()}
    if rank != 0:
        return None
    return {"protocol": protocol, "spu_profile": spu_profile.name, "spu_settings": spu_profile.to_dict(),
            "spu_version": spu.__version__, "P": P, "C": capacity(prefill, decode), "new_tokens": tokens,
            "greedy": sampling is None, "setup": setup_row, "per_token": per_token,
            "compile_seconds": runner.compile_seconds, "online_seconds": online_s,
            "wall_seconds": time.perf_counter() - t_start}


def main(argv: list[str] | None = None) -> int:
    from privlm.proc import adopt_parent

    adopt_parent()
    ap = argparse.ArgumentParser(prog="python -m privlm.spu.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, choices=(0, 1))
    ap.add_argument("--sim", action="store_true")
    ap.add_argument("--export", required=True, help="directory with prefill/ and decode/ (public files)")
    ap.add_argument("--weights-dir", help="directory with prefill/ and decode/ server.safetensors (server only)")
    ap.add_argument("--delete-weights", action="store_true")
    ap.add_argument("--tokens", help="JSON list of prompt token ids (client only)")
    ap.add_argument("--P", type=int, help="prompt length (server; public)")
    ap.add_argument("--new", type=int, required=True, help="new tokens (public)")
    ap.add_argument("--sample", help="TEMPERATURE,TOP_K,SEED (client; default greedy under 2PC)")
    ap.add_argument("--reveal-logits", action="store_true",
                    help="sampling: reveal each step's logits to the client (both parties; public)")
    ap.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    ap.add_argument("--spu-profile", default="default")
    ap.add_argument("--peers")
    ap.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S)
    ap.add_argument("--out")
    ap.add_argument("--log", required=True)
    ap.add_argument("--audit")
    return run_reporting(_run, ap.parse_args(argv))


def _run(args) -> int:
    start_audit()
    import spu.libspu as libspu

    from privlm.spu.program import load_weights
    from privlm.spu.spu_profile import load_spu_profile

    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = args.log
    libspu.logging.setup_logging(opts)
    spu_profile = load_spu_profile(args.spu_profile)
    export = Path(args.export)
    prefill, decode = load_programs(export, spu_profile.kernels)
    programs = {PREFILL: prefill, **({DECODE: decode} if decode is not None else {})}
    AUDIT["loaded"].append(os.path.abspath(export))
    roles = (0, 1) if args.sim else (args.rank,)
    prompt = weights = sampling = None
    P = args.P
    if 0 in roles:
        prompt = json.loads(Path(args.tokens).read_text())
        AUDIT["loaded"].append(os.path.abspath(args.tokens))
        AUDIT["plaintext"].append("onehot")
        P = len(prompt)
        if args.sample:
            temp, top_k, seed = args.sample.split(",")
            sampling = {"temperature": float(temp), "top_k": int(top_k) if top_k else None, "seed": int(seed)}
    if P != prefill.T:
        raise ValueError(f"the prompt has {P} tokens; the prefill program was traced for {prefill.T}")
    if args.new > capacity(prefill, decode) - P + 1:
        raise ValueError(f"{args.new} new tokens need a cache of {P + args.new - 1} positions; the decode program "
                         f"holds {capacity(prefill, decode)}")
    if 1 in roles:
        from privlm.opschema import SERVER_FILE

        wdir = Path(args.weights_dir)
        weights = {}
        for key in programs:
            weights[key] = load_weights(wdir / key / SERVER_FILE)
            AUDIT["loaded"].append(os.path.abspath(wdir / key / SERVER_FILE))
            if args.delete_weights:
                os.unlink(wdir / key / SERVER_FILE)
            AUDIT["plaintext"].extend(f"{key}/{k}" for k in sorted(weights[key]))

    result: dict = {}
    reveal = args.reveal_logits or bool(args.sample)
    if 0 in roles and reveal != bool(args.sample):
        raise ValueError("--reveal-logits needs --sample on the client")

    def play(rank: int, lctx) -> None:
        out = run_generation(rank, lctx, programs, args.protocol, spu_profile, Path(args.log) if rank == 0 else None,
                             prompt if rank == 0 else None, weights if rank == 1 else None, P, args.new,
                             sampling if rank == 0 else ({} if reveal else None))
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
        except Exception:
            if watch.peer_gone():
                raise PeerLost(watch.lost_message()) from None
            raise
    if result and args.out:
        result["mode"] = "sim" if args.sim else "2proc"
        Path(args.out).write_text(json.dumps(result))
    if args.audit:
        Path(args.audit).write_text(json.dumps(AUDIT))
    if watch is not None:
        watch.closing()
        lctx.stop_link()
        watch.disarm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
