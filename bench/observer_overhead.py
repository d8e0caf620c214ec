"""Cost of the training observers per step, every observer at its default against all of them off, side by side.

    OMP_NUM_THREADS=1 python bench/observer_overhead.py [--config configs/cpu/small.yaml] [--preset SM+LN+G] \
        [--flight-every 1 4] [--steps 50 --rounds 7] [--out bench/results/observer_overhead.md] [key=value ...]

Trainers of the same config and initial weights train on the same random tokens, in one process:
  off        privlm's train spec without observers (`privlm.train.spec.UNOBSERVED`): no flight recorder, no
             entropy log, no metrics.jsonl lines and no TensorBoard
  defaults   every observer at its TrainConfig default (`PRIVLM`: telemetry, the entropy log every entropy_every
             steps, the flight recorder every flight_every steps)
  flight N   the defaults with train.flight_every=N, for each --flight-every N
Each timed run is ``--steps`` consecutive steps of the training loop's body (`Trainer.step_once` and the
log records `Trainer.run` makes after it; evaluation and checkpoints are not observers and are left out).
Timed runs alternate between the trainers, in reversed order every other round, so machine load hits all alike.
The overhead is the ratio of total step time over all rounds (the rare steps — a recorded step, an entropy step —
count in proportion); the median of the per-round ratios is printed beside it. ``--out`` writes the result, with
the command, the machine and its load average before and after, to a markdown file (replacing it).

Then (``--event-rounds``, 0 skips it; ``--rounds 0`` skips the side-by-side runs) it measures what each
observer's event costs one step, on one trainer without observers:
rounds of four steps in rotating order — a plain step, a step the flight recorder records, a step whose entropy
the entropy log takes and writes, and a step followed by a log record (host reads, metrics.jsonl, TensorBoard) —
each timed by the CPU time of this thread (`time.thread_time`: with one torch thread that is the step's own
work, which other processes on the machine slow down far less than the wall clock). Per event: the median over
rounds of (event step - plain step of the same round), the CPU time spent inside the observer's own calls
(hooks included), and the number of operators the step ran (torch.profiler, one step each, a count that no load
changes). The expected overhead of a cadence set is sum(event cost / its cadence) / plain step, printed for the
defaults, for half and twice the default recorder cadence and for every --flight-every.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from privlm.config import load_config
from privlm.train import Trainer
from privlm.train.flight_recorder import FlightRecorder
from privlm.train.spec import PRIVLM, UNOBSERVED
from privlm.train.telemetry import EntropyLog, Telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import RandomTokens, machine, timed  # noqa: E402


def loop_step(trainer: Trainer, log: bool = False) -> None:
    """One step of `Trainer.run`'s loop without evaluation and checkpoints (``log``: a log step whatever the
    cadence)."""
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss, grad_norm = trainer.step_once()
    if log or trainer.step % trainer.cfg.train.log_every == 0:  # the loop reads the loss on the host only here
        record = (trainer.step, loss.item(), lr, trainer.tokens, 0.0, grad_norm.item())
        for observer in trainer.observers:
            observer.logged(*record)


class CallTimer:
    """The CPU time spent inside an observer's calls, hooks included (its methods wrapped on the instance)."""

    METHODS = ("wants_entropy", "begin", "micro_batch", "end", "nonfinite", "stepped", "logged", "message",
               "_on_qk", "_on_attention", "_on_residual")

    def __init__(self, observer):
        self.seconds = 0.0
        for name in self.METHODS:
            if hasattr(observer, name):
                setattr(observer, name, self._wrap(getattr(observer, name)))

    def _wrap(self, fn):
        def timed_call(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0
        return timed_call


def operator_count(fn) -> int:
    """Operators (ATen calls) one call of ``fn`` runs: a count of the work that no machine load changes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def events(args, cfg, data, tmp: Path) -> list[str]:
    """Per-event cost on one trainer without observers (the module docstring's second mode)."""
    t = cfg.train  # the cadences the expected overheads are computed for
    # the loop's own host reads (log, eval, save steps) only where an event puts them: every plain step alike
    quiet = copy.deepcopy(cfg)
    quiet.train.log_every = quiet.train.eval_every = quiet.train.save_every = 10**12
    trainer = Trainer(quiet, tmp / "events", quiet=True, data=data, spec=UNOBSERVED)
    telemetry = Telemetry(tmp / "events", True, True, t.max_steps, tokens_per_step=1)
    observers = {"flight": FlightRecorder(trainer.model, max(1, t.flight_steps), every=1),
                 "entropy": EntropyLog(1, cfg.data.seq_len, telemetry), "log": telemetry}
    timers = {name: CallTimer(o) for name, o in observers.items()}

    def step(name: str) -> None:
        trainer.observers = [observers[name]] if name != "plain" else []
        loop_step(trainer, log=name == "log")

    names = ["plain", *observers]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            for _ in range(args.warmup):
                for n in names:
                    step(n)
            ops = {n: operator_count(lambda n=n: step(n)) for n in names}
            for timer in timers.values():
                timer.seconds = 0.0
            cpu: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.thread_time()
                    step(n)
                    cpu[n].append(time.thread_time() - t0)
    finally:
        trainer.observers = []
        telemetry.close()
        observers["flight"].close()
        trainer.close()
    plain = statistics.median(cpu["plain"])
    cadence = {"flight": t.flight_every, "entropy": t.entropy_every, "log": t.log_every}
    lines = [f"plain step: {plain * 1e3:.1f} ms CPU (median of {args.rounds}), {ops['plain']:,} operators"]
    extra = {}
    for n in observers:
        delta = statistics.median(e - p for e, p in zip(cpu[n], cpu["plain"]))
        extra[n] = delta
        own = timers[n].seconds / args.rounds
        lines.append(f"{n:<8} step +{delta * 1e3:7.1f} ms CPU ({delta / plain:+.2%} of a plain step), "
                     f"{own * 1e3:.1f} ms in the observer's own calls, +{ops[n] - ops['plain']:,} operators; "
                     f"every {cadence[n]} steps: {delta / cadence[n] / plain:+.3%} per step")
    for every in sorted({t.flight_every, t.flight_every // 2, 2 * t.flight_every, *args.flight_every} - {0}):
        c = dict(cadence, flight=every)
        total = sum(extra[n] / c[n] for n in extra) / plain
        op_share = sum((ops[n] - ops["plain"]) / c[n] for n in extra) / ops["plain"]
        lines.append(f"expected overhead at flight_every={every} entropy_every={c['entropy']} "
                     f"log_every={c['log']}: {total:+.3%} per step in CPU time, {op_share:+.3%} in operators "
                     f"(the cost where a step is bound by kernel launches)")
    return lines


def describe(cfg, trainer: Trainer) -> str:
    m, t = cfg.model, cfg.train
    return (f"{m.preset} L{m.n_layer} d{m.n_embd} H{m.n_head} T{cfg.data.seq_len} V{m.vocab_size}, batch "
            f"{t.batch_size} x accum {t.grad_accum}, {trainer.precision.device} "
            f"({str(trainer.precision.dtype).replace('torch.', '')}), {trainer.model.num_params():,} params, "
            f"{torch.get_num_threads()} thread(s); defaults: flight_steps={t.flight_steps} "
            f"flight_every={t.flight_every} entropy_every={t.entropy_every} log_every={t.log_every}")


def config_and_data(args, over: list[str]):
    cfg = load_config(args.config, [f"train.device={args.device}", "train.max_steps=1000000"]
                      + ([f"model.preset={args.preset}"] if args.preset else []) + args.overrides + over)
    cfg.model.vocab_size = cfg.data.vocab_size
    b, T = cfg.train.batch_size, cfg.data.seq_len
    return cfg, RandomTokens(max(64, 4 * b * cfg.train.grad_accum), T, cfg.model.vocab_size)


def side_by_side(args, tmp: Path) -> list[str]:
    """Whole loop steps, every observer at its default against none (the module docstring's first mode)."""
    variants = {"off": [], "defaults": []}
    variants.update({f"flight {e}": [f"train.flight_every={e}"] for e in args.flight_every})
    trainers: dict[str, Trainer] = {}
    try:
        for name, over in variants.items():
            cfg, data = config_and_data(args, over)
            trainers[name] = Trainer(cfg, tmp / name.replace(" ", ""), quiet=True, data=data,
                                     spec=UNOBSERVED if name == "off" else PRIVLM)
        device = trainers["off"].precision.device
        # the console lines of the metrics records are written (their cost counts) but not shown
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            for tr in trainers.values():
                for _ in range(args.warmup):
                    loop_step(tr)
            names = list(trainers)
            seconds: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    seconds[n].append(timed(lambda tr=trainers[n]: loop_step(tr), args.steps, device))
    finally:
        for tr in trainers.values():
            tr.close()
    t = cfg.train
    tokens = args.steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    off_total = sum(seconds["off"])
    lines = [f"side by side: {args.rounds} rounds of {args.steps} loop steps, wall clock"]
    for n in names:
        total = sum(seconds[n]) / off_total
        median = statistics.median(s / o for s, o in zip(seconds[n], seconds["off"]))
        rate = statistics.median(tokens / s for s in seconds[n])
        lines.append(f"{n:<10} step time x{total:.4f} of off (median per round x{median:.4f}), {rate:,.0f} tokens/s "
                     f"(rounds: {', '.join(f'{tokens / s:,.0f}' for s in seconds[n])})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu/small.yaml", help="YAML path or preset")
    ap.add_argument("--preset", default=None, help="override model.preset")
    ap.add_argument("--flight-every", type=int, nargs="*", default=[], help="extra recorder cadences to time")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=50, help="steps per timed run (side by side)")
    ap.add_argument("--rounds", type=int, default=7, help="side-by-side rounds (0: skip)")
    ap.add_argument("--event-rounds", type=int, default=12, help="rounds of the per-event measurement (0: skip)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    ap.add_argument("--out", default=None, help="write the result as markdown to this file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (for every trainer)")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    cfg, data = config_and_data(args, [])
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Trainer(cfg, Path(tmp) / "probe", quiet=True, data=data, spec=UNOBSERVED)
        lines.append("# " + describe(cfg, probe))
        probe.close()
        print(lines[0], flush=True)
        if args.rounds:
            lines += side_by_side(args, Path(tmp))
            print("\n".join(lines[1:]), flush=True)
        if args.event_rounds:
            args.rounds = args.event_rounds
            shown = len(lines)
            lines += [f"per event: {args.event_rounds} rounds, CPU time of this thread"] + events(args, cfg, data,
                                                                                               Path(tmp))
            print("\n".join(lines[shown:]), flush=True)
    load_after = os.getloadavg()
    load = (f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
            f"after {' '.join(f'{x:.2f}' for x in load_after)} (1/5/15 min)")
    lines.append(load)
    print(load)
    if args.out:
        cmd = "python bench/observer_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
        threads = os.environ.get("OMP_NUM_THREADS")
        Path(args.out).write_text(
            "# Training observers: cost per step (bench/observer_overhead.py)\n\n"
            "Side by side: every observer at its default (telemetry, entropy log, flight recorder) against "
            "privlm's train spec without observers, same config, initial weights and tokens, timed runs "
            "alternating in one process; ratio = total step time over all rounds relative to \"off\". Per event: "
            "what one flight-recorder step, entropy-log step and log record add to a step (CPU time of the "
            "training thread), and the overhead they add up to at each cadence.\n\n"
            f"`{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}{cmd}`\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; {load}\n\n"
            "```\n" + "\n".join(lines) + "\n```\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
