"""The values trained models feed each SPU kernel, checked against the range each kernel's error bound is tested on.

    .venv/bin/python bench/pi_kernel_ranges.py RUN_DIR [RUN_DIR ...] [--sequences 8]   # measure, then the doc
    .venv/bin/python bench/pi_kernel_ranges.py                                         # rebuild the doc

Runs each model in plaintext torch over its first ``--sequences`` validation chunks with hooks on the values each
nonlinear op receives (`privlm.spu.ranges.measure_model`) and checks them against the range each kernel's error
bound is tested on (`privlm.spu.kernels.ranges_tested`, the same for every SPU profile): per model, op and
quantity, the range over every layer, the layer that reaches furthest, and the share of values outside the tested
range. With ``--spu-check`` it also runs every profile's kernels under 2PC on that layer's values (one sequence;
`python -m privlm.spu.kernels --inputs`, in the SPU environment) against the numpy reference and the kernel's
bound. Writes bench/results/pi_kernel_ranges.json (one entry per run, replaced when measured again),
bench/results/pi_kernel_ranges.md and the 'kernel-ranges' region of docs/pi-measured.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from privlm.fileio import atomic_write_text
from privlm.spu.kernels import DEFAULT_KERNELS, SOFTMAX_CLIP, error_bound, ranges_tested
from privlm.spu.ranges import measure_model, model_kernel_inputs, widest_layer
from privlm.spu.spu_profile import available_spu_profiles, load_spu_profile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT_JSON = RESULTS / "pi_kernel_ranges.json"
OUT_MD = RESULTS / "pi_kernel_ranges.md"
REGION = "kernel-ranges"
FORMAT = "privlm-kernel-ranges/1"
SPU_CHECK_ELEMENTS = 1 << 16  # per op in the 2PC check: a whole layer of a demo model (4 heads x 128 x 128)


def measure_run(run_dir: str, sequences: int, spu_check: bool) -> dict:
    from privlm.data import prepare_data
    from privlm.spu.export import load_model

    cfg, model, _ = load_model(Path(run_dir))
    data_cfg = dataclasses.replace(cfg.data, tokenizer=str(Path(run_dir) / "tokenizer.json"))
    chunks = prepare_data(data_cfg, None).valid
    if len(chunks) < sequences:
        raise SystemExit(f"{run_dir}: its validation split has {len(chunks)} chunks, fewer than --sequences={sequences}")
    ids = torch.as_tensor(np.array(chunks[:sequences]), dtype=torch.long)
    m = cfg.model
    entry = {"run": run_dir, "preset": m.preset, "shape": f"L{m.n_layer} d{m.n_embd} H{m.n_head}",
             "sequences": sequences, "T": int(ids.shape[1]), "ops": measure_model(model, ids)}
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():  # what the model was trained on: its activations' ranges depend on it
        sm = json.loads(summary.read_text())
        entry["trained"] = {k: sm.get(k) for k in ("steps", "tokens_trained", "final_ppl", "unigram_ppl")}
    if spu_check:
        entry["spu_check"] = kernel_errors_on_model(model, ids, entry["ops"])
    return entry


def kernel_errors_on_model(model, ids: torch.Tensor, ops: dict) -> dict:
    """Each profile's kernels under 2PC (`python -m privlm.spu.kernels --inputs`, both parties in one process) on
    what the model feeds them in the layer that reaches furthest toward or beyond the ends of the tested range (`ranges.furthest`), one sequence (at most
    SPU_CHECK_ELEMENTS values per op): max |2PC - numpy reference| against the kernel's bound."""
    import subprocess
    import tempfile

    from privlm.spu.launcher import spu_python

    arrays, chosen = model_kernel_inputs(model, ids, ops, SPU_CHECK_ELEMENTS)
    with tempfile.TemporaryDirectory(prefix="privlm-kernel-ranges-") as tmp:
        path = Path(tmp) / "inputs.npz"
        np.savez(path, **arrays)
        proc = subprocess.run([str(spu_python()), "-m", "privlm.spu.kernels", "--inputs", str(path),
                               *available_spu_profiles()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"privlm.spu.kernels --inputs failed: {proc.stderr.strip()[-300:]}")
    return {"layers": chosen, "profiles": json.loads(proc.stdout.strip().splitlines()[-1])}


GPT2_TRAIN = ("model.n_layer=12 model.n_embd=768 model.n_head=12 train.max_steps=30 train.batch_size=8 train.lr=0.001 "
              "train.warmup_frac=0.1 train.eval_every=30 train.eval_max_batches=8 train.entropy_every=30 "
              "train.save_every=30 train.flight_steps=0")
REPRODUCE = [".venv/bin/python bench/pi_kernel_ranges.py runs/demo-final/sm-ln-g runs/demo-final/sm-scfuffn "
             "runs/demo-final/ereg-sm-t-scfuffn --sequences 8 --spu-check"]
GPT2_MODELS = [f".venv/bin/privlm train runs/demo-final/{m}/config.yaml {GPT2_TRAIN} --out runs/gpt2-{m}"
               for m in ("sm-ln-g", "sm-scfuffn")] + [
    ".venv/bin/python bench/pi_kernel_ranges.py runs/gpt2-sm-ln-g runs/gpt2-sm-scfuffn --sequences 8 --spu-check"]


def kernels_by_profile() -> dict[str, dict[str, dict]]:
    """profile -> op -> the kernel it runs, its fraction bits and its tested error bound."""
    out = {}
    for name in available_spu_profiles():
        prof = load_spu_profile(name)
        out[name] = {}
        for op in ("softmax", "gelu", "layernorm"):
            k = prof.kernels.get(op, DEFAULT_KERNELS.get(op))
            bits = int(prof.runtime_doc(op)["fxp_fraction_bits"])
            out[name][op] = {"kernel": k, "fraction_bits": bits, "bound": error_bound(op, k, bits)}
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def table(entries: list[dict]) -> list[str]:
    L = ["| model | shape | sequences × T | op | quantity | measured range | layer reaching furthest | tested range | "
         "outside the tested range |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        for op, qs in e["ops"].items():
            for qname, q in qs.items():
                w = widest_layer(q, qname)
                tested = "— (exact comparison)" if q["tested"] is None else \
                    f"[{fmt(q['tested'][0])}, {fmt(q['tested'][1])}]"
                outside = "—" if q["outside"] is None else \
                    f"{q['outside']:,} of {q['values']:,} ({100 * q['outside'] / q['values']:.2f} %)"
                L.append(f"| {Path(e['run']).name} | {e['shape']} | {e['sequences']} × {e['T']} | {op} | {qname} | "
                         f"[{fmt(q['min'])}, {fmt(q['max'])}] | {w}: [{fmt(q['layers'][w][0])}, {fmt(q['layers'][w][1])}] | "
                         f"{tested} | {outside} |")
    return L


def findings(entries: list[dict]) -> list[str]:
    out = []
    for e in entries:
        bad = [(op, qn, q) for op, qs in e["ops"].items() for qn, q in qs.items() if q["outside"]]
        name = Path(e["run"]).name
        if not bad:
            out.append(f"- {name}: every value of every op lies inside its kernel's tested range.")
            continue
        for op, qn, q in bad:
            lo, hi = q["tested"]
            side = []
            if q["min"] < lo:
                side.append(f"down to {fmt(q['min'])} (tested from {fmt(lo)})")
            if q["max"] > hi:
                side.append(f"up to {fmt(q['max'])} (tested to {fmt(hi)})")
            layers = [k for k, (a, b) in q["layers"].items() if a < lo or b > hi]
            note = ""
            if (op, qn) == ("softmax", "exp_input") and q["max"] <= hi:
                note = (f" The clipped kernel (paper-era, bumblebee-ring32) sets exp(z) to 0 for z ≤ {SOFTMAX_CLIP:g} "
                        f"by a comparison, whatever z; the others' exponential receives these values.")
            out.append(f"- {name}: {op} {qn} leaves the tested range {' and '.join(side)} in "
                       f"{100 * q['outside'] / q['values']:.2f} % of its values (layers {', '.join(layers)}).{note}")
    return out


def check_findings(entries: list[dict]) -> list[str]:
    out = []
    for e in entries:
        c = e.get("spu_check")
        if not c:
            continue
        for op, label in c["layers"].items():
            over = [(p, r) for p, ops in c["profiles"].items() for r in [ops[op]] if r["beyond_bound"]]
            within = [p for p, ops in c["profiles"].items() if not ops[op]["beyond_bound"]]
            if over:
                out.append(f"- {Path(e['run']).name}, {op} (layer {label}): beyond the kernel's bound under "
                           + "; ".join(f"{p} ({r['kernel']}: max error {r['max_abs_err']:.2g} > {r['bound']:g}, "
                                       f"{r['beyond_bound']:,} of {r['elements']:,} values)" for p, r in over)
                           + (f"; within it under {', '.join(within)}." if within else "."))
            else:
                out.append(f"- {Path(e['run']).name}, {op} (layer {label}): within every profile's kernel bound.")
    return out


def write(entries: list[dict]) -> None:
    kernels = kernels_by_profile()
    tested = {op: ranges_tested(op) for op in ("softmax", "gelu", "layernorm")}
    atomic_write_text(OUT_JSON, json.dumps({"format": FORMAT, "tested": tested, "kernels": kernels,
                                            "runs": entries}, indent=1) + "\n")
    L = ["## Kernel input ranges on trained models (`bench/pi_kernel_ranges.py`)\n",
         "Each model in plaintext over its first validation chunks, with hooks on the values each nonlinear op "
         "receives; *tested range* is the range of the same quantity over the inputs on which every kernel's 2PC "
         "error bound is tested (`privlm.spu.kernels.ranges_tested`, the same inputs for every SPU profile). "
         "*exp input* is z = s − rowmax over every entry of the T × T logits, the causally masked ones at the "
         "programs' fill −100 included; *row sum* is Σ exp(z), what the division (`default`) or the one reciprocal "
         "per row (`puma`, `paper-era`, `bumblebee-ring32`) receives; *variance* is LayerNorm's, what the rsqrt "
         "receives. A value outside the tested range is untested, not necessarily inaccurate: the accuracy table "
         "above measures what it does to the logits.\n",
         "| SPU profile | " + " | ".join(f"{op} kernel (bound)" for op in ("softmax", "gelu", "layernorm")) + " |",
         "|---|---|---|---|"]
    for name, ks in kernels.items():
        cells = [f"{k['kernel']}{'' if k['fraction_bits'] == 18 else ' at ' + str(k['fraction_bits']) + ' fraction bits'}"
                 f" ({k['bound']:g})" for k in ks.values()]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("| model | shape | training steps | tokens trained | validation PPL (unigram PPL) |")
    L.append("|---|---|---|---|---|")
    for e in entries:
        t = e.get("trained") or {}
        ppl = "—" if t.get("final_ppl") is None else f"{t['final_ppl']:.1f} ({t.get('unigram_ppl') or 0:.1f})"
        L.append(f"| {Path(e['run']).name} | {e['shape']} | {t.get('steps', '—')} | {t.get('tokens_trained') or 0:,} | {ppl} |")
    L.append("")
    L += table(entries)
    L.append("")
    L += findings(entries)
    checked = [e for e in entries if e.get("spu_check")]
    if checked:
        L += ["", "Each profile's kernels under 2PC (both parties in one process) on what the model feeds them in the "
              "layer named (the one reaching furthest toward or beyond the ends of the tested range; one sequence, the whole "
              f"heads or rows reaching furthest, up to {SPU_CHECK_ELEMENTS:,} values), against the numpy reference:\n",
              "| model | op (layer) | values | SPU profile | kernel | max abs error | bound | beyond the bound |",
              "|---|---|---|---|---|---|---|---|"]
        for e in checked:
            c = e["spu_check"]
            for op, label in c["layers"].items():
                for prof, ops in c["profiles"].items():
                    r = ops[op]
                    L.append(f"| {Path(e['run']).name} | {op} ({label}) | {r['elements']:,} | {prof} | {r['kernel']}"
                             f"{'' if r['fraction_bits'] == 18 else ' at ' + str(r['fraction_bits']) + ' bits'} | "
                             f"{r['max_abs_err']:.2g} | {r['bound']:g} | {r['beyond_bound']:,} |")
        L += [""] + check_findings(entries)
    L += ["", "Reproduce:", "", "```", *REPRODUCE, "```", "",
          "GPT-2-size models (the demo's configs at L12 d768 H12, trained briefly on CPU) are added to the tables by:",
          "", "```", *GPT2_MODELS, "```"]
    body = "\n".join(L) + "\n"
    atomic_write_text(OUT_MD, body)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pi_measure import DOC, splice
    page = f"<!-- privlm:begin {REGION} -->\n{body}<!-- privlm:end {REGION} -->"
    atomic_write_text(DOC, splice(DOC.read_text(), page, REGION))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run directories to measure (none: rebuild the doc from the results)")
    ap.add_argument("--sequences", type=int, default=8, help="validation chunks per model")
    ap.add_argument("--spu-check", action="store_true",
                    help="also run each profile's kernels under 2PC on the model's own inputs (SPU environment)")
    args = ap.parse_args()
    old = json.loads(OUT_JSON.read_text())["runs"] if OUT_JSON.exists() else []
    entries = [e for e in old if e["run"] not in args.runs]
    for run in args.runs:
        entries.append(measure_run(run, args.sequences, args.spu_check))
    write(entries)
    print(f"wrote {OUT_JSON}, {OUT_MD}, the '{REGION}' region of docs/pi-measured.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
