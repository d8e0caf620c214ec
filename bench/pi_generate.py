"""Private generation: bytes, messages and rounds per new token with the secret-shared KV cache
(`privlm pi generate`) against recomputing the whole prefix for every token (`privlm pi run --head last` at
each length), for SM+LN+G and SM+ScFuFFN at the demo's shape (L4 H4 d128, V 2048, random
weights: bytes and rounds do not depend on the weights), prompts of 32 and 64 tokens, CHEETAH, in-process sim.

    python bench/pi_generate.py --new 4              # full run -> bench/results/pi_generate.json + .md
    python bench/pi_generate.py --new 2 --prompts 64 --archs SM+LN+G --out /tmp/a.json &   # or in parallel ...
    python bench/pi_generate.py --new 2 --prompts 64 --archs SM+ScFuFFN --out /tmp/b.json
    python bench/pi_generate.py --merge /tmp/a.json /tmp/b.json                             # ... then merged
    python bench/pi_generate.py --new 3 --prompts 8 --small --out /tmp/x.json   # a quick check of the script
    python bench/pi_generate.py --wan 100mbit:80ms --prompts 32 --archs SM+ScFuFFN --new 4 --only-wan   # root

Rows: arch, spu_profile, prompt_len, mode (cache | recompute), position (of the token fed in; for the prefill
row the last prompt position), bytes_per_token, messages_per_token, rounds_per_token (party 0's send actions
in SPU's runs: every round needs at least one, so this bounds the sequential message flights from above; exact
for SEMI2K), online_seconds. `recompute` rows are full forwards over position+1 tokens with only the last logits.
Both modes exclude the token choice (the greedy argmax under 2PC and the reveal of the id: the same for both;
`token_choice` of the cache rows), and the one-time setup. Bytes and messages do not depend on the machine's
load; seconds do (cache rows' seconds include the token choice).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DEMO = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.vocab_size=2048", "model.block_size=128",
        "data.seq_len=128"]
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.vocab_size=64", "model.block_size=32",
         "data.seq_len=32"]


def _cli(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "privlm.cli", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"privlm {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _run_dir(path: Path, arch: str, sizes: list[str]) -> Path:
    import torch
    from safetensors.torch import save_model

    from privlm.config import load_config, to_yaml
    from privlm.model import GPT

    path.mkdir(parents=True)
    cfg = load_config(arch, sizes)
    (path / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    save_model(GPT(cfg.model), str(path / "model.safetensors"))
    from tiny_run import word_tokenizer  # the run format needs a tokenizer; the bench passes token ids

    word_tokenizer(path / "tokenizer.json")
    return path


def measure(arch: str, P: int, new: int, profile: str, sizes: list[str], work: Path, wan: str | None = None):
    run = _run_dir(work / "run", arch, sizes)
    prompt = ",".join(str(1 + (7 * i) % 60) for i in range(P))
    rows = []
    args = ["pi", "generate", str(run), "--tokens", prompt, "--max-new-tokens", str(new), "--spu-profile", profile,
            "--json"]
    if wan is not None:
        args += ["--mode", "2proc", "--wan", wan]
    doc = _cli(*args)
    base = {"arch": arch, "spu_profile": profile, "prompt_len": P, "mode_run": doc["mode"]}
    for r in doc["per_token"]:
        c = r["token_choice"]  # argmax + reveal: the same for both modes, so kept apart
        rows.append({**base, "mode": "cache", "program": r["program"], "position": r["position"],
                     "bytes_per_token": r["bytes"] - c["bytes"], "messages_per_token": r["messages"] - c["messages"],
                     "rounds_per_token": r["send_actions"] - c["send_actions"], "online_seconds": r["online_seconds"],
                     "token_choice": c})
    if wan is not None:
        rows[-1]["wan"] = doc["wan"]
        return rows
    for j in range(1, new):  # recompute: the forward over the P + j tokens that decode step j attends to
        T = P + j
        keep = work / f"keep-{arch}-{P}-{T}"
        one = _cli("pi", "run", str(run), "--tokens", ",".join([prompt] + ["1"] * j), "--head", "last",
                   "--spu-profile", profile, "--keep", str(keep), "--json")
        steps = json.loads((keep / "result.json").read_text())["steps"]
        sends = sum(s.get("send_actions", 0) for s in steps if s["kind"] != "setup")
        rows.append({**base, "mode": "recompute", "program": "forward", "position": T - 1,
                     "bytes_per_token": one["bytes_online_excluding_setup"],
                     "messages_per_token": one["messages"] - one["ops"]["setup"]["messages"],
                     "rounds_per_token": sends, "online_seconds": one["online_seconds"]})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per (arch, profile, prompt) the mean decode-step cost with the cache vs recomputation."""
    out = ["| arch | SPU profile | prompt | mode | MB / token | messages / token | rounds (p0 sends) / token | "
           "online s / token | token choice: MB / p0 sends |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["arch"], r["spu_profile"], r["prompt_len"]) for r in rows if "wan" not in r})
    for k in keys:
        ratio = {}
        for mode in ("cache", "recompute"):
            sel = [r for r in rows if (r["arch"], r["spu_profile"], r["prompt_len"]) == k and r["mode"] == mode
                   and r["program"] != "prefill" and "wan" not in r]
            if not sel:
                continue
            avg = {f: sum(r[f] for r in sel) / len(sel) for f in ("bytes_per_token", "messages_per_token",
                                                                  "rounds_per_token", "online_seconds")}
            ratio[mode] = avg
            choice = ""
            if mode == "cache":
                cb = sum(r["token_choice"]["bytes"] for r in sel) / len(sel)
                cs = sum(r["token_choice"]["send_actions"] for r in sel) / len(sel)
                choice = f"{cb / 1e6:.2f} / {cs:.0f}"
            out.append(f"| {k[0]} | {k[1]} | {k[2]} | {mode} | {avg['bytes_per_token'] / 1e6:.2f} | "
                       f"{avg['messages_per_token']:.0f} | {avg['rounds_per_token']:.0f} | "
                       f"{avg['online_seconds']:.2f} | {choice} |")
        if len(ratio) == 2:
            r, c = ratio["recompute"], ratio["cache"]
            out.append(f"| {k[0]} | {k[1]} | {k[2]} | recompute / cache | "
                       f"{r['bytes_per_token'] / c['bytes_per_token']:.1f}x | "
                       f"{r['messages_per_token'] / c['messages_per_token']:.1f}x | "
                       f"{r['rounds_per_token'] / c['rounds_per_token']:.1f}x | | |")
    for r in rows:
        if "wan" in r:
            w = r["wan"]
            out.append(f"\nWAN {w['rate']}, {w['one_way_delay_ms']:g} ms one way, {r['arch']} prompt {r['prompt_len']}:"
                       f" {w['measured_seconds_per_token']:.2f} s per decoded token measured, "
                       f"{w['estimate_seconds_per_token']:.2f} s estimated (bytes / rate + p0 sends x delay)")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["SM+LN+G", "SM+ScFuFFN"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--new", type=int, default=4, help="new tokens per prompt (default 4)")
    ap.add_argument("--spu-profile", default="puma")
    ap.add_argument("--small", action="store_true", help="a tiny model (checks the script, not the claim)")
    ap.add_argument("--wan", help="also one 2proc run over the emulated WAN (RATE:DELAY; root)")
    ap.add_argument("--only-wan", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pi_generate.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="write --out (and its table) from the rows of these result files (runs done in parallel)")
    args = ap.parse_args()
    sizes = SMALL if args.small else DEMO
    out = Path(args.out)
    kept = json.loads(out.read_text()) if args.only_wan and out.exists() else {"rows": []}
    rows = kept["rows"]
    if args.merge:
        docs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for d in docs for r in d["rows"]]
        command = " ; ".join(d["command"] for d in docs) + " ; python bench/pi_generate.py " + " ".join(sys.argv[1:])
        out.write_text(json.dumps({"command": command, "sizes": docs[0]["sizes"], "rows": rows}, indent=1))
        md = table(rows)
        out.with_suffix(".md").write_text(f"<!-- written by {command} -->\n" + md)
        print(md)
        return 0
    command = "python bench/pi_generate.py " + " ".join(sys.argv[1:])
    if kept.get("command"):  # --only-wan keeps the other rows, and the commands that wrote them
        command = " ; ".join(c for c in kept["command"].split(" ; ") if "--only-wan" not in c) + " ; " + command

    def write() -> str:  # after every measurement: an interrupted run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "sizes": sizes, "rows": rows}, indent=1))
        md = table(rows)
        out.with_suffix(".md").write_text(f"<!-- written by {command} -->\n" + md)
        return md

    with tempfile.TemporaryDirectory(prefix="privlm-bench-gen-") as tmp:
        if not args.only_wan:
            for arch in args.archs:
                for P in args.prompts:
                    rows += measure(arch, P, args.new, args.spu_profile, sizes, Path(tmp) / f"{arch}-{P}")
                    write()
                    print(f"{arch} prompt {P}: done", flush=True)
        if args.wan:
            rows = [r for r in rows if "wan" not in r]
            rows += [r for r in measure(args.archs[0], args.prompts[0], args.new, args.spu_profile, sizes,
                                        Path(tmp) / "wan", wan=args.wan) if "wan" in r]
    print(write())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
