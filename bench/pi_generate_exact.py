"""Greedy private generation on trained models: the 2PC tokens of `privlm pi generate` beside plaintext greedy
generation (`privlm sample --temperature 0`), per run, prompt and SPU profile (issue "private text generation",
exact tokens).

    python bench/pi_generate_exact.py RUN_DIR [RUN_DIR ...] [--profiles default puma] [--new 16] [--prompts 2]

Each run directory is a trained privlm run (`make demo` writes three under runs/demo-*/). For each prompt of
PROMPTS the script runs `privlm pi generate RUN --prompt P --max-new-tokens N --spu-profile S --json` (in-process
simulator, CHEETAH) and compares its `new_tokens` with the plaintext greedy tokens the same command reports
(`plaintext_tokens`, `privlm sample --temperature 0`'s). At the first divergence the plaintext top-2 logit gap
after the common prefix is recomputed here from the torch model: a divergence is acceptable only where that gap
is a near-tie. Results: bench/results/pi_generate_exact.json (rows) and .md (the table), and the section between
the `generate-exact` markers of docs/pi-measured.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "pi-measured.md"
BEGIN, END = "<!-- privlm:begin generate-exact -->", "<!-- privlm:end generate-exact -->"
PROMPTS = ["import os\nimport sys\n\ndef main(", "class Parser:\n    def __init__(self, text):\n        self."]
NEAR_TIE = 0.01  # top-2 logit gap below which 18-bit fixed point can order the two tokens either way


def plaintext_gap(run_dir: str, prefix: list[int]) -> float:
    """The plaintext top-2 logit gap of the next token after ``prefix`` (torch, the run's own model)."""
    import torch

    from privlm.run import load_run
    run = load_run(run_dir, "cpu")
    with torch.no_grad():
        logits = run.model(torch.tensor([prefix])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def measure(run_dir: str, prompt: str, profile: str, new: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "privlm.cli", "pi", "generate", run_dir, "--prompt", prompt,
                           "--max-new-tokens", str(new), "--spu-profile", profile, "--json"],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"pi generate failed: {proc.stderr.strip()[-400:]}")
    doc = json.loads(proc.stdout)
    got, plain = doc["new_tokens"], doc["plaintext_tokens"]
    first = next((i for i in range(new) if got[i] != plain[i]), None)
    gap = None if first is None else plaintext_gap(run_dir, doc["prompt_tokens"] + plain[:first])
    return {"run": run_dir, "arch": Path(run_dir).name, "spu_profile": profile, "prompt_len": doc["prompt_len"],
            "new": new, "tokens_2pc": got, "tokens_plain": plain, "agree": got == plain,
            "first_divergence": first, "plaintext_gap_at_divergence": gap,
            "near_tie": None if gap is None else gap < NEAR_TIE,
            "decode_bytes_per_token": doc["decode_per_token"]["bytes"], "spu_version": doc["spu_version"]}


def table(rows: list[dict]) -> str:
    L = ["| run | SPU profile | prompt tokens | new tokens | 2PC = plaintext | first divergence | plaintext gap there "
         "| decode MB/token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        gap = "-" if r["plaintext_gap_at_divergence"] is None else \
            f"{r['plaintext_gap_at_divergence']:.4f} ({'near-tie' if r['near_tie'] else 'NOT a near-tie'})"
        L.append(f"| {r['arch']} | {r['spu_profile']} | {r['prompt_len']} | {r['new']} | "
                 f"{'yes' if r['agree'] else 'no'} | {div} | {gap} | {r['decode_bytes_per_token'] / 1e6:.2f} |")
    agree = sum(r["agree"] for r in rows)
    L += ["", f"{agree} of {len(rows)} generations equal plaintext greedy generation token for token"
          + ("" if agree == len(rows) else
             f"; every divergence is at a plaintext near-tie (gap < {NEAR_TIE})"
             if all(r["near_tie"] for r in rows if not r["agree"]) else
             "; at least one divergence is NOT at a plaintext near-tie") + "."]
    return "\n".join(L)


def write_doc(md: str, command: str) -> None:
    text = DOC.read_text()
    section = (f"{BEGIN}\n### Greedy generation on the trained demo models\n\nWritten by `{command}`: "
               f"`privlm pi generate` (simulator, CHEETAH) on runs trained by `make demo`, against plaintext greedy "
               f"generation of the same run.\n\n{md}\n{END}")
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--profiles", nargs="+", default=["default", "puma"])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N of PROMPTS (default all {len(PROMPTS)})")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        for profile in args.profiles:
            for prompt in PROMPTS[:args.prompts]:
                rows.append(measure(run, prompt, profile, args.new))
                r = rows[-1]
                print(f"{r['arch']} {profile} P={r['prompt_len']}: agree={r['agree']} "
                      f"divergence={r['first_divergence']} gap={r['plaintext_gap_at_divergence']}", flush=True)
    command = "python bench/pi_generate_exact.py " + " ".join(args.runs) + f" --profiles {' '.join(args.profiles)}" \
              f" --new {args.new} --prompts {args.prompts}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pi_generate_exact.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    md = table(rows)
    (RESULTS / "pi_generate_exact.md").write_text(f"# Greedy generation under 2PC vs plaintext\n\n`{command}`\n\n{md}\n")
    write_doc(md, command)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
