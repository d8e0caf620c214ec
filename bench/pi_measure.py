"""Measured private inference under SecretFlow SPU, side by side with the paper and the paper-fit profile.

    .venv/bin/python bench/pi_measure.py                 # small models + per-op table (~10-20 min on 2 cores)
    .venv/bin/python bench/pi_measure.py --gpt2          # also the GPT-2-size one-layer measurements (~6 GB RAM,
                                                         # ~15 min each on 2 cores); without --gpt2 the files
                                                         # bench/results/pi_gpt2_<preset>.json are reused

Writes bench/results/pi_measure.json and docs/pi-measured.md. Needs `make spu-setup` and the profile
written by `privlm pi calibrate` (src/privlm/pi/profiles/spu-cheetah-measured.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.model import GPT
from privlm.pi import census, load_profile, predict
from privlm.spu.calibrate import machine, measure, measure_rounds
from privlm.spu.export import save_export
from privlm.spu.launcher import run_parties
from privlm.spu.report import breakdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pi_measure.json"
DOC = ROOT / "docs" / "pi-measured.md"
PRESETS = ["SM+LN+G", "SM+LN+R", "SM+ScFuFFN", "SM(t)+ScFuFFN"]
SMALL = ["model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.vocab_size=1024", "model.block_size=64",
         "data.seq_len=64"]
SMALL_T = 64
GPT2 = ["model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.vocab_size=50257",
        "model.block_size=1024", "data.seq_len=128"]
GPT2_PRESETS = ("SM+LN+G", "SM+LN+R", "SM+ScFuFFN")
GPT2_VOCAB_MEASURED = 768  # one 768-feature block: embedding and head scale exactly with the block count


def gpt2_file(preset: str) -> Path:
    return ROOT / "bench" / "results" / f"pi_gpt2_{preset}.json"


PAPER_SAVINGS = {"SM+LN+R": 2.68, "SM+ScFuFFN": 3.94, "SM(t)+ScFuFFN": 3.94}
WAN = {"bandwidth_mbps": 100.0, "latency_ms": 80.0}


def run_small(preset: str) -> dict:
    cfg = load_config(preset, SMALL)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()  # costs do not depend on the weights' values: random init is enough
    ids = torch.randint(0, cfg.model.vocab_size, (SMALL_T,)).tolist()
    with tempfile.TemporaryDirectory(prefix="privlm-bench-") as tmp:
        public, weights = save_export(model, Path(tmp) / "export")
        result, logits = run_parties(Path(tmp), public, weights=weights, tokens=ids, T=SMALL_T,
                                     protocol="cheetah", mode="sim")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    kinds = breakdown(result["steps"], "kind")
    runtime = sum(k["bytes"] for k in kinds.values())
    total = runtime + result["input_share_bytes"] + result["output_share_bytes"]
    cen = census(model, SMALL_T)
    pred = predict(cen, "spu-cheetah-measured")
    return {"preset": preset, "T": SMALL_T, "bytes_total": total, "bytes_setup": kinds["setup"]["bytes"],
            "bytes_online": total - kinds["setup"]["bytes"], "online_seconds": result["online_seconds"],
            "messages": sum(k["messages"] for k in kinds.values()), "ops": kinds,
            "steps": result["steps"], "predicted_bytes": pred.comm_gb * 1e9,
            "top1_agree": bool((logits[-1].argmax()) == ref[-1].argmax()),
            "max_logit_err": float(abs(logits - ref).max()), "peak_rss_mb": result.get("peak_rss_mb")}


def wan_estimate(steps: list[dict], bytes_total: float, rounds_by_op: dict[str, float],
                 scale: dict | None = None) -> dict:
    """bytes / bandwidth + rounds x latency, rounds summed over the runs of the program."""
    rounds = 0.0
    for s in steps:
        op = {"matmul": "linear", "embedding": "linear", "head": "linear", "activation": s["census"]}.get(
            s["kind"], s["kind"])
        r = rounds_by_op.get(op)
        if r is None:
            continue
        f = 1.0 if scale is None else scale(s)
        rounds += r * f
    transfer = bytes_total * 8 / (WAN["bandwidth_mbps"] * 1e6)
    return {"rounds": rounds, "transfer_s": transfer, "latency_s": rounds * WAN["latency_ms"] / 1000,
            "total_min": (transfer + rounds * WAN["latency_ms"] / 1000) / 60}


def rounds_table(profile) -> dict[str, float]:
    """Rounds of one SPU run per op (from the calibration's delay measurement). Where the delay signal is
    below this shared machine's timing noise (products: a handful of rounds against seconds of compute),
    party 0's send actions are used instead, an upper bound (each flight carries at least one message)."""
    out = {}
    for r in profile.provenance.get("rounds") or []:
        out[r["op"]] = r["rounds"] if r["rounds"] >= 1 else float(r["send_actions"])
    return out


def semi2k_rounds_check() -> list[dict]:
    """Validate the delay-proxy round count where the truth is known: under SEMI2K every round is one
    simultaneous exchange, so rounds must equal party 0's send actions."""
    cases = [{"op": "relu", "shape": {"T": 8, "w": 64}}, {"op": "softmax", "shape": {"H": 2, "T": 8}},
             {"op": "layernorm", "shape": {"T": 8, "d": 32}}, {"op": "gelu", "shape": {"T": 8, "w": 64}}]
    with tempfile.TemporaryDirectory(prefix="privlm-rounds-") as tmp:
        return measure_rounds(cases, "semi2k", Path(tmp), 20.0)


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def write_doc(res: dict) -> str:
    prof, paper = res["profile"], res["paper_fit"]
    L = []
    L.append("# Measured private inference under SecretFlow SPU\n")
    L.append(f"Generated by `bench/pi_measure.py` on {res['date']} ({res['machine']}); SPU {res['spu_version']}, "
             f"protocol CHEETAH (2PC, OT + HE, no trusted dealer), 64-bit ring, 18 fraction bits. Every number "
             f"below is measured from SPU's own link counters (`Link details` of each run), not estimated. "
             f"Raw data: `bench/results/pi_measure.json`.\n")
    L.append("## How it is measured\n")
    L.append("`privlm pi run` exports the model (`privlm.spu.export`: WN/SN materialized, Eq. 8's 1/α folded into "
             "the FFN output weights) and runs the forward pass of `privlm.spu.program` as one SPU executable "
             "per census op (embedding, LayerNorm, QKV, QKᵀ, softmax, AV, O, FFN in/activation/out, LM head), "
             "so the link counters between two runs are exactly that op's traffic. Party 0 (client) "
             "secret-shares the one-hot prompt, party 1 (server) the weights; the logits are revealed to the "
             "client only. Bytes are both directions (what the paper's *Comm.* counts). The weights' shares are "
             "sent once per session and are reported apart (not in the totals). `sim` (threads, in-memory link) "
             "and `2proc` (two OS processes over brpc) give identical byte counts.\n")
    L.append("**Secret weights.** CHEETAH's `Io` in SPU 0.9.5 rejects private (plaintext-at-owner) inputs, so the "
             "weights are secret-shared and every linear layer is a secret × secret product. Bumblebee as used "
             "by the paper keeps the weights in the server's clear; our linear costs are therefore an upper "
             "bound, and the per-GFLOP costs below are not comparable one-to-one with the paper-fit ones.\n")
    L.append("## Per-op costs: `spu-cheetah-measured` vs `paper-fit`\n")
    L.append("| op | measured B/element | measured KB/call | marginal B/element (two largest shapes) | msgs/call | "
             "rounds/run | paper-fit B/element | max fit residual |")
    L.append("|---|---|---|---|---|---|---|---|")
    rounds = res["rounds_by_op"]
    for op, c in prof["nonlinear"].items():
        pf = paper["nonlinear"].get(op, {}).get("bytes_per_element")
        resid = prof["provenance"]["fit"][op]["max_rel_residual_bytes"]
        marg = prof["provenance"]["fit"][op].get("bytes_per_element_marginal")
        L.append(f"| {op} | {c['bytes_per_element']:.0f} | {c['bytes_per_call'] / 1e3:.1f} | "
                 f"{'—' if marg is None else f'{marg:.0f}'} | {c['messages_per_call']:.0f} | {fmt(rounds.get(op, float('nan')), 0)} | "
                 f"{'—' if pf is None else f'{pf:.0f}'} | {100 * resid:.1f}% |")
    L.append("")
    L.append("| linear kind | measured MB/GFLOP | mean MB per product | paper-fit MB/GFLOP | max fit residual |")
    L.append("|---|---|---|---|---|")
    for kind, c in prof["linear"].items():
        pf = paper["linear"].get(kind, {}).get("bytes_per_gflop")
        fit = prof["provenance"]["fit"][kind]
        L.append(f"| {kind} | {c['bytes_per_gflop'] / 1e6:.0f} | {fit['bytes_per_product'] / 1e6:.2f} | "
                 f"{'—' if pf is None else f'{pf / 1e6:.0f}'} | {100 * fit['max_rel_residual_bytes']:.0f}% |")
    L.append("")
    L.append(f"One-time protocol setup (OT extension, HE keys, first use of each primitive): "
             f"{prof['fixed']['bytes'] / 1e6:.1f} MB per session. Rounds are sequential message flights of one "
             f"SPU run, from latency sensitivity through `privlm.spu.delayproxy` (a user-space delay on "
             f"loopback; `tc netem` is unavailable): rounds = (t(delay) − t(0)) / delay.\n")
    if res.get("semi2k_rounds_check"):
        L.append("Check of the round counting where the answer is known (SEMI2K: one exchange per round, so "
                 "rounds = send actions), 20 ms one-way delay, fastest of 3 runs:\n")
        L.append("| op (SEMI2K) | measured rounds | send actions |")
        L.append("|---|---|---|")
        for r in res["semi2k_rounds_check"]:
            L.append(f"| {r['op']} {r['shape']} | {r['rounds']:.1f} | {r['send_actions']} |")
        L.append("")
    L.append("## End-to-end: small models (L=2, d=128, H=4, T=64, V=1024)\n")
    L.append("Random weights (traffic does not depend on the values). *Online* excludes the one-time setup. "
             "*Predicted* is `privlm cost` with `--profile spu-cheetah-measured` for the same census.\n")
    L.append("| model | total MB | online MB | predicted MB | comm. savings (online) | paper savings (GPT-2) | "
             "softmax MB | LN MB | act. MB | matmul MB | top-1 | max logit err |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = res["small"][0]
    for r in res["small"]:
        ops = r["ops"]
        mm = sum(ops.get(k, {}).get("bytes", 0) for k in ("matmul", "embedding", "head"))
        sav = base["bytes_online"] / r["bytes_online"]
        L.append(f"| {r['preset']} | {r['bytes_total'] / 1e6:.1f} | {r['bytes_online'] / 1e6:.1f} | "
                 f"{r['predicted_bytes'] / 1e6:.1f} | {sav:.2f}× | "
                 f"{PAPER_SAVINGS.get(r['preset'], 1.0):.2f}× | {ops.get('softmax', {}).get('bytes', 0) / 1e6:.1f} | "
                 f"{ops.get('layernorm', {}).get('bytes', 0) / 1e6:.2f} | "
                 f"{ops.get('activation', {}).get('bytes', 0) / 1e6:.1f} | {mm / 1e6:.1f} | {r['top1_agree']} | "
                 f"{r['max_logit_err']:.3f} |")
    L.append("")
    L.append("WAN estimate (bytes / 100 Mbit/s + rounds × 80 ms, the paper's stated setting; rounds summed over "
             "every SPU run of the program):\n")
    L.append("| model | rounds | transfer (s) | round latency (s) | WAN estimate (min) |")
    L.append("|---|---|---|---|---|")
    for r in res["small"]:
        w = r["wan"]
        L.append(f"| {r['preset']} | {w['rounds']:.0f} | {w['transfer_s']:.1f} | {w['latency_s']:.1f} | "
                 f"{w['total_min']:.2f} |")
    L.append("")
    if res.get("gpt2"):
        L.append("## GPT-2 size (L=12, d=768, H=12, T=128) from one measured layer\n")
        L.append("`privlm pi measure PRESET " + " ".join(GPT2[:3]) + " --layers-measured 1 --vocab-measured 768` runs one full-width "
                 "block plus embedding, final LN and head under CHEETAH and scales the block by L=12 (all blocks "
                 "are identical); embedding and head run at vocabulary 768 (one 768-feature block) and are scaled by the "
                 "block count to 50257. Products run in 768-feature blocks and softmax/GELU in 4 pieces to fit in "
                 "memory (one unblocked [128×768]×[768×3072] secret product needs ~17 GB with both parties on one host).\n")
        L.append("| model | measured GB | paper GB | measured savings | paper savings | profile prediction GB | "
                 "WAN estimate (min) | paper latency (min) |")
        L.append("|---|---|---|---|---|---|---|---|")
        g0 = res["gpt2"][0]
        paper_lat = {"SM+LN+G": 8.21, "SM+LN+R": 6.06, "SM+ScFuFFN": 4.76}
        for g in res["gpt2"]:
            L.append(f"| {g['preset']} | {g['comm_gb']:.2f} | {g['paper_comm_gb']} | "
                     f"{g0['comm_gb'] / g['comm_gb']:.2f}× | {PAPER_SAVINGS.get(g['preset'], 1.0):.2f}× | "
                     f"{g['predicted_gb']:.2f} | {g['wan']['total_min']:.1f} | {paper_lat.get(g['preset'])} |")
        L.append("")
    L.append("## Why the numbers differ from the paper\n")
    L.append("\n".join(res["explanations"]))
    L.append("")
    L.append("## Usage\n")
    L.append("```\n# both parties on this machine (threads), CHEETAH; --protocol semi2k for SEMI2K (trusted dealer)\n"
             "privlm pi run RUN_DIR --prompt \"def f(x):\" [--json]\n"
             "# two OS processes over brpc on loopback\n"
             "privlm pi run RUN_DIR --prompt \"def f(x):\" --mode 2proc\n"
             "# two machines: the server keeps the weights, the client gets the public bundle\n"
             "privlm pi export RUN_DIR bundle/        # bundle/client -> client machine, bundle/server stays\n"
             "server$ privlm pi run RUN_DIR --mode 2proc --party 1 --T 12 --peer CLIENT:9000 --peer SERVER:9001\n"
             "client$ privlm pi run bundle/client --prompt \"...\" --mode 2proc --party 0 --peer CLIENT:9000 "
             "--peer SERVER:9001\n```\n")
    L.append("`--json` prints `top1_agree`, `max_logit_err`, `bytes_total`, `bytes_per_party`, `messages`, "
             "`wall_seconds`, `ops` (setup, embedding, layernorm, matmul, softmax, activation, head) and "
             "`census_ops`/`census_check` (the same numbers keyed by census entry, with the census's own counts). "
             "Public: the architecture, T, and the scalars the census treats as free (Eq. 8's β, SM(t)'s "
             "temperatures, leaky slopes); everything else of the model is secret. The client learns the logits "
             "of all T positions (`--head last`: only the next token's).\n")
    L.append("## Reproduce\n")
    L.append("```\nmake spu-setup\n.venv/bin/privlm pi calibrate --force          # writes src/privlm/pi/profiles/"
             "spu-cheetah-measured.json\n.venv/bin/python bench/pi_measure.py [--gpt2]\n"
             ".venv/bin/privlm pi run RUN_DIR --prompt \"...\" [--mode 2proc] [--json]\n```\n")
    return "\n".join(L)


def explanations(res: dict) -> list[str]:
    prof = res["profile"]["nonlinear"]
    fit = res["profile"]["provenance"]["fit"]

    def marg(op):
        return fit[op].get("bytes_per_element_marginal") or prof[op]["bytes_per_element"]
    small = {r["preset"]: r for r in res["small"]}
    sm = small.get("SM+ScFuFFN")
    share_sm = sm["ops"]["softmax"]["bytes"] / sm["bytes_online"] if sm else float("nan")
    base = small.get("SM+LN+G")
    ln_small = (base["ops"]["layernorm"]["bytes"] / base["ops"]["layernorm"]["elements"]) if base else float("nan")
    out = []
    g = {r["preset"]: r for r in res.get("gpt2", [])}
    if "SM+LN+G" in g:
        ops = g["SM+LN+G"]["ops"]
        lin = sum(ops.get(k, {}).get("bytes", 0) for k in ("matmul", "embedding", "head")) / 1e9
        out.append(
            f"- **GPT-2 baseline by op** (measured vs the paper-fit's split of 25.36 GB, SPEC §5.3(c)): softmax "
            f"{ops['softmax']['bytes'] / 1e9:.1f} vs 3.9 GB, GELU {ops['activation']['bytes'] / 1e9:.1f} vs 15.9 GB, "
            f"LayerNorm {ops['layernorm']['bytes'] / 1e9:.1f} vs 2.4 GB, linear + embedding + head {lin:.1f} vs "
            f"3.2 GB (incl. the per-token constant). The totals are close ({g['SM+LN+G']['comm_gb']:.1f} vs 25.3 GB) "
            "for different reasons: "
            f"our GELU and LayerNorm are cheaper, our softmax is {ops['softmax']['bytes'] / 1e9 / 3.872:.1f}× dearer. "
            "Softmax-only models keep the "
            "softmax, so their measured cost and savings move away from the paper's.")
    out += [
        "- **Secret × secret linear layers.** See above: CHEETAH in SPU 0.9.5 cannot keep the weights private to "
        "the server, so each matmul ships HE ciphertexts of a weight share as well as of the activation. This "
        "inflates matmul/embedding/head traffic relative to Bumblebee with plaintext weights.",
        "- **Small CHEETAH matmuls have a floor** of about one HE ciphertext batch per product (≈0.9 MB at the "
        "widths of the test models), so per-GFLOP costs only describe products near the calibration's sizes.",
        "- **Fixed setup.** ≈" + f"{res['profile']['fixed']['bytes'] / 1e6:.0f}" + " MB of one-time OT/HE setup "
        "dominates small models; savings ratios are therefore given on the online traffic.",
        f"- **Per-element costs.** softmax {prof['softmax']['bytes_per_element']:.0f} B, "
        f"LayerNorm {prof['layernorm']['bytes_per_element']:.0f} B, GELU {prof['gelu']['bytes_per_element']:.0f} B, "
        f"ReLU {prof['relu']['bytes_per_element']:.0f} B per element here vs 1666 / 1039 / 3363 / 0 B in the "
        "paper-fit (which cannot separate LN from ReLU: both always occur together in the published rows). "
        "SPU's generic GELU (tanh through exp and reciprocal) is not Bumblebee's specialised piecewise GELU, "
        "and the paper's softmax uses Bumblebee's optimised exp; both make our nonlinear costs differ.",
        "- **Why the savings are smaller than the paper's.** The small models keep GPT-2's ratio of softmax to "
        "FFN-activation elements (H·T / 4d = 0.5 in both), so the gap comes from the per-element costs: SPU's "
        "generic softmax (max by comparisons, exp by iterated squaring, division) costs "
        f"{marg('softmax'):.0f} B per element at scale, more than its GELU ({marg('gelu'):.0f} B), while the "
        "paper's Bumblebee softmax costs half its GELU (1666 vs 3363 B in the paper-fit). Removing GELU and "
        f"LayerNorm therefore leaves a larger softmax remainder here ({share_sm:.0%} of SM+ScFuFFN's online "
        "traffic is softmax).",
        "- **SM(t) is free.** SM(t)+ScFuFFN moves exactly the same bytes as SM+ScFuFFN: the temperature divides "
        "each logit row by a public scalar, as the census assumes (the paper prints identical costs too).",
        "- **LayerNorm's per-element fit is poor** (see the residual): CHEETAH refills its OT correlations in "
        "large batches and the refill is charged to whichever run triggers it, which is often a LayerNorm; in "
        "the small models LN runs cost ≈" + f"{ln_small:.0f}" + " B per element against the fitted "
        f"{prof['layernorm']['bytes_per_element']:.0f}. Totals are exact; per-op attribution of these refills is not.",
        "- **WAN estimate vs the paper's latency.** At the stated 100 Mbit/s, the paper's own 25.32 GB would take "
        "≥34 min just to transfer, yet it reports 8.21 min (SPEC §5.3(d)): its latencies cannot have been "
        "measured at that bandwidth. Our WAN column applies the stated setting literally, so it is several "
        "times the paper's latency by construction.",
        "- **Latency** here is measured with both parties on one 2-core host shared with other jobs (no network "
        "delay), so seconds are compute-bound and not comparable to the paper's 32-thread EPYC WAN runs; the WAN "
        "column combines our bytes and rounds with the paper's stated network instead.",
    ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpt2", action="store_true", help="also run the GPT-2-size one-layer measurements")
    ap.add_argument("--presets", nargs="*", default=PRESETS)
    ap.add_argument("--doc-only", action="store_true",
                    help="rebuild docs/pi-measured.md from bench/results (small models are not rerun)")
    args = ap.parse_args()
    prof = load_profile("spu-cheetah-measured")
    rounds = rounds_table(prof)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "spu_version": prof.provenance["spu_version"],
           "profile": prof.raw, "paper_fit": load_profile("paper-fit").raw, "rounds_by_op": rounds, "wan": WAN,
           "small": [], "gpt2": []}
    if args.doc_only:
        old = json.loads(RESULTS.read_text())
        res["date"], res["small"] = old["date"], old["small"]
        res["semi2k_rounds_check"] = old.get("semi2k_rounds_check")
        for r in res["small"]:  # re-predict with the current profile
            r["wan"] = wan_estimate(r["steps"], r["bytes_total"], rounds)
            r["predicted_bytes"] = predict(census(load_config(r["preset"], SMALL), SMALL_T),
                                           "spu-cheetah-measured").comm_gb * 1e9
    for preset in ([] if args.doc_only else args.presets):
        t0 = time.time()
        r = run_small(preset)
        r["wan"] = wan_estimate(r["steps"], r["bytes_total"], rounds)
        res["small"].append(r)
        print(f"{preset}: {r['bytes_total'] / 1e6:.1f} MB total, {r['bytes_online'] / 1e6:.1f} MB online, "
              f"predicted {r['predicted_bytes'] / 1e6:.1f} MB ({time.time() - t0:.0f} s)", flush=True)
    for preset in GPT2_PRESETS:
        path = gpt2_file(preset)
        if args.gpt2:  # the same as `privlm pi measure PRESET <GPT2 overrides> --out path`
            t0 = time.time()
            g = measure(preset, GPT2[:4], 128, 1, GPT2_VOCAB_MEASURED, "cheetah")
            path.write_text(json.dumps(g, indent=1) + "\n")
            print(f"{preset} GPT-2: {g['comm_gb']:.2f} GB ({time.time() - t0:.0f} s)", flush=True)
        if not path.exists():
            continue
        g = json.loads(path.read_text())
        g["predicted_gb"] = predict(census(load_config(preset, GPT2), 128), "spu-cheetah-measured").comm_gb
        L, vs = g["n_layer"], g["vocab_size"] / g["vocab_measured"]
        g["wan"] = wan_estimate(g["steps"], g["comm_gb"] * 1e9, rounds,
                                scale=lambda s, L=L, vs=vs: L if s["layer"] is not None else
                                (vs if s["kind"] in ("embedding", "head") else 1.0))
        g.pop("steps")
        res["gpt2"].append(g)
    if not res.get("semi2k_rounds_check"):
        res["semi2k_rounds_check"] = semi2k_rounds_check()
    res["explanations"] = explanations(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    DOC.write_text(write_doc(res) + "\n")
    base = res["small"][0]
    for r in res["small"][1:]:
        print(f"{r['preset']} vs {base['preset']}: online comm ratio {base['bytes_online'] / r['bytes_online']:.2f}x, "
              f"total {base['bytes_total'] / r['bytes_total']:.2f}x")
    print(f"wrote {DOC} and {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
