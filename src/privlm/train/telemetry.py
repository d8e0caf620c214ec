"""What a run reports, as two observers of privlm's train spec (`privlm.train.observers`): ``Telemetry``
(metrics.jsonl lines, TensorBoard scalars, the console: tqdm bar or log lines, a sweep's status file) and
``EntropyLog`` (the per-head attention entropy of the training forward every ``train.entropy_every`` steps,
written through the telemetry)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from privlm.entropy.measure import head_entropy
from privlm.fileio import RunDirectory, atomic_write_text
from privlm.model.entropy_attention import self_check_failures
from privlm.progress import is_interactive, progress_text, write_status
from privlm.train import distributed as D
from privlm.train.observers import Observer, RunInfo


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records written after the checkpoint (they are recomputed, bit-exactly on CPU)."""
    if not path.is_file():
        return
    from privlm.errors import CheckpointError, PrivlmError
    from privlm.validate import MAX_JSONL_BYTES, parse_json
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise CheckpointError(f"'{path}' is {path.stat().st_size:,} bytes, more than the {MAX_JSONL_BYTES:,} a "
                              f"metrics file may have")
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = parse_json(line, f"'{path}'")
        except PrivlmError:  # a line cut by the kill (or not a record): dropped like one
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def _finite_or_none(x: float) -> Optional[float]:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class Telemetry(Observer):
    """Rank-0 sink for metrics; other ranks get an instance with ``enabled=False`` that does nothing."""

    @classmethod
    def for_run(cls, run: RunInfo) -> "Telemetry":
        """The run's telemetry; on a resume, metrics.jsonl loses the records written after the checkpoint."""
        if run.is_main and run.start_step:
            truncate_metrics(run.run_dir / "metrics.jsonl", run.start_step)
        return cls(run.run_dir, run.is_main, run.quiet, run.max_steps, run.start_step, run.tokens_per_step,
                   run.status_file)

    def __init__(self, run_dir: Optional[Path], enabled: bool, quiet: bool, total_steps: int,
                 start_step: int = 0, tokens_per_step: int = 1, status_file: Optional[Path] = None):
        """The console line (tqdm, on a terminal unless ``quiet``) counts tokens: tokens, tok/s, ETA, loss
        (`privlm.progress.progress_text`); ``status_file`` (a sweep's ``--jobs`` run) gets the same numbers
        as JSON at every log step, for the sweep process to draw."""
        self.enabled = enabled
        self.quiet = quiet or not is_interactive()
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.status_file = status_file if enabled else None
        self._fh = self._tb = self._bar = None
        self.last_eval_ppl: Optional[float] = None
        self._warned: set[str] = set()
        if not enabled:
            return
        run = RunDirectory(run_dir)  # never through a link: metrics.jsonl and tb/ stay inside the run
        self._fh = run.open_append("metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter  # heavy import, only on rank 0
        # purge_step drops events a killed run wrote after the checkpoint we resume from
        self._tb = SummaryWriter(log_dir=str(run.mkdir("tb")),
                                 purge_step=start_step + 1 if start_step else None)
        if not self.quiet:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps * tokens_per_step, initial=start_step * tokens_per_step,
                             unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                             bar_format="{bar:10} {desc}")
        self._t0 = time.time()

    # ------------------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        # one write per complete line: a kill can only lose whole trailing lines
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def message(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def warnings(self, step: int) -> None:
        """Record, once per device, a fused attention-entropy kernel that failed its self-check (the attention
        then runs on the explicit path): a ``warning`` line in metrics.jsonl; the line itself was logged when
        the check ran."""
        if not self.enabled:
            return
        for check in self_check_failures():
            if check.device not in self._warned:
                self._warned.add(check.device)
                self._write({"kind": "warning", "step": step, "message": check.message})

    def logged(self, step: int, loss: float, lr: float, tokens: int, tok_per_s: float, grad_norm: float) -> None:
        if not self.enabled:
            return
        self.warnings(step)
        self._write({"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": tokens,
                     "tok_per_s": tok_per_s, "grad_norm": grad_norm})
        for key, val in (("loss", loss), ("lr", lr), ("tok_per_s", tok_per_s), ("grad_norm", grad_norm)):
            if _finite_or_none(val) is not None:
                self._tb.add_scalar(f"train/{key}", val, step)
        total = self.total_steps * self.tokens_per_step
        if self.status_file is not None:
            write_status(self.status_file, step=step, max_steps=self.total_steps, tokens=tokens, total_tokens=total,
                         tok_per_s=tok_per_s, loss=loss, done=step >= self.total_steps)
        if self._bar is not None:
            ppl = f" | eval PPL {self.last_eval_ppl:.3f}" if self.last_eval_ppl is not None else ""
            self._bar.set_description_str(progress_text(tokens, total, tok_per_s, loss) + ppl, refresh=False)
        else:
            ppl = f" eval_ppl {self.last_eval_ppl:.3f}" if self.last_eval_ppl is not None else ""
            print(f"step {step:>6} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                  f"tok/s {tok_per_s:,.0f}{ppl}", flush=True)

    def stepped(self, step: int) -> None:
        """One more optimizer step done."""
        if self._bar is not None:
            self._bar.update(self.tokens_per_step)

    def evaluated(self, step: int, loss: float, ppl: float, tokens: int) -> None:
        if not self.enabled:
            return
        self.last_eval_ppl = ppl
        self._write({"kind": "eval", "step": step, "loss": loss, "ppl": ppl, "tokens": tokens})
        self._tb.add_scalar("eval/loss", loss, step)
        self._tb.add_scalar("eval/ppl", ppl, step)
        self.message(f"step {step:>6} eval loss {loss:.4f} ppl {ppl:.3f} ({tokens:,} tokens)")

    def entropy(self, step: int, head_entropy: list[list[float]], nan_counts: list[int], seq_len: int,
                reg_stats: Optional[dict]) -> None:
        if not self.enabled:
            return
        self.warnings(step)
        layer_mean = [sum(row) / len(row) for row in head_entropy]
        self._write({"kind": "entropy", "step": step, "head_entropy": head_entropy, "layer_mean": layer_mean,
                     "nan_counts": nan_counts, "seq_len": seq_len, "reg": reg_stats})
        for i, row in enumerate(head_entropy):
            self._tb.add_scalar(f"entropy_layer_mean/layer{i}", layer_mean[i], step)
            self._tb.add_scalar(f"attention_nan/layer{i}", nan_counts[i], step)
            for h, e in enumerate(row):
                self._tb.add_scalar(f"entropy_head/layer{i}/head{h}", e, step)
        for key, val in (reg_stats or {}).items():
            if isinstance(val, (int, float)):
                self._tb.add_scalar(f"reg/{key}", val, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._fh is not None:
            self._fh.close()
        self._fh = self._tb = self._bar = None


class EntropyLog(Observer):
    """Every ``every``-th step: the forward computes the attention entropy (the fused+entropy path, same
    output and gradients), and this observer averages each layer's head entropy and sums its NaN attention rows
    over the micro-batches (and ranks), with the loss terms' statistics (e.g. Algorithm 1's), and writes them
    through ``telemetry`` once the step is done. A NaN attention row is a divergence (``nonfinite``)."""

    def __init__(self, every: int, seq_len: int, telemetry: Optional[Telemetry], dist: Any = None):
        self.every, self.seq_len, self.telemetry, self.dist = max(1, int(every)), seq_len, telemetry, dist
        self._armed = False
        self._record: Optional[dict] = None

    def wants_entropy(self, step: int) -> bool:
        # a fixed cadence (not "and at the last step"): the numerics of step s never depend on max_steps
        return step % self.every == 0

    def begin(self, step: int) -> None:
        self._armed, self._record = self.wants_entropy(step), None
        self._n, self._ent, self._nan, self._stats = 0, None, None, {}

    def micro_batch(self, out: Any, stats: dict) -> None:
        if not self._armed or out.entropy is None:
            return
        e, n = head_entropy(out.entropy.detach()), out.nan_counts.detach()
        self._ent = e if self._ent is None else self._ent + e
        self._nan = n if self._nan is None else self._nan + n
        self._n += 1
        for names, value in stats.items():
            self._stats.setdefault(names, []).append(value)

    def end(self, loss: Any, grad_norm: Any, lr: Optional[float]) -> None:
        if not self._armed or self._ent is None:
            return
        dist = self.dist if self.dist is not None else D.DistInfo()
        ent = D.all_reduce_sum(self._ent / self._n, dist) / dist.world
        nan = D.all_reduce_sum(self._nan, dist)
        reg = None
        for names, kept in self._stats.items():
            reg = {**(reg or {}), **dict(zip(names, torch.stack(kept).mean(dim=0).tolist()))}
        self._record = {"head_entropy": ent.cpu().tolist(), "nan_counts": [int(x) for x in nan.cpu()], "reg": reg}
        self._ent = self._nan = None
        self._stats = {}

    def nonfinite(self) -> bool:
        return self._record is not None and any(self._record["nan_counts"])

    def stepped(self, step: int) -> None:
        if self._record is not None and self.telemetry is not None:
            r = self._record
            self.telemetry.entropy(step, r["head_entropy"], r["nan_counts"], self.seq_len, r["reg"])
        self._record = None
