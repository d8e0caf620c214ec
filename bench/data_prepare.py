"""Data pipeline timings on the embedded stdlib corpus: cold build, warm (cached) build, encoding speed-up.

    .venv/bin/python bench/data_prepare.py [--seq-len 128] [--vocab-size 8192] [--out bench/results/data_prepare.json]

Cold = empty cache directory (walk + filter + hash the corpus, train the BPE, tokenize, write the memory-mapped
chunks); warm = the same call again (walk + hash, load the tokenizer, map the arrays). The encoding comparison
runs, in one process and alternating, the pipeline's batched `encode_batch_fast` (Rust threads) and a plain
per-document `encode` loop over the training split, and prints their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from privlm.config import DataConfig
from privlm.data import build_corpus, prepare_data
from privlm.data.tokenizer import corpus_encoder
from privlm.hostinfo import cpu_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of the encoding comparison")
    ap.add_argument("--out", default="bench/results/data_prepare.json")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]  # other processes on the machine inflate every timing below
    with tempfile.TemporaryDirectory(prefix="privlm-bench-cache-") as cache:
        cfg = DataConfig(seq_len=args.seq_len, vocab_size=args.vocab_size, cache_dir=cache)
        t0 = time.perf_counter()
        cold = prepare_data(cfg)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = prepare_data(cfg)
        warm_s = time.perf_counter() - t0
        assert warm.manifest["cache"]["tokens"] == "hit" and (warm.train == cold.train).all()

        m = cold.manifest
        corpus = build_corpus(cfg)
        texts = list(corpus.train.texts())
        enc = corpus_encoder(cold.tokenizer)
        batched, single = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n_b = sum(len(e.ids) for i in range(0, len(texts), 512)
                      for e in enc.encode_batch_fast(texts[i:i + 512], add_special_tokens=False))
            batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_s = sum(len(enc.encode(t, add_special_tokens=False).ids) for t in texts)
            single.append(time.perf_counter() - t0)
        assert n_b == n_s

    tr, va = m["splits"]["train"], m["splits"]["valid"]
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "load_average_before_after": [load_before, os.getloadavg()[0]]},
        "config": {"source": "stdlib", "seq_len": args.seq_len, "vocab_size": args.vocab_size},
        "train": {k: tr[k] for k in ("documents", "bytes", "tokens", "chunks", "tokens_per_byte")},
        "valid": {k: va[k] for k in ("documents", "bytes", "tokens", "chunks", "tokens_per_byte")},
        "skipped": m["skipped"],
        "cold_seconds": round(cold_s, 2), "warm_seconds": round(warm_s, 2),
        "cold_breakdown": m["timing"], "tokenizer_train_seconds": m["tokenizer"]["train_seconds"],
        "encode_batch_seconds": [round(x, 2) for x in batched], "encode_loop_seconds": [round(x, 2) for x in single],
    }
    print(f"machine: {result['machine']['cpu']} x{result['machine']['cores']}, 1-min load average "
          f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"train: {tr['documents']:,} files, {tr['bytes'] / 1e6:.2f} MB, {tr['tokens']:,} tokens "
          f"({tr['tokens_per_byte']:.4f} tokens/byte), {tr['chunks']:,} chunks of T={args.seq_len}")
    print(f"valid: {va['documents']:,} files, {va['bytes'] / 1e6:.2f} MB, {va['tokens']:,} tokens "
          f"({va['tokens_per_byte']:.4f} tokens/byte), {va['chunks']:,} chunks")
    print(f"skipped: {', '.join(f'{k}={v}' for k, v in m['skipped'].items() if v)}")
    t = m["timing"]
    print(f"cold build {cold_s:.2f} s (corpus {t['corpus_seconds']:.2f}, BPE training "
          f"{m['tokenizer']['train_seconds']:.2f}, tokenize {t['tokenize_seconds']:.2f}); warm build {warm_s:.2f} s "
          f"-> warm/cold {warm_s / cold_s:.3f}")
    print(f"encoding the train split: batched {min(batched):.2f} s vs per-document loop {min(single):.2f} s "
          f"-> speed-up {min(single) / min(batched):.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
