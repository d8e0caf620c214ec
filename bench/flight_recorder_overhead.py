"""Cost of the divergence flight recorder per training step, measured side by side in one process.

    OMP_NUM_THREADS=1 python bench/flight_recorder_overhead.py --config configs/sweeps/cpu-study-v2.yaml \
        --preset SM+LN+G [--every 1 10] [--steps 5 --rounds 5] [--out bench/results/flight_recorder_overhead.md]

Three (or more) trainers of the same config and initial weights run the real training step
(`Trainer.step_once`) on the same random tokens: the recorder off (`train.flight_steps=0`), and on with each
``--every`` cadence. Timed runs alternate between them so machine load hits all alike; the ratio is the
median over rounds of the per-round ratio to "off". The "off" tokens/s is also the training throughput used to
size the CPU study (one thread per run, as `privlm sweep --jobs 2` runs them).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import RandomTokens, append_record, timed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/small.yaml", help="YAML path or preset")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 10], help="recorder cadences to time")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)

    base = [f"train.device={args.device}", "train.max_steps=100000", "train.log_every=100000",
            "train.eval_every=100000", "train.save_every=100000", "train.entropy_every=100000"]
    if args.preset:
        base.append(f"model.preset={args.preset}")
    variants = {"off": ["train.flight_steps=0"]}
    variants.update({f"every {e}": ["train.flight_steps=64", f"train.flight_every={e}"] for e in args.every})
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, over in variants.items():
            cfg = load_config(args.config, base + over + args.overrides)
            vocab = cfg.data.vocab_size
            cfg.model.vocab_size = vocab
            T, b = cfg.data.seq_len, cfg.train.batch_size
            data = RandomTokens(max(64, 4 * b * cfg.train.grad_accum * (args.warmup + args.steps)), T, vocab)
            trainers[name] = Trainer(cfg, Path(tmp) / name.replace(" ", ""), quiet=True, data=data)
        first = next(iter(trainers.values()))
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        header = (f"# {cfg.model.preset} L{cfg.model.n_layer} d{cfg.model.n_embd} H{cfg.model.n_head} "
                  f"T{cfg.data.seq_len} V{vocab}, batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}, "
                  f"{first.precision.device}, {first.model.num_params():,} params, {torch.get_num_threads()} thread(s)")
        print(header, flush=True)
        for t in trainers.values():
            for _ in range(args.warmup):
                t.step_once()
        seconds = {n: [] for n in trainers}
        names = list(trainers)
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                seconds[n].append(timed(trainers[n].step_once, args.steps, first.precision.device))
        for t in trainers.values():
            t.telemetry.close()
    lines = []
    for n in names:
        rate = statistics.median(args.steps * tokens_per_step / s for s in seconds[n])
        rel = statistics.median(s / o for s, o in zip(seconds[n], seconds["off"]))
        lines.append(f"{n:<9} {rate:>9,.0f} tokens/s  step time x{rel:.3f} of off  "
                     f"(runs: {', '.join(f'{args.steps * tokens_per_step / s:,.0f}' for s in seconds[n])})")
    print("\n".join(lines))
    if args.out:
        append_record(args.out, "flight_recorder_overhead.py", argv, [header, *lines])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
