"""Per-op micro-benchmarks under SPU (runs in the SPU environment): bytes, messages and seconds of one op.

    python -m privlm.spu.microbench --cases cases.json --out rows.json --log spu.log [--protocol cheetah]

cases.json is a list of {"op": ..., "shape": {...}}; each op is the very kernel the private forward
runs under the chosen SPU profile (`privlm.spu.kernels`), on random inputs held as in the forward pass:
activations secret-shared, weights (and LayerNorm gains) private to the server. Both parties run as threads over an in-memory link (SPU's link counters are the same as over brpc),
or, with ``--rank R --peers A,B``, each party in its own process over brpc (used with the delay proxy).
After the protocol's one-time setup, every case runs ``repeats`` times and each run is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from privlm.opschema import ACTIVATION_OPS


SECRET, SERVER = "secret", 1  # how a case input is held: secret-shared activation, or private to the server


def case_fn(op: str, shape: dict, kernels: dict[str, str]):
    """(fn, [(shape, holder), ...], elements, calls, flops) for one benchmark case."""
    import jax.numpy as jnp

    from privlm.spu import program as P
    from privlm.spu.kernels import DEFAULT_KERNELS, kernel

    if op == "softmax":
        H, T = shape["H"], shape["T"]
        return kernel("softmax", kernels["softmax"]), [((H, T, T), SECRET)], H * T * T, H, 0
    if op == "layernorm":
        T, d = shape["T"], shape["d"]
        ln = kernel("layernorm", kernels["layernorm"])
        return (lambda x, g, b: ln(x, g, b, 1e-5)), [((T, d), SECRET), ((d,), SERVER), ((d,), SERVER)], T * d, 1, 0
    if op == "rmsnorm":
        T, d = shape["T"], shape["d"]
        rms = kernel("rmsnorm", kernels.get("rmsnorm", DEFAULT_KERNELS["rmsnorm"]))
        return (lambda x, g: rms(x, g, 1e-6)), [((T, d), SECRET), ((d,), SERVER)], T * d, 1, 0
    if op in ("silu", "gate_product"):
        T, w = shape["T"], shape["w"]
        fn = kernel(op, kernels.get(op, DEFAULT_KERNELS[op]))
        return fn, [((T, w), SECRET)] * (2 if op == "gate_product" else 1), T * w, 1, 0
    if op == "rotary":  # x·cos + rotate_half(x)·sin, cos/sin public (compiled in), as the traced program runs it
        T, w = shape["T"], shape["w"]
        ang = np.arange(T)[:, None] * (1e-4 ** (np.arange(w // 2) / (w // 2)))[None]
        cos, sin = (np.concatenate([f(ang)] * 2, axis=-1).astype(np.float32) for f in (np.cos, np.sin))

        def rotary(x):
            half = jnp.concatenate([-x[:, w // 2:], x[:, :w // 2]], axis=-1)
            return x * cos + half * sin
        return rotary, [((T, w), SECRET)], T * w, 1, 0
    if op in ACTIVATION_OPS:
        T, w = shape["T"], shape["w"]
        act = P.activation_fn(op, kernels)
        return act, [((T, w), SECRET)], T * w, 1, 0
    if op == "linear":  # x @ W: FFN and attention projections, and with (T, V, d) the embedding/head
        T, i, o = shape["T"], shape["din"], shape["dout"]
        return (lambda x, w: x @ w), [((T, i), SECRET), ((i, o), SERVER)], 0, 1, 2 * T * i * o
    if op == "scores":  # q k^T and a v over H heads: both operands are secret activations
        H, T, dk = shape["H"], shape["T"], shape["dk"]
        return (lambda q, k: jnp.einsum("htd,hsd->hts", q, k)), [((H, T, dk), SECRET), ((H, T, dk), SECRET)], \
            0, 1, 2 * H * T * T * dk
    raise ValueError(f"unknown micro-benchmark op '{op}'")


def run(cases: list[dict], protocol: str, log: Path, repeats: int, rank: int | None = None,
        peers: list[str] | None = None, spu_profile: str = "default") -> list[dict]:
    """Both parties as threads (rank None), or this process's party over brpc to ``peers``."""
    from privlm.spu.party import Party, compile_step, make_link, run_ranks, setup_fn
    from privlm.spu.spu_profile import load_spu_profile

    prof = load_spu_profile(spu_profile)
    copts = prof.compiler_options()
    compiled = []
    for i, c in enumerate(cases):
        fn, ins, elements, calls, flops = case_fn(c["op"], c["shape"], prof.kernels)
        compiled.append((c, compile_step(fn, [s for s, _ in ins], f"case{i}", copts), ins, elements, calls, flops))
    setup = compile_step(setup_fn(prof.kernels), [(4, 8), (8, 8)], "setup", copts)
    rows: list[dict] = []

    def party(rank: int) -> None:
        lctx = make_link(rank, peers)
        p = Party(rank, lctx, protocol, log if rank == 0 else None, prof)
        rng = np.random.default_rng(rank)
        p.share_input("a", 0, rng.normal(size=(4, 8)) if rank == 0 else None, (4, 8))
        p.share_input("w", 1, rng.normal(size=(8, 8)) if rank == 1 else None, (8, 8))
        st = p.run(setup, ["a", "w"], ["o"])
        if rank == 0:
            rows.append({"op": "setup", "shape": {}, "elements": 0, "calls": 1, "flops": 0, **st})
        for c, exe, ins, elements, calls, flops in compiled:
            names = []
            for j, (shape, holder) in enumerate(ins):
                # logits-like inputs: N(0, 2); gains near 1 keep LayerNorm in its usual range
                val = rng.normal(0, 2.0, size=shape) if j == 0 else rng.normal(1.0, 0.1, size=shape)
                if holder == SECRET:  # the client deals it: any dealer gives the same runtime traffic
                    p.share_secret(f"in{j}", 0, val if rank == 0 else None)
                else:
                    p.share_input(f"in{j}", holder, val if rank == holder else None, shape)
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
    ap.add_argument("--spu-profile", default="default")
    args = ap.parse_args(argv)
    from privlm.proc import adopt_parent

    adopt_parent()  # started by the calibration (`privlm.proc.spawn`): die with it
    import spu
    import spu.libspu as libspu

    opts = libspu.logging.LogOptions()
    opts.enable_console_logger = False
    opts.system_log_path = args.log
    libspu.logging.setup_logging(opts)
    rows = run(json.loads(Path(args.cases).read_text()), args.protocol, Path(args.log), args.repeats, args.rank,
               args.peers.split(",") if args.peers else None, args.spu_profile)
    if args.rank == 1:
        return 0
    Path(args.out).write_text(json.dumps({"spu_version": spu.__version__, "protocol": args.protocol,
                                          "spu_profile": args.spu_profile, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
