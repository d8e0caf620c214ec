"""`privlm pi calibrate` (measured cost profile) and `privlm pi measure` (GPT-2-size cost from one layer).

calibrate: micro-benchmarks every op type at several sizes under SPU (`privlm.spu.microbench`), fits
``bytes = per_element·elements + per_call·calls`` for each nonlinear op and ``bytes = per_gflop·GFLOPs``
for each linear kind (seconds alike), reports how linear the data are, and writes a cost profile in the
format of docs/pi-cost.md (``privlm-pi-cost-profile/1``), by default ``spu-cheetah-measured``.

measure: all L blocks of a model cost the same, so one full-width block (plus embedding and head at a slice of the
vocabulary) is run under 2PC and the per-block steps are scaled by L / layers_measured, the embedding and head by
V / vocab_measured (`scale_of`). The model is a privlm preset or a Hugging Face config (a LLaMA-family 1.1 B
model is measured from its config.json without ever holding 1.1 B parameters).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from privlm.errors import PrivlmError
from privlm.fileio import atomic_write_text
from privlm.hostinfo import describe_host
from privlm.opschema import CALIBRATED_OPS, COST_PROFILE_FORMAT
from privlm.proc import private_tempdir
from privlm.spu.spu_profile import cost_profile_name  # noqa: F401  (re-exported: bench/pi_measure.py, spu.cli)

FM64_SHARE_BYTES = 8  # one 64-bit ring element per share

# (op, shapes): the full grid spans small privlm models up to GPT-2's T=128 (elementwise ops in pieces of at
# most 128 x 1024 elements, as `privlm pi measure` runs them)
FULL_GRID: dict[str, list[dict]] = {
    "softmax": [{"H": 2, "T": 16}, {"H": 4, "T": 32}, {"H": 4, "T": 64}, {"H": 8, "T": 64}, {"H": 2, "T": 128},
                {"H": 4, "T": 128}],
    "layernorm": [{"T": 16, "d": 64}, {"T": 32, "d": 128}, {"T": 64, "d": 128}, {"T": 64, "d": 256},
                  {"T": 128, "d": 768}],
    "gelu": [{"T": 16, "w": 256}, {"T": 32, "w": 512}, {"T": 64, "w": 512}, {"T": 64, "w": 1024},
             {"T": 128, "w": 1024}],
    "relu": [{"T": 16, "w": 256}, {"T": 32, "w": 512}, {"T": 64, "w": 512}, {"T": 64, "w": 1024},
             {"T": 128, "w": 1024}],
    "leaky_relu": [{"T": 16, "w": 256}, {"T": 64, "w": 512}],
    "rmsnorm": [{"T": 16, "d": 64}, {"T": 64, "d": 128}, {"T": 128, "d": 768}],
    "silu": [{"T": 16, "w": 256}, {"T": 64, "w": 512}, {"T": 128, "w": 1024}],
    "gate_product": [{"T": 16, "w": 256}, {"T": 64, "w": 512}, {"T": 128, "w": 1024}],
    "rotary": [{"T": 16, "w": 128}, {"T": 64, "w": 512}, {"T": 128, "w": 1024}],
    # linear layers at GPT-2 width (T=128) in the 768-feature blocks `privlm pi measure` runs (one unblocked
    # [128x768]x[768x3072] secret product needs ~17 GB with both parties on one host). CHEETAH's matmul
    # traffic is not proportional to FLOPs (it grows with the output, and small products cost about one
    # ciphertext batch), so the per-GFLOP costs are taken where the profile is meant to predict.
    "linear": [{"T": 128, "din": 768, "dout": 768}, {"T": 128, "din": 768, "dout": 384},
               {"T": 128, "din": 384, "dout": 768}],
    "scores": [{"H": 12, "T": 128, "dk": 64}],
}
# CI-sized: the shapes of a tiny test model (d=32, 2 heads, T<=16), seconds instead of minutes
QUICK_GRID: dict[str, list[dict]] = {
    "softmax": [{"H": 2, "T": 8}, {"H": 2, "T": 16}, {"H": 4, "T": 16}],
    "layernorm": [{"T": 8, "d": 32}, {"T": 16, "d": 32}, {"T": 16, "d": 64}],
    "gelu": [{"T": 8, "w": 128}, {"T": 16, "w": 128}, {"T": 16, "w": 256}],
    "relu": [{"T": 8, "w": 128}, {"T": 16, "w": 256}],
    "rmsnorm": [{"T": 8, "d": 32}, {"T": 16, "d": 32}, {"T": 16, "d": 64}],
    "silu": [{"T": 8, "w": 128}, {"T": 16, "w": 128}, {"T": 16, "w": 256}],
    "gate_product": [{"T": 8, "w": 128}, {"T": 16, "w": 256}],
    "rotary": [{"T": 8, "w": 64}, {"T": 16, "w": 128}],
    "linear": [{"T": 8, "din": 32, "dout": 96}, {"T": 16, "din": 32, "dout": 128}],
    "scores": [{"H": 2, "T": 8, "dk": 16}, {"H": 2, "T": 16, "dk": 16}],
    "embed": [{"T": 8, "din": 64, "dout": 32}, {"T": 16, "din": 64, "dout": 32}],
}


def register(sub) -> None:
    from privlm.errors import MAX_T, MAX_VOCAB, bounded_float, bounded_int
    from privlm.spu.spu_profile import add_spu_profile_arg
    c = sub.add_parser("calibrate", help="measure per-op SPU costs and write a cost profile")
    c.add_argument("--out", help="profile path (default $PRIVLM_HOME/profiles/<name>.json, PRIVLM_HOME "
                                 "defaulting to ~/.privlm; a profile there shadows a shipped one of the same name)")
    c.add_argument("--name", default=None,
                   help="profile name (default spu-cheetah-measured for --spu-profile default, "
                        "spu-<profile>-measured otherwise)")
    c.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    add_spu_profile_arg(c)
    c.add_argument("--quick", action="store_true", help="small shapes only (tiny models, CI)")
    c.add_argument("--force", action="store_true", help="overwrite an existing profile")
    c.add_argument("--rounds-delay-ms", type=bounded_float(0, 60000), default=None,
                   help="also count rounds per op: rerun one shape per op with this one-way delay through a "
                        "user-space proxy (default 40 for the full grid, 0 = skip; --quick skips)")
    c.add_argument("--ops", default=None, metavar="OP[,OP...]",
                   help="measure only these nonlinear ops and merge them into the existing profile (its other "
                        f"entries kept, --force implied); ops: {', '.join(CALIBRATED_OPS)}")
    c.add_argument("--rounds-only", action="store_true",
                   help="measure only the rounds per op (CHEETAH; with --ops, of those ops) and merge them into the "
                        "existing profile, its bytes and seconds kept")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("measure", help="2PC cost of a full-size model from one measured layer")
    m.add_argument("preset", help="a privlm preset (with key=value overrides), or a Hugging Face model: a directory "
                                  "with its config.json or hf:<id> (only the measured blocks and vocabulary slice "
                                  "are built, with random weights: the bytes depend on the shapes only)")
    m.add_argument("overrides", nargs="*", metavar="key=value")
    m.add_argument("--T", type=bounded_int(1, MAX_T), default=128)
    m.add_argument("--layers-measured", type=bounded_int(1, 4096), default=1)
    m.add_argument("--vocab-measured", type=bounded_int(1, MAX_VOCAB), default=4096,
                   help="run embedding and head at this vocabulary and scale linearly to the model's")
    m.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    add_spu_profile_arg(m)
    m.add_argument("--chunks", type=bounded_int(1, 4096), default=4,
                   help="softmax/activation runs per op (bounds memory: one GPT-2 layer in one piece needs ~20 GB)")
    m.add_argument("--matmul-block", type=bounded_int(0, 2**20), default=768,
                   help="split products into blocks of at most this many features (memory; 0 = no split)")
    m.add_argument("--out", help="write the JSON result here too")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_measure)


# --------------------------------------------------------------------------------------------------
def machine() -> str:
    return f"{describe_host()}; both parties on this host (loopback / in-memory link)"


def grid_cases(grid: dict[str, list[dict]]) -> list[dict]:
    cases = []
    for op, shapes in grid.items():
        for s in shapes:
            cases.append({"op": "linear" if op == "embed" else op, "shape": dict(s), "kind": op})
    return cases


def run_microbench(cases: list[dict], protocol: str, work: Path, spu_profile: str = "default") -> dict:
    from privlm.spu.launcher import spu_module

    (work / "cases.json").write_text(json.dumps(cases))
    spu_module("privlm.spu.microbench", ["--cases", str(work / "cases.json"), "--out", str(work / "rows.json"),
                                         "--log", str(work / "spu.log"), "--protocol", protocol,
                                         "--spu-profile", spu_profile], work)
    out = json.loads((work / "rows.json").read_text())
    # the SPU side does not know which linear rows are embedding-shaped: tag them back
    linear_kinds = [c["kind"] for c in cases]
    it = iter(linear_kinds)
    for r in out["rows"]:
        r["kind"] = "setup" if r["op"] == "setup" else next(it)
    return out


def run_microbench_2proc(cases: list[dict], protocol: str, work: Path, delay_ms: float,
                         spu_profile: str = "default") -> list[dict]:
    """The cases with each party in its own process over brpc; with delay_ms > 0 each party reaches the
    other through `privlm.spu.delayproxy`, so every message flight is delayed by delay_ms."""
    import subprocess
    import sys

    from privlm.proc import spawn, stop
    from privlm.spu.launcher import SPUError, free_ports, start_spu, supervise

    work.mkdir(parents=True, exist_ok=True)
    (work / "cases.json").write_text(json.dumps(cases))
    p0, p1, x0, x1 = free_ports(4)
    daemons = {}
    if delay_ms > 0:
        peers = {0: [f"127.0.0.1:{p0}", f"127.0.0.1:{x1}"], 1: [f"127.0.0.1:{x0}", f"127.0.0.1:{p1}"]}
        proxy = spawn([sys.executable, "-m", "privlm.spu.delayproxy", str(delay_ms), f"{x0}:{p0}", f"{x1}:{p1}"],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proxy.stdout.readline().strip() != "ready":
            stop([proxy])
            raise SPUError(f"the delay proxy did not start: {proxy.stderr.read().strip()[-200:]}")
        daemons["the delay proxy"] = (proxy, work / "-")
    else:
        peers = {r: [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"] for r in (0, 1)}
    procs = {}
    try:
        for r in (1, 0):
            err = work / f"spu{r}.stderr"
            procs[f"microbench party {r}"] = (start_spu(
                "privlm.spu.microbench", ["--cases", str(work / "cases.json"), "--out", str(work / "rows.json"),
                                          "--log", str(work / f"spu{r}.log"), "--protocol", protocol, "--rank", str(r),
                                          "--peers", ",".join(peers[r]), "--spu-profile", spu_profile], err), err)
    except BaseException:
        stop(p for p, _ in [*procs.values(), *daemons.values()])
        raise
    supervise(procs, daemons=daemons)  # the first to fail stops the other; none outlives this process
    return json.loads((work / "rows.json").read_text())["rows"]


def measure_rounds(cases: list[dict], protocol: str, work: Path, delay_ms: float, repeats: int = 3,
                   spu_profile: str = "default") -> list[dict]:
    """Rounds of each case from its latency sensitivity: (t(delay) - t(0)) / delay, i.e. the number of
    sequential one-way message flights. For SEMI2K this should equal party 0's send actions. Each case
    runs ``repeats`` times and the fastest run counts, which removes most noise of a shared CPU."""
    cases = [{**c, "repeats": repeats} for c in cases]

    def fastest(rows: list[dict]) -> list[dict]:
        i = sum(1 for r in rows if r["op"] == "setup")  # the setups (one per ring) run once
        out = rows[:i]
        while i < len(rows):
            group = rows[i:i + repeats]
            out.append(min(group, key=lambda r: r["seconds"]))
            i += repeats
        return out
    base = fastest(run_microbench_2proc(cases, protocol, work / "d0", 0.0, spu_profile))
    slow = fastest(run_microbench_2proc(cases, protocol, work / f"d{delay_ms:g}", delay_ms, spu_profile))
    out = []
    for a, b in zip(base, slow):
        rounds = max(0.0, (b["seconds"] - a["seconds"]) / (delay_ms / 1000.0))
        out.append({"op": a["op"], "shape": a["shape"], "calls": a["calls"], "seconds_0": a["seconds"],
                    "seconds_delay": b["seconds"], "delay_ms": delay_ms, "rounds": rounds,
                    "send_actions": a["send_actions"], "bytes": a["bytes"]})
    return out


def nnls2(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """min ||(a·x1 + b·x2 - y)/y|| over a, b >= 0 (relative errors: small and large shapes weigh alike)."""
    w = 1.0 / np.maximum(y, 1e-12)
    A = np.stack([x1 * w, x2 * w], 1)
    t = y * w
    best = None
    for cols in ((0, 1), (0,), (1,)):
        sol, *_ = np.linalg.lstsq(A[:, cols], t, rcond=None)
        if np.all(sol >= 0):
            coef = np.zeros(2)
            coef[list(cols)] = sol
            err = float(np.sum((A @ coef - t) ** 2))
            if best is None or err < best[1]:
                best = (coef, err)
    coef = best[0] if best is not None else np.zeros(2)
    return float(coef[0]), float(coef[1])


ROUNDS_CASES = [{"op": "softmax", "shape": {"H": 4, "T": 32}}, {"op": "layernorm", "shape": {"T": 32, "d": 128}},
                {"op": "gelu", "shape": {"T": 32, "w": 512}}, {"op": "relu", "shape": {"T": 32, "w": 512}},
                {"op": "leaky_relu", "shape": {"T": 32, "w": 512}},
                {"op": "linear", "shape": {"T": 32, "din": 128, "dout": 512}},
                {"op": "scores", "shape": {"H": 4, "T": 32, "dk": 32}},
                {"op": "rmsnorm", "shape": {"T": 32, "d": 128}}, {"op": "silu", "shape": {"T": 32, "w": 512}},
                {"op": "gate_product", "shape": {"T": 32, "w": 512}}, {"op": "rotary", "shape": {"T": 32, "w": 512}}]


def fit_profile(bench: dict, name: str, protocol: str, quick: bool, rounds: Optional[list[dict]] = None,
                spu_profile: str = "default") -> dict:
    from privlm.spu.spu_profile import load_spu_profile

    rows = bench["rows"]
    rounds_of = {r["op"]: r for r in rounds or []}
    setups = [r for r in rows if r["op"] == "setup"]  # one per ring the profile runs in
    setup = {k: sum(r[k] for r in setups) for k in ("bytes", "seconds")}
    nonlinear, fits = {}, {}
    for op in CALIBRATED_OPS:
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        el = np.array([r["elements"] for r in rs], float)
        calls = np.array([r["calls"] for r in rs], float)
        b = np.array([r["bytes"] for r in rs], float)
        s = np.array([r["seconds"] for r in rs], float)
        msg = np.array([r["messages"] for r in rs], float)
        bpe, bpc = nnls2(el, calls, b)
        spe, spc = nnls2(el, calls, s)
        pred_b = bpe * el + bpc * calls
        send_actions = np.array([r["send_actions"] for r in rs], float)
        nonlinear[op] = {
            "bytes_per_element": bpe, "seconds_per_element": spe, "bytes_per_call": bpc, "seconds_per_call": spc,
            # SEMI2K: each round is one simultaneous exchange, so rounds = party 0's sends (exact); CHEETAH's
            # OT/HE may batch several messages into one flight: its rounds come from the delay measurement
            "rounds_per_call": (float(np.median(send_actions / calls)) if protocol == "semi2k" else
                                rounds_of[op]["rounds"] / rounds_of[op]["calls"] if op in rounds_of else None),
            "messages_per_call": float(np.median(msg / calls)),
        }
        fits[op] = {"elements": el.astype(int).tolist(), "bytes": b.astype(int).tolist(),
                    "max_rel_residual_bytes": float(np.max(np.abs(pred_b - b) / b)),
                    "bytes_per_element_marginal": _marginal(el, b)}
        if "parts" in rs[-1]:  # a kernel run in another ring: its parts at the largest shape, bytes per element
            big = max(rs, key=lambda r: r["elements"])
            fits[op]["parts_bytes_per_element"] = {k: v["bytes"] / big["elements"] for k, v in big["parts"].items()}
    linear = {}
    has_embed = any(r["kind"] == "embed" for r in rows)
    for kind, ops in (("ffn", ("linear",)), ("attn", ("linear", "scores")),
                      ("embed_head", ("embed",) if has_embed else ("linear",))):
        # without embedding-shaped cases, the embedding and head are charged like the other blocked products
        rs = [r for r in rows if r["kind"] in ops]
        if not rs:
            continue
        g = np.array([r["flops"] for r in rs], float) / 1e9
        b = np.array([r["bytes"] for r in rs], float)
        s = np.array([r["seconds"] for r in rs], float)
        bpg = float(np.sum(b / g) / len(g))  # per-GFLOP ratio averaged over the sizes (relative weighting)
        spg = float(np.sum(s / g) / len(g))
        linear[kind] = {"bytes_per_gflop": bpg, "seconds_per_gflop": spg}
        fits[kind] = {"gflops": g.tolist(), "bytes": b.astype(int).tolist(),
                      "max_rel_residual_bytes": float(np.max(np.abs(bpg * g - b) / b)),
                      "bytes_per_product": float(np.mean(b))}
    import importlib.metadata as md
    return {
        "format": COST_PROFILE_FORMAT,
        "_format": "see docs/pi-cost.md#profile-format; written by `privlm pi calibrate`",
        "name": name,
        "description": f"Per-op costs measured with SecretFlow SPU ({protocol.upper()}, 2PC, FM64, 18 fraction "
                       f"bits{_rings_note(spu_profile)}, SPU profile '{spu_profile}') on this machine by `privlm pi calibrate"
                       f"{' --quick' if quick else ''}`; weights private to the server (secret x private "
                       f"products), see docs/pi-measured.md",
        "provenance": {
            "kind": "measured", "source": "privlm.spu.microbench (each op = the function the private forward "
                                          "runs, random secret inputs)",
            "script": f"privlm pi calibrate{' --quick' if quick else ''} --protocol {protocol} "
                      f"--spu-profile {spu_profile}",
            "spu_profile": load_spu_profile(spu_profile).to_dict(),
            "machine": machine(), "framework": f"SecretFlow SPU {protocol.upper()} (2PC, semi-honest)",
            # bytes do not depend on the machine's load, seconds do: a busy machine's seconds are no latency figure
            "load_average": list(os.getloadavg()), "cpus": os.cpu_count(),
            "spu_version": bench["spu_version"], "privlm_version": md.version("privlm"),
            "date": time.strftime("%Y-%m-%d"), "grid": "quick" if quick else "full",
            "fit": fits,
            "rounds": rounds,
            "_rounds": "rounds = sequential one-way message flights of one SPU run of the op, measured as "
                       "(t(delay) - t(0)) / delay through privlm.spu.delayproxy; rounds_per_call divides by the "
                       "census calls in that run (heads of a softmax run are evaluated in parallel)",
            "caveats": "attention products (QK^T, AV) are secret x secret, every other product secret x "
                       "server-private; small CHEETAH matmuls cost about one HE ciphertext batch regardless of "
                       "FLOPs, so per-GFLOP costs are only fair near the grid's sizes",
        },
        "network": {"bandwidth_mbps": None, "rtt_ms": None,
                    "setting": "seconds measured with both parties on one host (no network delay); "
                               "see docs/pi-measured.md for the WAN estimate"},
        "conventions": {"flops": "dense", "final_layernorm": "counted"},
        "identified_op_sets": None,
        "nonlinear": nonlinear,
        "linear": linear,
        # the logits' share out (the server's share, revealed to the client): one ring element per vocabulary
        # entry; the one-hot prompt is private to the client and is never sent
        "per_token": {"bytes": 0.0, "seconds": 0.0, "bytes_per_vocab": 1.0 * FM64_SHARE_BYTES,
                      "seconds_per_vocab": 0.0},
        "fixed": {"bytes": float(setup["bytes"]), "seconds": float(setup["seconds"])},
    }


def _rings_note(spu_profile: str) -> str:
    from privlm.spu.spu_profile import load_spu_profile
    rings = load_spu_profile(spu_profile).rings
    if not rings:
        return ""
    r = next(iter(rings.values()))
    return (f"; {', '.join(rings)} in {r['field']} with {r.get('fxp_fraction_bits')} fraction bits plus the ring "
            f"conversions, privlm.spu.microbench.RING_CONVERSIONS")


def _check_same_settings(old: dict, now: dict) -> None:
    """Refuse to merge into profile ``old`` measurements made under SPU profile settings ``now`` that differ from
    those ``old`` was measured under (its kernels aside: merging ops is how a kernel's costs are replaced)."""
    was = old.get("provenance", {}).get("spu_profile")
    if was is not None and {k: v for k, v in was.items() if k != "kernels"} != \
            {k: v for k, v in now.items() if k != "kernels"}:
        raise PrivlmError(f"profile '{old.get('name')}' was measured under other SPU settings than "
                          f"'{now['name']}' has now; calibrate it whole (--force)")


def merge_ops(old: dict, new: dict, ops: list[str]) -> dict:
    """``old`` with the nonlinear entries, fits and rounds of ``ops`` taken from ``new`` (a calibration of those
    ops only under the same SPU profile); everything else, the setup and the linear costs included, stays
    ``old``'s. Refused when the SPU profile's settings differ from those ``old`` was measured under."""
    now = new["provenance"]["spu_profile"]
    _check_same_settings(old, now)
    out = json.loads(json.dumps(old))
    prov = out["provenance"]
    for op in ops:
        if op in new["nonlinear"]:
            out["nonlinear"][op] = new["nonlinear"][op]
            prov.setdefault("fit", {})[op] = new["provenance"]["fit"][op]
    keep = [r for r in prov.get("rounds") or [] if r["op"] not in ops]
    prov["rounds"] = keep + [r for r in new["provenance"].get("rounds") or [] if r["op"] in ops] or None
    prov["spu_profile"] = now
    prov.setdefault("merged", []).append({"ops": list(ops), "script": new["provenance"]["script"] + f" --ops {','.join(ops)}",
                                          "date": new["provenance"]["date"], "machine": new["provenance"]["machine"],
                                          "spu_version": new["provenance"]["spu_version"],
                                          "load_average": new["provenance"]["load_average"],
                                          "cpus": new["provenance"]["cpus"]})
    return out


def merge_rounds(old: dict, rounds: list[dict], spu_profile: str) -> dict:
    """``old`` with the rounds per call of the ops in ``rounds`` (`measure_rounds` under ``spu_profile``) and
    those measurements in its provenance; its bytes, seconds and fits stay as they were."""
    from privlm.spu.spu_profile import load_spu_profile

    _check_same_settings(old, load_spu_profile(spu_profile).to_dict())
    out = json.loads(json.dumps(old))
    prov = out["provenance"]
    ops = sorted({r["op"] for r in rounds if r["op"] != "setup"})
    for r in rounds:
        if r["op"] in out["nonlinear"]:
            out["nonlinear"][r["op"]]["rounds_per_call"] = r["rounds"] / r["calls"]
    keep = [r for r in prov.get("rounds") or [] if r["op"] not in ops and r["op"] != "setup"]
    prov["rounds"] = keep + rounds
    prov.setdefault("merged", []).append({
        "rounds_of": ops, "script": f"privlm pi calibrate --protocol cheetah --spu-profile {spu_profile} "
                                    f"--rounds-only --rounds-delay-ms {rounds[0]['delay_ms']:g}",
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count()})
    return out


def _marginal(el: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Slope of bytes over elements between the two largest shapes (the per-element cost at scale)."""
    order = np.argsort(el)
    if len(el) < 2 or el[order[-1]] == el[order[-2]]:
        return None
    return float((b[order[-1]] - b[order[-2]]) / (el[order[-1]] - el[order[-2]]))


def cmd_calibrate(args) -> int:
    from privlm.spu.spu_profile import check_spu_profile
    check_spu_profile(args.spu_profile, whole_program=False)
    args.name = args.name or cost_profile_name(args.spu_profile)
    from privlm.pi.costs import default_profile_path, save_profile

    out = Path(args.out) if args.out else default_profile_path(args.name)
    ops = None
    if args.ops is not None:
        ops = [o for o in args.ops.split(",") if o]
        bad = [o for o in ops if o not in CALIBRATED_OPS]
        if bad or not ops:
            raise PrivlmError(f"--ops: unknown op {bad[0] if bad else repr(args.ops)} (known: {', '.join(CALIBRATED_OPS)})")
        if not out.is_file():
            raise PrivlmError(f"--ops merges into an existing profile; '{out}' does not exist (calibrate it whole first)")
    elif out.exists() and not args.force and not args.rounds_only:  # checked again on writing; failing here
        # saves the measurement
        raise PrivlmError(f"profile '{out}' exists; pass --force to overwrite it or --out for another path")
    delay = args.rounds_delay_ms if args.rounds_delay_ms is not None else (0.0 if args.quick else 40.0)
    if args.rounds_only:
        return _calibrate_rounds_only(args, out, ops, delay)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if ops is not None:  # the ops asked for, and the setup (its runtime's one-time costs) with them
        grid = {op: shapes for op, shapes in grid.items() if op in ops}
    rounds_cases = [c for c in ROUNDS_CASES if ops is None or c["op"] in ops]
    with private_tempdir("privlm-cal-") as tmp:
        bench = run_microbench(grid_cases(grid), args.protocol, Path(tmp), args.spu_profile)
        rounds = (measure_rounds(rounds_cases, args.protocol, Path(tmp) / "rounds", delay,
                                 spu_profile=args.spu_profile) if delay > 0 and rounds_cases else None)
    prof = fit_profile(bench, args.name, args.protocol, args.quick, rounds, args.spu_profile)
    if ops is not None:
        prof = merge_ops(_existing_profile(out), prof, ops)
    save_profile(prof, out, overwrite=args.force or ops is not None)  # validated as `privlm cost` will read it
    if args.json:
        print(json.dumps(prof, indent=1))
    else:
        print(f"wrote {out}")
        for op, c in prof["nonlinear"].items():
            fit = prof["provenance"]["fit"][op]
            print(f"  {op:<11} {c['bytes_per_element']:>9.1f} B/element + {c['bytes_per_call'] / 1e3:>8.1f} KB/call, "
                  f"{c['messages_per_call']:.0f} messages/call; max residual {100 * fit['max_rel_residual_bytes']:.1f}%")
        for kind, c in prof["linear"].items():
            fit = prof["provenance"]["fit"][kind]
            print(f"  {kind:<11} {c['bytes_per_gflop'] / 1e6:>9.1f} MB/GFLOP; max residual "
                  f"{100 * fit['max_rel_residual_bytes']:.1f}%")
        print(f"  setup       {prof['fixed']['bytes'] / 1e6:.1f} MB, {prof['fixed']['seconds']:.1f} s")
    return 0


def _existing_profile(out: Path) -> dict:
    """The profile at ``out`` to merge into, checked as `privlm cost` reads it (one line naming the file if not)."""
    from privlm.pi.costs import parse_profile
    from privlm.validate import read_json

    raw = read_json(out, {}, error=PrivlmError)
    parse_profile(raw, str(out))
    return raw


def _calibrate_rounds_only(args, out: Path, ops: Optional[list[str]], delay: float) -> int:
    from privlm.pi.costs import save_profile

    if args.protocol != "cheetah":
        raise PrivlmError("--rounds-only: SEMI2K's rounds are its messages, counted by every calibration; "
                          "calibrate the profile whole")
    if delay <= 0:
        raise PrivlmError("--rounds-only needs a delay above 0 (--rounds-delay-ms; default 40)")
    if not out.is_file():
        raise PrivlmError(f"--rounds-only merges into an existing profile; '{out}' does not exist "
                          f"(calibrate it whole first)")
    old = _existing_profile(out)
    if not (old.get("provenance") or {}).get("spu_profile"):
        raise PrivlmError(f"--rounds-only: '{out}' was not measured by `privlm pi calibrate` (no SPU profile in its "
                          f"provenance), so SPU's rounds would not be its engine's")
    from privlm.spu.spu_profile import load_spu_profile
    _check_same_settings(old, load_spu_profile(args.spu_profile).to_dict())  # before minutes of measuring
    cases = [c for c in ROUNDS_CASES if (ops is None or c["op"] in ops)
             and (c["op"] in old.get("nonlinear", {}) or c["op"] in ("linear", "scores"))]
    if not cases:
        raise PrivlmError(f"--rounds-only: none of {', '.join(ops or [])} is an op of '{out}'")
    with private_tempdir("privlm-cal-") as tmp:
        rounds = measure_rounds(cases, args.protocol, Path(tmp) / "rounds", delay, spu_profile=args.spu_profile)
    prof = merge_rounds(old, rounds, args.spu_profile)
    save_profile(prof, out, overwrite=True)  # validated as `privlm cost` will read it
    if args.json:
        print(json.dumps(prof, indent=1))
    else:
        print(f"wrote {out}")
        for op, c in prof["nonlinear"].items():
            if c.get("rounds_per_call") is not None:
                print(f"  {op:<11} {c['rounds_per_call']:>7.1f} rounds/call")
    return 0


# --------------------------------------------------------------------------------------------------
PAPER_T128_GB = {"SM+LN+G": 25.32, "SM+LN+R": 9.44, "SM+ScFuFFN": 6.43, "EReg(SM(t)+ScFuFFN)": 6.43,
                 "SM(t)+ScFuFFN": 6.43}


def _measured_privlm(preset: str, overrides: list[str], T: int, layers_measured: int, vocab_measured: int):
    """(shape of the whole model, the model of layers_measured blocks at the measured vocabulary) of a preset."""
    import torch

    from privlm.config import load_config
    from privlm.model import GPT

    m = load_config(preset, list(overrides) + [f"data.seq_len={T}"]).model
    if not 1 <= layers_measured <= m.n_layer:
        raise PrivlmError(f"--layers-measured={layers_measured} must be in 1..model.n_layer={m.n_layer}")
    vm = min(vocab_measured, m.vocab_size)
    small = load_config(preset, list(overrides) + [f"data.seq_len={T}", f"model.n_layer={layers_measured}",
                                                   f"model.vocab_size={vm}"])
    if small.model.ffn_keep_layers is not None or small.model.ffn_prune_deepest:
        raise PrivlmError("measure scales identical blocks; presets with pruned FFNs (^iK) differ per block")
    torch.manual_seed(0)
    shape = {"preset": m.preset, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head,
             "vocab_size": m.vocab_size}
    return shape, GPT(small.model).eval()


def _measured_hf(spec: str, overrides: list[str], T: int, layers_measured: int, vocab_measured: int):
    """The same for a Hugging Face causal LM given by its config (a ``save_pretrained`` directory or ``hf:<id>``):
    only ``layers_measured`` blocks and the vocabulary slice are built, with random weights (the bytes of a 2PC
    run depend on the shapes, not on the weights' values), so a 1.1 B model never has to fit in memory."""
    import copy

    import torch

    from privlm.hfmodel import build_model, check_length, hf_param_count, load_config as hf_config, shape_of
    from privlm.validate import check_fits

    if overrides:
        raise PrivlmError(f"key=value overrides ({overrides[0]}) apply to privlm presets; edit the config.json of "
                          f"'{spec}' instead")
    config, path, family = hf_config(spec)
    s = shape_of(config)
    check_length(config, T)
    if not 1 <= layers_measured <= s["n_layer"]:
        raise PrivlmError(f"--layers-measured={layers_measured} must be in 1..{s['n_layer']} (the model's layers)")
    vm = min(vocab_measured, s["vocab_size"])
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers_measured  # GPT-2's n_layer through its config's attribute map
    small.vocab_size = vm
    if isinstance(getattr(small, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Mistral)
        small.layer_types = small.layer_types[:layers_measured]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids past the measured vocabulary
        v = getattr(small, k, None)
        if isinstance(v, int) and v >= vm:
            setattr(small, k, None)
    check_fits(hf_param_count(small) * 4, f"the measured part of '{spec}' ({hf_param_count(small):,}+ parameters)")
    torch.manual_seed(0)
    model = build_model(small, "cpu")
    name = spec if spec.startswith("hf:") else path.name
    shape = {"preset": name, "family": family.name, "n_layer": s["n_layer"], "n_embd": s["n_embd"],
             "n_head": s["n_head"], "n_kv_head": s["n_kv_head"], "ffn_hidden": s["ffn_hidden"],
             "vocab_size": s["vocab_size"]}
    return shape, model


def scale_of(step: dict, n_layer: int, layers_measured: int, vocab_size: int, vocab_measured: int) -> float:
    """What one measured step stands for in the whole model: a block's step L / layers_measured times (all blocks
    cost the same), the embedding's and head's V / vocab_measured times ([T,V]x[V,d] and [T,d]x[d,V] are linear
    in V at fixed T, d), the rest (final norm, setup) once."""
    if step["layer"] is not None:
        return n_layer / layers_measured
    if step["kind"] in ("embedding", "head"):
        return vocab_size / vocab_measured
    return 1.0


def scaled_by(doc: dict, key: str) -> dict[str, dict]:
    """A `measure` document's steps scaled to the whole model (``scale_of``) and summed by ``key`` (kind |
    census): bytes, seconds, messages."""
    out: dict[str, dict] = {}
    for s in doc["steps"]:
        f = scale_of(s, doc["n_layer"], doc["layers_measured"], doc["vocab_size"], doc["vocab_measured"])
        acc = out.setdefault(s[key], {"bytes": 0.0, "seconds": 0.0, "messages": 0.0})
        acc["bytes"] += (s["send_bytes"] + s["recv_bytes"]) * f
        acc["seconds"] += s["seconds"] * f
        acc["messages"] += (s["send_actions"] + s["recv_actions"]) * f
    return out


def measure(preset: str, overrides: list[str], T: int, layers_measured: int, vocab_measured: int,
            protocol: str, chunks: int = 4, matmul_block: Optional[int] = 768, spu_profile: str = "default") -> dict:
    """Cost of the full model from ``layers_measured`` measured blocks, scaled by L (see module doc). ``preset``:
    a privlm preset (with ``overrides``) or a Hugging Face model's config (``hfmodel.is_hf_spec``)."""
    import torch

    from privlm.hfmodel import is_hf_spec
    from privlm.spu.export import save_traced
    from privlm.spu.launcher import run_parties
    from privlm.spu.report import breakdown

    build = _measured_hf if is_hf_spec(preset) else _measured_privlm
    shape, model = build(preset, list(overrides), T, layers_measured, vocab_measured)
    V = shape["vocab_size"]
    vm = min(vocab_measured, V)
    ids = torch.randint(0, vm, (T,)).tolist()
    with private_tempdir("privlm-measure-") as tmp:
        public, weights = save_traced(model, Path(tmp) / "export", T)
        del model
        result, _ = run_parties(Path(tmp), public, weights=weights, tokens=ids, T=T, protocol=protocol,
                                mode="sim", head="all", chunks=chunks,
                                matmul_block=matmul_block, spu_profile=spu_profile)
    steps = result["steps"]
    doc = {**shape, "T": T, "layers_measured": layers_measured, "vocab_measured": vm, "steps": steps}
    per_kind = scaled_by(doc, "kind")
    shares = (result["input_share_bytes"] + result["output_share_bytes"]) * V / vm
    total = sum(v["bytes"] for v in per_kind.values()) + shares
    seconds = sum(v["seconds"] for v in per_kind.values())
    name = shape["preset"]
    gpt2_size = T == 128 and shape["n_layer"] == 12 and shape["n_embd"] == 768 and "family" not in shape
    return {**shape, "T": T, "layers_measured": layers_measured, "vocab_measured": vm, "protocol": protocol,
            "spu_profile": spu_profile, "spu_settings": result["spu_settings"],
            "spu_version": result["spu_version"], "comm_gb": total / 1e9, "share_bytes": shares,
            "seconds_scaled": seconds, "ops": per_kind, "census_ops": scaled_by(doc, "census"),
            "measured_wall_seconds": result["wall_seconds"],
            "measured_steps": breakdown(steps, "kind"), "steps": steps, "chunks": chunks,
            "matmul_block": matmul_block,
            "peak_rss_mb": result.get("peak_rss_mb"),
            "paper_comm_gb": PAPER_T128_GB.get(name) if gpt2_size else None,
            "machine": machine()}


def cmd_measure(args) -> int:
    from privlm.spu.spu_profile import check_spu_profile
    check_spu_profile(args.spu_profile)
    doc = measure(args.preset, args.overrides, args.T, args.layers_measured, args.vocab_measured, args.protocol,
                  args.chunks, args.matmul_block or None, args.spu_profile)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    paper = f" (paper: {doc['paper_comm_gb']} GB)" if doc["paper_comm_gb"] is not None else ""
    print(f"{doc['preset']} L={doc['n_layer']} d={doc['n_embd']} T={doc['T']}: {doc['comm_gb']:.2f} GB{paper}, "
          f"{doc['seconds_scaled'] / 60:.1f} min on this machine (from {doc['layers_measured']} measured layer(s), "
          f"vocab {doc['vocab_measured']} scaled to {doc['vocab_size']})")
    for k, v in doc["ops"].items():
        print(f"  {k:<11}{v['bytes'] / 1e9:>9.3f} GB{v['seconds'] / 60:>8.2f} min")
    return 0
