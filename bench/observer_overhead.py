"""Cost of the training observers per step, every observer at its default against all of them off, side by side.

    OMP_NUM_THREADS=1 python bench/observer_overhead.py [--config configs/cpu/small.yaml] [--preset SM+LN+G] \
        [--flight-every 1 4] [--steps 50 --rounds 7] [--out bench/results/observer_overhead.md] [key=value ...]

Trainers of the same config and initial weights train on the same random tokens, in one process:
  off        every observer off: no flight recorder (train.flight_steps=0), no entropy telemetry, no metrics.jsonl
             lines and no TensorBoard (a disabled Telemetry)
  defaults   every observer at its TrainConfig default (flight recorder, entropy telemetry every entropy_every
             steps, metrics.jsonl and TensorBoard every log_every steps)
  flight N   the defaults with train.flight_every=N, for each --flight-every N
Each timed run is ``--steps`` consecutive steps of the training loop's body (`Trainer.step_once` and the
telemetry calls `Trainer.run` makes after it; evaluation and checkpoints are not observers and are left out).
Timed runs alternate between the trainers, in reversed order every other round, so machine load hits all alike.
The overhead is the ratio of total step time over all rounds (the rare steps — a recorded step, an entropy step —
count in proportion); the median of the per-round ratios is printed beside it. ``--out`` writes the result, with
the command, the machine and its load average before and after, to a markdown file (replacing it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.train import Trainer
from privlm.train.telemetry import Telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import RandomTokens, machine, timed  # noqa: E402


def loop_step(trainer: Trainer) -> None:
    """One step of `Trainer.run`'s loop without evaluation and checkpoints."""
    t = trainer.cfg.train
    want_entropy = (trainer.step + 1) % t.entropy_every == 0
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss, grad_norm, tele = trainer.step_once(want_entropy)
    if tele is not None:
        trainer.telemetry.entropy(trainer.step, tele["head_entropy"], tele["nan_counts"], trainer.cfg.data.seq_len,
                                  tele["reg"])
    if trainer.step % t.log_every == 0:  # a log step: the loop reads the loss on the host only here
        trainer.telemetry.train(trainer.step, loss.item(), lr, trainer.tokens, 0.0, grad_norm.item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/small.yaml", help="YAML path or preset")
    ap.add_argument("--preset", default=None, help="override model.preset")
    ap.add_argument("--flight-every", type=int, nargs="*", default=[], help="extra recorder cadences to time")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    ap.add_argument("--out", default=None, help="write the result as markdown to this file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (for every trainer)")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    base = [f"train.device={args.device}", "train.max_steps=1000000"]
    if args.preset:
        base.append(f"model.preset={args.preset}")
    variants = {"off": ["train.flight_steps=0", "train.entropy_every=1000000000"], "defaults": []}
    variants.update({f"flight {e}": [f"train.flight_every={e}"] for e in args.flight_every})
    trainers: dict[str, Trainer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, over in variants.items():
                cfg = load_config(args.config, base + args.overrides + over)
                vocab = cfg.model.vocab_size = cfg.data.vocab_size
                T, b = cfg.data.seq_len, cfg.train.batch_size
                data = RandomTokens(max(64, 4 * b * cfg.train.grad_accum), T, vocab)
                trainers[name] = tr = Trainer(cfg, Path(tmp) / name.replace(" ", ""), quiet=True, data=data)
                if name == "off":
                    tr.telemetry.close()
                    tr.telemetry = Telemetry(None, False, True, cfg.train.max_steps)
            first = trainers["defaults"]
            t = first.cfg.train
            header = (f"# {cfg.model.preset} L{cfg.model.n_layer} d{cfg.model.n_embd} H{cfg.model.n_head} T{T} "
                      f"V{vocab}, batch {b} x accum {cfg.train.grad_accum}, {first.precision.device} "
                      f"({str(first.precision.dtype).replace('torch.', '')}), {first.model.num_params():,} params, "
                      f"{torch.get_num_threads()} thread(s); defaults: flight_steps={t.flight_steps} "
                      f"flight_every={t.flight_every} entropy_every={t.entropy_every} log_every={t.log_every}")
            print(header, flush=True)
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                for tr in trainers.values():
                    for _ in range(args.warmup):
                        loop_step(tr)
            names = list(trainers)
            seconds: dict[str, list[float]] = {n: [] for n in names}
            # the console lines of the metrics records are written (their cost counts) but not shown
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                for r in range(args.rounds):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        seconds[n].append(timed(lambda tr=trainers[n]: loop_step(tr), args.steps,
                                                first.precision.device))
        finally:
            for tr in trainers.values():
                tr.telemetry.close()
                for observer in tr.observers:
                    observer.close()
                tr.release()
    load_after = os.getloadavg()
    tokens = args.steps * b * cfg.train.grad_accum * T
    off_total = sum(seconds["off"])
    lines = [header]
    for n in names:
        total = sum(seconds[n]) / off_total
        median = statistics.median(s / o for s, o in zip(seconds[n], seconds["off"]))
        rate = statistics.median(tokens / s for s in seconds[n])
        lines.append(f"{n:<10} step time x{total:.4f} of off (median per round x{median:.4f}), {rate:,.0f} tokens/s "
                     f"(rounds: {', '.join(f'{tokens / s:,.0f}' for s in seconds[n])})")
    load = (f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
            f"after {' '.join(f'{x:.2f}' for x in load_after)} (1/5/15 min)")
    lines.append(load)
    print("\n".join(lines[1:]))
    if args.out:
        cmd = "python bench/observer_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
        threads = os.environ.get("OMP_NUM_THREADS")
        Path(args.out).write_text(
            "# Training observers: cost per step (bench/observer_overhead.py)\n\n"
            "Every observer at its default (flight recorder, entropy telemetry, metrics.jsonl and TensorBoard) "
            "against all of them off, same config, initial weights and tokens, timed runs alternating in one "
            "process; ratio = total step time over all rounds relative to \"off\".\n\n"
            f"`{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{cmd}`\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; {load}\n\n"
            "```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
