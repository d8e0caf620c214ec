"""What a run reports: metrics.jsonl lines, TensorBoard scalars and the console (tqdm bar or log lines)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from privlm.fileio import RunDirectory, atomic_write_text
from privlm.model.entropy_attention import self_check_failures
from privlm.progress import is_interactive, progress_text, write_status


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


class Telemetry:
    """Rank-0 sink for metrics; other ranks get an instance with ``enabled=False`` that does nothing."""

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

    def print(self, msg: str) -> None:
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

    def train(self, step: int, loss: float, lr: float, tokens: int, tok_per_s: float, grad_norm: float) -> None:
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

    def advance(self, n: int = 1) -> None:
        """``n`` optimizer steps done."""
        if self._bar is not None:
            self._bar.update(n * self.tokens_per_step)

    def eval(self, step: int, loss: float, ppl: float, tokens: int) -> None:
        if not self.enabled:
            return
        self.last_eval_ppl = ppl
        self._write({"kind": "eval", "step": step, "loss": loss, "ppl": ppl, "tokens": tokens})
        self._tb.add_scalar("eval/loss", loss, step)
        self._tb.add_scalar("eval/ppl", ppl, step)
        self.print(f"step {step:>6} eval loss {loss:.4f} ppl {ppl:.3f} ({tokens:,} tokens)")

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
