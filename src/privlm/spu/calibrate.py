"""`privlm pi calibrate` (measured cost profile) and `privlm pi measure` (GPT-2-size cost from one layer).

calibrate: micro-benchmarks every op type at several sizes under SPU (`privlm.spu.microbench`), fits
``bytes = per_element·elements + per_call·calls`` for each nonlinear op and ``bytes = per_gflop·GFLOPs``
for each linear kind (seconds alike), reports how linear the data are, and writes a cost profile in the
format of docs/pi-cost.md (``privlm-pi-cost-profile/1``), by default ``spu-cheetah-measured``.

measure: all L blocks of a preset cost the same, so one full-width block (plus embedding and head) is run
under 2PC and the per-block steps are scaled by L / layers_measured.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from privlm.errors import PrivlmError

PROFILE_DIR = Path(__file__).resolve().parents[1] / "pi" / "profiles"
NONLINEAR = ("softmax", "layernorm", "gelu", "relu", "leaky_relu")
FM64_SHARE_BYTES = 8  # one 64-bit ring element per share

# (op, shapes): the full grid spans the widths of small privlm models up to a quarter of GPT-2's
FULL_GRID: dict[str, list[dict]] = {
    "softmax": [{"H": 2, "T": 16}, {"H": 4, "T": 32}, {"H": 4, "T": 64}, {"H": 8, "T": 64}],
    "layernorm": [{"T": 16, "d": 64}, {"T": 32, "d": 128}, {"T": 64, "d": 128}, {"T": 64, "d": 256}],
    "gelu": [{"T": 16, "w": 256}, {"T": 32, "w": 512}, {"T": 64, "w": 512}, {"T": 64, "w": 1024}],
    "relu": [{"T": 16, "w": 256}, {"T": 32, "w": 512}, {"T": 64, "w": 512}, {"T": 64, "w": 1024}],
    "leaky_relu": [{"T": 16, "w": 256}, {"T": 64, "w": 512}],
    "linear": [{"T": 32, "din": 64, "dout": 256}, {"T": 64, "din": 128, "dout": 512},
               {"T": 64, "din": 256, "dout": 256}, {"T": 64, "din": 256, "dout": 1024}],
    "scores": [{"H": 4, "T": 32, "dk": 32}, {"H": 4, "T": 64, "dk": 32}, {"H": 8, "T": 64, "dk": 32}],
    "embed": [{"T": 32, "din": 1024, "dout": 128}, {"T": 64, "din": 2048, "dout": 128}],
}
# CI-sized: the shapes of a tiny test model (d=32, 2 heads, T<=16), seconds instead of minutes
QUICK_GRID: dict[str, list[dict]] = {
    "softmax": [{"H": 2, "T": 8}, {"H": 2, "T": 16}, {"H": 4, "T": 16}],
    "layernorm": [{"T": 8, "d": 32}, {"T": 16, "d": 32}, {"T": 16, "d": 64}],
    "gelu": [{"T": 8, "w": 128}, {"T": 16, "w": 128}, {"T": 16, "w": 256}],
    "relu": [{"T": 8, "w": 128}, {"T": 16, "w": 256}],
    "linear": [{"T": 8, "din": 32, "dout": 96}, {"T": 16, "din": 32, "dout": 128}],
    "scores": [{"H": 2, "T": 8, "dk": 16}, {"H": 2, "T": 16, "dk": 16}],
    "embed": [{"T": 8, "din": 64, "dout": 32}, {"T": 16, "din": 64, "dout": 32}],
}


def register(sub) -> None:
    c = sub.add_parser("calibrate", help="measure per-op SPU costs and write a cost profile")
    c.add_argument("--out", help="profile path (default src/privlm/pi/profiles/<name>.json)")
    c.add_argument("--name", default="spu-cheetah-measured")
    c.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    c.add_argument("--quick", action="store_true", help="small shapes only (tiny models, CI)")
    c.add_argument("--force", action="store_true", help="overwrite an existing profile")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser("measure", help="2PC cost of a GPT-2-size preset from one measured layer")
    m.add_argument("preset")
    m.add_argument("overrides", nargs="*", metavar="key=value")
    m.add_argument("--T", type=int, default=128)
    m.add_argument("--layers-measured", type=int, default=1)
    m.add_argument("--vocab-measured", type=int, default=4096,
                   help="run embedding and head at this vocabulary and scale linearly to the model's")
    m.add_argument("--protocol", default="cheetah", choices=("cheetah", "semi2k"))
    m.add_argument("--out", help="write the JSON result here too")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_measure)


# --------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}; both parties on this host (loopback / in-memory link)"


def grid_cases(grid: dict[str, list[dict]]) -> list[dict]:
    cases = []
    for op, shapes in grid.items():
        for s in shapes:
            cases.append({"op": "linear" if op == "embed" else op, "shape": dict(s), "kind": op})
    return cases


def run_microbench(cases: list[dict], protocol: str, work: Path) -> dict:
    from privlm.spu.launcher import spu_module

    (work / "cases.json").write_text(json.dumps(cases))
    spu_module("privlm.spu.microbench", ["--cases", str(work / "cases.json"), "--out", str(work / "rows.json"),
                                         "--log", str(work / "spu.log"), "--protocol", protocol])
    out = json.loads((work / "rows.json").read_text())
    # the SPU side does not know which linear rows are embedding-shaped: tag them back
    linear_kinds = [c["kind"] for c in cases]
    it = iter(linear_kinds)
    for r in out["rows"]:
        r["kind"] = "setup" if r["op"] == "setup" else next(it)
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


def fit_profile(bench: dict, name: str, protocol: str, quick: bool) -> dict:
    rows = bench["rows"]
    setup = [r for r in rows if r["op"] == "setup"][0]
    nonlinear, fits = {}, {}
    for op in NONLINEAR:
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
            # SEMI2K: every round is one message each way, so rounds = party 0's sends (exact). CHEETAH's
            # OT/HE send several messages per round: its rounds need the delay measurement (not given here)
            "rounds_per_call": float(np.median(send_actions / calls)) if protocol == "semi2k" else None,
            "messages_per_call": float(np.median(msg / calls)),
        }
        fits[op] = {"elements": el.astype(int).tolist(), "bytes": b.astype(int).tolist(),
                    "max_rel_residual_bytes": float(np.max(np.abs(pred_b - b) / b)),
                    "bytes_per_element_marginal": _marginal(el, b)}
    linear = {}
    for kind, ops in (("ffn", ("linear",)), ("attn", ("linear", "scores")), ("embed_head", ("embed",))):
        rs = [r for r in rows if r["kind"] in ops and (kind != "ffn" or r["kind"] == "linear")]
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
        "format": "privlm-pi-cost-profile/1",
        "_format": "see docs/pi-cost.md#profile-format; written by `privlm pi calibrate`",
        "name": name,
        "description": f"Per-op costs measured with SecretFlow SPU ({protocol.upper()}, 2PC, FM64, 18 fraction "
                       f"bits) on this machine by `privlm pi calibrate{' --quick' if quick else ''}`; secret "
                       f"weights (secret x secret matmuls), see docs/pi-measured.md",
        "provenance": {
            "kind": "measured", "source": "privlm.spu.microbench (each op = the function the private forward "
                                          "runs, random secret inputs)",
            "script": f"privlm pi calibrate{' --quick' if quick else ''} --protocol {protocol}",
            "machine": machine(), "framework": f"SecretFlow SPU {protocol.upper()} (2PC, semi-honest)",
            "spu_version": bench["spu_version"], "privlm_version": md.version("privlm"),
            "date": time.strftime("%Y-%m-%d"), "grid": "quick" if quick else "full",
            "fit": fits,
            "caveats": "linear costs are secret x secret (CHEETAH's Io has no private visibility), which overstates "
                       "them versus a server holding plaintext weights; small CHEETAH matmuls cost about one HE "
                       "ciphertext batch regardless of FLOPs, so per-GFLOP costs are only fair near the grid's sizes",
        },
        "network": {"bandwidth_mbps": None, "rtt_ms": None,
                    "setting": "seconds measured with both parties on one host (no network delay); "
                               "see docs/pi-measured.md for the WAN estimate"},
        "conventions": {"flops": "dense", "final_layernorm": "counted"},
        "identified_op_sets": None,
        "nonlinear": nonlinear,
        "linear": linear,
        # the client's one-hot share in and the logits' share out: one ring element per vocabulary entry each
        "per_token": {"bytes": 0.0, "seconds": 0.0, "bytes_per_vocab": 2.0 * FM64_SHARE_BYTES,
                      "seconds_per_vocab": 0.0},
        "fixed": {"bytes": float(setup["bytes"]), "seconds": float(setup["seconds"])},
    }


def _marginal(el: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Slope of bytes over elements between the two largest shapes (the per-element cost at scale)."""
    order = np.argsort(el)
    if len(el) < 2 or el[order[-1]] == el[order[-2]]:
        return None
    return float((b[order[-1]] - b[order[-2]]) / (el[order[-1]] - el[order[-2]]))


