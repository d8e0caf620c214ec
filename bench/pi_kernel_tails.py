"""Rare large errors of the SPU kernels: each kernel of a profile over many independent 2PC runs.

    .venv-spu/bin/python bench/pi_kernel_tails.py --reps 6                     # every shipped profile
    .venv-spu/bin/python bench/pi_kernel_tails.py --reps 12 --variants puma+enable_mul_lsb_error

A kernel test (tests/test_pi_spu_kernels.py) runs each kernel once on 2^16 elements; this script runs 2^18 per run. A protocol setting that
now and then errs by orders of magnitude needs more runs to show: this script runs `privlm.spu.kernels.
measure_errors` with ``--reps`` different seeds per profile and counts, per op, the elements beyond the
kernel's bound and the runs that had any. It is how `enable_mul_lsb_error` was found to be unfit for the puma
profile (docs/pi-measured.md, "Why not enable_mul_lsb_error"). Writes bench/results/pi_kernel_tails.json,
replacing the rows of the variants it ran.
Runs in the SPU environment (`make spu-setup`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from privlm.fileio import atomic_write_text
from privlm.hostinfo import describe_host
from privlm.spu.kernels import measure_errors
from privlm.spu.spu_profile import available_spu_profiles, load_spu_profile

RESULTS = Path(__file__).resolve().parent / "results" / "pi_kernel_tails.json"
LSB_ERROR = {"cheetah_2pc_config": {"enable_mul_lsb_error": True}}
LSB_VARIANT = "puma+enable_mul_lsb_error"


def all_variants() -> dict[str, object]:
    out = {name: load_spu_profile(name) for name in available_spu_profiles()}
    bb = out["puma"]
    out[LSB_VARIANT] = dataclasses.replace(bb, runtime={**bb.runtime, **LSB_ERROR})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6, help="independent 2PC runs (seeds) per profile")
    ap.add_argument("--variants", nargs="+", default=available_spu_profiles(),
                    help=f"SPU profiles to run (default: every shipped one), or {LSB_VARIANT}")
    args = ap.parse_args()
    known = all_variants()
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(known)}")
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    rows = [r for r in old if r["variant"] not in args.variants]
    for label in args.variants:
        prof = known[label]
        acc: dict[str, dict] = {}
        t0 = time.perf_counter()
        for seed in range(args.reps):
            for op, r in measure_errors(prof, seed=seed, elements=1 << 18).items():
                a = acc.setdefault(op, {"variant": label, "runtime": prof.to_dict()["runtime"], "op": op,
                                        "kernel": r["kernel"], "bound": r["bound"], "runs": 0, "elements": 0,
                                        "max_abs_err": 0.0, "beyond_bound": 0, "runs_beyond_bound": 0})
                a["runs"] += 1
                a["runs_beyond_bound"] += int(r["beyond_bound"] > 0)
                a["elements"] += r["elements"]
                a["max_abs_err"] = max(a["max_abs_err"], r["max_abs_err"])
                a["beyond_bound"] += r["beyond_bound"]
            elapsed = time.perf_counter() - t0
            print(f"{label}: run {seed + 1} of {args.reps} done, {elapsed:.0f} s, about "
                  f"{elapsed / (seed + 1) * (args.reps - seed - 1):.0f} s to go for this variant", flush=True)
        for a in acc.values():
            a["seconds_all_ops"] = time.perf_counter() - t0
            rows.append(a)
            print(f"{label:<32} {a['op']:<10} {a['kernel']:<10} {a['elements']:>10,} elements  max err "
                  f"{a['max_abs_err']:.3g}  beyond bound {a['beyond_bound']:,} in {a['runs_beyond_bound']} of {a['runs']} runs",
                  flush=True)
    atomic_write_text(RESULTS, json.dumps({"format": "privlm-pi-kernel-tails/1", "machine": describe_host(),
                                           "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
