"""`privlm data [CONFIG.yaml|PRESET] [key=value ...] [--out DIR] [--json]`

Builds (or finds in the cache) the tokenized train/valid(/heldout) splits of a config's ``data`` section and prints
what was built: documents, bytes, tokens, chunks, skipped files per reason, tokenizer and timings. With
``--out DIR`` it writes ``tokenizer.json`` and ``data_manifest.json`` there, as a training run would.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlm.config import load_config, split_spec


def summary_lines(m: dict) -> list[str]:
    tok = m["tokenizer"]
    lines = [f"source {m['config']['source']}" + (f" (valid: {m['config']['valid_source']})"
                                                    if m["config"]["valid_source"] else ""),
             f"{'split':<7} {'docs':>8} {'MB':>8} {'tokens':>11} {'tok/byte':>8} {'chunks':>8}  T={m['seq_len']} "
             f"({m['chunking']})"]
    for name in m["splits"]:  # train, valid and, with data.heldout_fraction > 0, heldout
        s = m["splits"][name]
        lines.append(f"{name:<7} {s['documents']:>8,} {s['bytes'] / 1e6:>8.2f} {s['tokens']:>11,} "
                     f"{s['tokens_per_byte'] or 0:>8.4f} {s['chunks']:>8,}")
    skipped = ", ".join(f"{k}={v}" for k, v in m["skipped"].items() if v) or "none"
    lines.append(f"skipped: {skipped}")
    trained = (f", trained in {tok['train_seconds']:.2f} s" if tok.get("train_seconds") is not None else "")
    lines.append(f"tokenizer {tok['kind']} vocab {tok['vocab_size']:,} eos {tok['eos_token']!r}={tok['eos_id']} "
                 f"(cache {tok.get('cache')}{trained})")
    t = m["timing"]
    lines.append(f"time: corpus {t['corpus_seconds']:.2f} s, tokenizer {t['tokenizer_seconds']:.2f} s, "
                 f"tokenize {t['tokenize_seconds']:.2f} s, total {t['total_seconds']:.2f} s "
                 f"(token cache {m['cache']['tokens']}: {m['cache']['dir']})")
    return lines


def run(args: argparse.Namespace) -> int:
    from privlm.data import prepare_data

    spec, overrides = split_spec(args.spec, args.overrides)
    cfg = load_config(spec, overrides)
    data = prepare_data(cfg.data, Path(args.out) if args.out else None)
    if args.json:
        brief = json.loads(json.dumps(data.manifest))
        for split in brief["splits"].values():
            split.pop("files", None)
        print(json.dumps(brief, indent=1))
    else:
        print("\n".join(summary_lines(data.manifest)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=None, help="YAML config or preset name (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=256")
    p.add_argument("--out", default=None, help="write tokenizer.json and data_manifest.json into this directory")
    p.add_argument("--json", action="store_true", help="print the data manifest (without file lists) as JSON")
    p.set_defaults(func=run)