def cmd_calibrate(args) -> int:
    out = Path(args.out) if args.out else PROFILE_DIR / f"{args.name}.json"
    if out.exists() and not args.force:
        raise PrivlmError(f"profile '{out}' exists; pass --force to overwrite it or --out for another path")
    with tempfile.TemporaryDirectory(prefix="privlm-cal-") as tmp:
        bench = run_microbench(grid_cases(QUICK_GRID if args.quick else FULL_GRID), args.protocol, Path(tmp))
    prof = fit_profile(bench, args.name, args.protocol, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1) + "\n")
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


# --------------------------------------------------------------------------------------------------
PAPER_T128_GB = {"SM+LN+G": 25.32, "SM+LN+R": 9.44, "SM+ScFuFFN": 6.43, "EReg(SM(t)+ScFuFFN)": 6.43,
                 "SM(t)+ScFuFFN": 6.43}


def measure(preset: str, overrides: list[str], T: int, layers_measured: int, vocab_measured: int,
            protocol: str) -> dict:
    """Cost of the full model from ``layers_measured`` measured blocks, scaled by L (see module doc)."""
    import torch

    from privlm.config import load_config
    from privlm.model import GPT
    from privlm.spu.export import save_export
    from privlm.spu.launcher import run_parties
    from privlm.spu.report import breakdown

    cfg = load_config(preset, list(overrides) + [f"data.seq_len={T}"])
    m = cfg.model
    if not 1 <= layers_measured <= m.n_layer:
        raise PrivlmError(f"--layers-measured={layers_measured} must be in 1..model.n_layer={m.n_layer}")
    V = m.vocab_size
    vm = min(vocab_measured, V)
    small = load_config(preset, list(overrides) + [f"data.seq_len={T}", f"model.n_layer={layers_measured}",
                                                   f"model.vocab_size={vm}"])
    if small.model.ffn_keep_layers is not None or small.model.ffn_prune_deepest:
        raise PrivlmError("measure scales identical blocks; presets with pruned FFNs (^iK) differ per block")
    torch.manual_seed(0)
    model = GPT(small.model).eval()
    ids = torch.randint(0, vm, (T,)).tolist()
    with tempfile.TemporaryDirectory(prefix="privlm-measure-") as tmp:
        public, weights = save_export(model, Path(tmp) / "export")
        result, _ = run_parties(Path(tmp), public, weights=weights, tokens=ids, T=T, protocol=protocol,
                                mode="sim", head="all")
    steps = result["steps"]
    scale_layer = m.n_layer / layers_measured
    scale_vocab = V / vm
    per_kind: dict[str, dict] = {}
    total = 0.0
    for s in steps:
        if s["layer"] is not None:
            f = scale_layer
        elif s["kind"] in ("embedding", "head"):
            f = scale_vocab  # [T,V]x[V,d] and [T,d]x[d,V]: linear in V at fixed T, d
        else:
            f = 1.0
        b = (s["send_bytes"] + s["recv_bytes"]) * f
        acc = per_kind.setdefault(s["kind"], {"bytes": 0.0, "seconds": 0.0, "messages": 0.0})
        acc["bytes"] += b
        acc["seconds"] += s["seconds"] * f
        acc["messages"] += (s["send_actions"] + s["recv_actions"]) * f
        total += b
    shares = (result["input_share_bytes"] + result["output_share_bytes"]) * scale_vocab
    total += shares
    seconds = sum(v["seconds"] for v in per_kind.values())
    name = cfg.model.preset
    return {"preset": name, "n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "vocab_size": V,
            "T": T, "layers_measured": layers_measured, "vocab_measured": vm, "protocol": protocol,
            "spu_version": result["spu_version"], "comm_gb": total / 1e9, "share_bytes": shares,
            "seconds_scaled": seconds, "ops": per_kind, "measured_wall_seconds": result["wall_seconds"],
            "measured_steps": breakdown(steps, "kind"),
            "paper_comm_gb": PAPER_T128_GB.get(name) if (T == 128 and m.n_layer == 12 and m.n_embd == 768) else None,
            "machine": machine()}


def cmd_measure(args) -> int:
    doc = measure(args.preset, args.overrides, args.T, args.layers_measured, args.vocab_measured, args.protocol)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
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
