"""Per-op micro-benchmarks under SPU (runs in the SPU environment): bytes, messages and seconds of one op.

    python -m privlm.spu.microbench --cases cases.json --out rows.json --log spu.log [--protocol cheetah]

cases.json is a list of {"op": ..., "shape": {...}}; each op is the very function the private forward
runs (`privlm.spu.program`), on random secret inputs: the activation from the client, weights from the
server. Both parties run as threads over an in-memory link (SPU's link counters are the same as over brpc),
or, with ``--rank R --peers A,B``, each party in its own process over brpc (used with the delay proxy).
After the protocol's one-time setup, every case runs ``repeats`` times and each run is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def case_fn(op: str, shape: dict):
    """(fn, [(shape, owner), ...], elements, calls, flops) for one benchmark case."""
    import jax.numpy as jnp

    from privlm.spu import program as P

    if op == "softmax":
        H, T = shape["H"], shape["T"]
        return P.softmax, [((H, T, T), 0)], H * T * T, H, 0
    if op == "layernorm":
        T, d = shape["T"], shape["d"]
        return (lambda x, g, b: P.layer_norm(x, g, b, 1e-5)), [((T, d), 0), ((d,), 1), ((d,), 1)], T * d, 1, 0
    if op in ("gelu", "relu", "leaky_relu"):
        T, w = shape["T"], shape["w"]
        return P.activation_fn(op, 0.01 if op == "leaky_relu" else None), [((T, w), 0)], T * w, 1, 0
    if op == "linear":  # x @ W + b: FFN and attention projections, and with (T, V, d) the embedding/head
        T, i, o = shape["T"], shape["din"], shape["dout"]
        return (lambda x, w: x @ w), [((T, i), 0), ((i, o), 1)], 0, 1, 2 * T * i * o
    if op == "scores":  # q k^T and a v over H heads: both operands are secret activations
        H, T, dk = shape["H"], shape["T"], shape["dk"]
        return (lambda q, k: jnp.einsum("htd,hsd->hts", q, k)), [((H, T, dk), 0), ((H, T, dk), 0)], 0, 1, \
            2 * H * T * T * dk
    raise ValueError(f"unknown micro-benchmark op '{op}'")


def run(cases: list[dict], protocol: str, log: Path, repeats: int, rank: int | None = None,
        peers: list[str] | None = None) -> list[dict]:
    """Both parties as threads (rank None), or this process's party over brpc to ``peers``."""
    from privlm.spu.party import Party, _setup_fn, compile_step, make_link, run_ranks

    compiled = []
    for i, c in enumerate(cases):
        fn, ins, elements, calls, flops = case_fn(c["op"], c["shape"])
        compiled.append((c, compile_step(fn, [s for s, _ in ins], f"case{i}"), ins, elements, calls, flops))
    setup = compile_step(_setup_fn, [(4, 8), (8, 8)], "setup")
    rows: list[dict] = []

    def party(rank: int) -> None:
        lctx = make_link(rank, peers)
        p = Party(rank, lctx, protocol, log if rank == 0 else None)
        rng = np.random.default_rng(rank)
        p.share_input("a", 0, rng.normal(size=(4, 8)) if rank == 0 else None)
        p.share_input("w", 1, rng.normal(size=(8, 8)) if rank == 1 else None)
        st = p.run(setup, ["a", "w"], ["o"])
        if rank == 0:
            rows.append({"op": "setup", "shape": {}, "elements": 0, "calls": 1, "flops": 0, **st})
        for c, exe, ins, elements, calls, flops in compiled:
            names = []
            for j, (shape, owner) in enumerate(ins):
                # logits-like inputs: N(0, 2); gains near 1 keep LayerNorm in its usual range
                val = rng.normal(0, 2.0, size=shape) if j == 0 else rng.normal(1.0, 0.1, size=shape)
                p.share_input(f"in{j}", owner, val if rank == owner else None)
                names.append(f"in{j}")
            for _ in range(c.get("repeats", repeats)):
                st = p.run(exe, names, ["out"])
                if rank == 0:
                    rows.append({"op": c["op"], "shape": c["shape"], "elements": elements, "calls": calls,
                                 "flops": flops, **st})
            p.shares.clear()
        if peers is not None:
            lctx.stop_link()

    run_ranks(party, (0, 1) if rank is None else (rank,))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m privlm.spu.microbench")
    ap.add_argument("--cases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rank", type=int, choices=(0, 1), help="run only this party, over brpc to --peers")
    ap.add_argument("--peers", help="host:port of party 0 and party 1, as this party should reach them")
    args = ap.parse_args(argv)
    import spu
    import spu.libspu as libspu

    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = args.log
    libspu.logging.setup_logging(opts)
    rows = run(json.loads(Path(args.cases).read_text()), args.protocol, Path(args.log), args.repeats, args.rank,
               args.peers.split(",") if args.peers else None)
    if args.rank == 1:
        return 0
    Path(args.out).write_text(json.dumps({"spu_version": spu.__version__, "protocol": args.protocol,
                                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
