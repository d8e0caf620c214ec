"""The training loop: AdamW + schedule, grad accumulation, mixed precision, DDP, evaluation, divergence
detection and exact resume; the model, the loss terms and the observers (telemetry, entropy log, flight
recorder) come from a `privlm.train.spec.TrainSpec`. ``train(cfg, run_dir)`` is what ``privlm train`` runs."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from privlm.config import Config, ConfigError, to_yaml, validate
from privlm.data.pipeline import prepare_data, write_run_files
from privlm.errors import CheckpointError, DivergenceError
from privlm.model import GPT
from privlm.train import distributed as D
from privlm.train.baseline import unigram_ppl
from privlm.train.batches import BatchSchedule, Position
from privlm.fileio import RunDirectory
from privlm.train.checkpoint import (RNG_STATE, RunLock, best_checkpoint, latest_checkpoint, load_checkpoint,
                                     rng_state, save_checkpoint, set_rng_state)
from privlm.train.rundir import (check_run_data, claim_run_dir, clear_failed_attempt, owns_data, record_config,
                                 resume_config_changes)
from privlm.train.evaluation import EvalResult, evaluate, measure_entropy, shift_targets
from privlm.train.observers import RunInfo
from privlm.train.spec import PRIVLM, TrainSpec
from privlm.train.optim import build_optimizer, build_scheduler
from privlm.train.precision import Precision, resolve_precision


# A checkpoint is kept only if the loss of the weights it would hold, and the last training loss, are finite
# and at most this factor times the median training loss of the last LOSS_WINDOW steps: a checkpoint of a run
# that is blowing up (finite but huge weights) must not replace the last good one.
SANE_LOSS_FACTOR = 2.0
LOSS_WINDOW = 50



# ----------------------------------------------------------------------------------------
@torch.no_grad()
def diagnose(model: GPT, chunk: torch.Tensor, precision: Precision, step: int, loss: float, grad_norm: float,
             last_good: int, what: str = "training diverged") -> str:
    """One line: the step, what was non-finite and the first layer whose attention (or output) has NaN/Inf."""
    first_bad_block: list[int] = []
    handles = [blk.register_forward_hook(
        lambda mod, inp, out, i=i: first_bad_block.append(i) if not torch.isfinite(out.x).all() else None)
        for i, blk in enumerate(model.blocks)]
    try:
        with precision.autocast():
            out = model(chunk, output_entropy=True)
    finally:
        for h in handles:
            h.remove()
    nan_layers = [i for i, n in enumerate(out.nan_counts.tolist()) if n > 0]
    parts = [f"{what} at step {step}: loss={loss:.4g}, grad_norm={grad_norm:.4g}"]
    if nan_layers:
        parts.append(f"first layer with NaN attention: {nan_layers[0]} "
                     f"({int(out.nan_counts[nan_layers[0]])} NaN entries; layers with NaN: {nan_layers})")
    else:
        parts.append("no NaN in attention")
    if first_bad_block:
        parts.append(f"first non-finite block output: layer {min(first_bad_block)}")
    elif not nan_layers:
        parts.append("forward finite (overflow in the loss or the gradients)")
    parts.append(f"last good checkpoint: step {last_good}" if last_good else "no checkpoint was saved yet")
    return "; ".join(parts)


def _tokens_per_step(cfg: Config, world: int) -> int:
    return world * cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len


# ----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, quiet: bool = False,
                 data: Any = None, status_file: Optional[Path] = None, spec: TrainSpec = PRIVLM):
        self.cfg, self.run_dir, self.spec = cfg, Path(run_dir), spec
        self.status_file = status_file  # progress for a sweep process that draws it (privlm.progress)
        self.dir = RunDirectory(self.run_dir)  # every write under the run directory goes through it
        device_hint = "cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        self.dist = D.init_distributed(device_hint)
        self.precision = resolve_precision(cfg.train.device, cfg.train.dtype, self.dist.local_rank)
        self.lock: Optional[RunLock] = None
        has_ckpt: Any = None
        if self.dist.is_main:
            try:
                self.lock, has_ckpt = claim_run_dir(self.run_dir, resume)
            except BaseException as exc:
                D.broadcast_object(("error", str(exc)), self.dist)
                raise
        has_ckpt = D.broadcast_object(has_ckpt, self.dist)
        if isinstance(has_ckpt, tuple):
            raise CheckpointError(f"rank 0 refused the run directory: {has_ckpt[1]}")
        # resume: continue from the checkpoint; restart: a --resume of a run that died before its first
        # checkpoint starts it again from step 0 with its saved config (never a dead end)
        self.resume, self.restart = has_ckpt, resume and not has_ckpt
        try:
            self._setup(quiet, data)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, quiet: bool, data: Any) -> None:
        cfg = self.cfg
        changes = resume_config_changes(self.run_dir, self.cfg) if (self.resume or self.restart) else {}
        # the data is prepared in the shared cache before anything is written into the run directory, so the
        # vocabulary (the embedding follows the tokenizer) is resolved in the config.yaml written first
        self.data = self._load_data(data)
        cfg.model.vocab_size = int(self.data.vocab_size)
        validate(cfg)
        if self.dist.is_main:
            if self.restart:
                clear_failed_attempt(self.dir)
            if not self.resume:  # first: a directory we write into always says which run it holds
                self.dir.write_text("config.yaml", to_yaml(cfg))
            if not ((self.resume or self.restart) and owns_data(self.run_dir)):
                write_run_files(self.run_dir, self.data.tokenizer, self.data.manifest)
        D.barrier(self.dist)

        if cfg.train.deterministic and self.precision.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        self.model = self.spec.build_model(cfg).to(self.precision.device)
        self.observers: list = []
        self.loss_terms = self.spec.build_loss_terms(cfg)
        modules = [t.module for t in self.loss_terms if t.module is not None]
        if len(modules) > 1:
            raise ConfigError(f"train spec '{self.spec.name}': at most one loss term may have parameters")
        # the loss terms' parameters: optimized without weight decay, checkpointed (entropy_reg.safetensors)
        self.term_module: Optional[nn.Module] = modules[0].to(self.precision.device) if modules else None
        self.optimizer = build_optimizer(self.model, cfg.train, self.term_module, self.precision.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.needs_scaler else None
        # a fused AdamW skips an update on the device (found_inf): the host then reads only some steps
        self._device_guard = self.scaler is None and bool(self.optimizer.param_groups[0].get("fused"))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.step, self.tokens, self.last_saved = 0, 0, 0
        self._step_eval: Optional[tuple] = None  # (step, batches, EvalResult) of the latest evaluation
        # the current log interval and the loss window of the checkpoint sanity test are part of the
        # trainer's state, so a resumed run logs and keeps checkpoints exactly like the uninterrupted one
        # losses stay on the device (float64 interval sum: the same arithmetic as a Python float sum) and are
        # read on the host only on log / checkpoint steps
        self.interval_loss: Any = 0.0
        self.interval_steps = 0
        self.recent_losses: deque = deque(maxlen=LOSS_WINDOW)
        self._pending: Optional[dict] = None  # the first non-finite step seen on the device only, not yet read
        self._last_chunk: Optional[torch.Tensor] = None
        position = Position()
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir)
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            state, rngs = load_checkpoint(ckpt, self.model, self.term_module, self.optimizer, self.scheduler, self.scaler)
            self._use_config_hyperparameters(hyper)
            self.step = self.last_saved = int(state["step"])
            self.tokens = int(state["tokens"])
            position = Position(**state["position"])
            self.interval_loss = float(state.get("interval_loss", 0.0))
            self.interval_steps = int(state.get("interval_steps", 0))
            self.recent_losses.extend(float(x) for x in state.get("recent_losses", []))
            if state.get("world", 1) != self.dist.world:
                raise CheckpointError(f"run was trained with {state.get('world', 1)} processes, resumed with "
                                      f"{self.dist.world}; the data order would change")
            if cfg.train.max_steps < self.step:
                raise ConfigError(f"train.max_steps={cfg.train.max_steps} is below step {self.step}, which the "
                                  f"run has already reached")
            set_rng_state(rngs[self.dist.rank], ckpt / RNG_STATE)
        else:
            torch.manual_seed(cfg.train.seed + self.dist.rank)  # dropout streams differ per rank
        if self.dist.is_main:
            record_config(self.dir, self.cfg, self.step, changes, rewrite=self.resume)
        self.batches = BatchSchedule(self.data.train, cfg.train.batch_size, cfg.train.grad_accum,
                                     cfg.train.seed, self.dist.rank, self.dist.world, position)

        self.net: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = [self.precision.device.index] if self.precision.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=dev)
        if cfg.train.compile:
            self.net = torch.compile(self.net)
        # observers last: they start where the run starts (a resumed run's telemetry drops the later records)
        self.observers = self.spec.build_observers(self.model, cfg, RunInfo(
            self.run_dir, self.dist.is_main, quiet, self.step, cfg.train.max_steps,
            _tokens_per_step(cfg, self.dist.world), self.status_file, self.dist))
        if self.restart:
            self._say(f"'{self.run_dir}' has no checkpoint: starting the run again from step 0")

    def _say(self, text: str) -> None:
        """A console line (the telemetry observer prints it, on rank 0)."""
        for observer in self.observers:
            observer.message(text)

    def close(self) -> None:
        """Close the observers (idempotent) and release the run lock."""
        for observer in self.observers:
            observer.close()
        self.release()

    # ------------------------------------------------------------------------------------
    def _use_config_hyperparameters(self, hyper: list[dict]) -> None:
        """After loading a checkpoint: the optimizer hyperparameters of the (possibly overridden) config, and a
        scheduler of its schedule rebuilt at the loaded step, which sets the learning rate of the next step
        from them (not the saved one: extending a finished run would otherwise take its next step at the
        final, often zero, learning rate)."""
        for group, fresh in zip(self.optimizer.param_groups, hyper):
            group.update(fresh)  # "initial_lr" included: the config's peak learning rate
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, steps_done=self.scheduler.last_epoch)

    # ------------------------------------------------------------------------------------
    def _load_data(self, data: Any) -> Any:
        # a resumed run (or a restarted one that got as far) uses its own tokenizer: never retrain it (same
        # content = same token cache) and check that the data is still the run's data
        own = owns_data(self.run_dir) and (self.resume or self.restart)
        if data is None:
            dcfg = self.cfg.data
            if own:
                dcfg = dataclasses.replace(dcfg, tokenizer=str(self.run_dir / "tokenizer.json"))
            # rank 0 builds (or finds in the cache) the tokenized splits first; the others then hit the cache
            if self.dist.is_main:
                data = prepare_data(dcfg, None)
            D.barrier(self.dist)
            if not self.dist.is_main:
                data = prepare_data(dcfg, None)
        if own:
            check_run_data(self.run_dir, data.manifest)
        return data

    @torch.no_grad()
    def _probe_loss(self) -> float:
        """Loss of the current weights on the last step's first micro-batch (eval mode: no dropout, no RNG
        draw, no spectral-norm power iteration, so the run's numerics do not change)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.precision.autocast():
                out = self.model(self._last_chunk, shift_targets(self._last_chunk))
        finally:
            self.model.train(was_training)
        return (D.all_reduce_sum(out.loss.detach().float(), self.dist) / self.dist.world).item()

    def _recent_losses(self) -> list[float]:
        """The loss window on the host (one sync; entries are device tensors, or floats after a resume)."""
        return torch.stack([torch.as_tensor(x, dtype=torch.float32, device=self.precision.device)
                            for x in self.recent_losses]).tolist() if self.recent_losses else []

    def checkpoint_problem(self) -> Optional[str]:
        """Why the current weights are not a good checkpoint, or None. Good: every weight finite, and both the
        last training loss and the loss of these weights at most SANE_LOSS_FACTOR x the median training loss
        of the last LOSS_WINDOW steps."""
        probe = self._probe_loss() if self._last_chunk is not None else None  # collective: every rank
        if not all(torch.isfinite(p).all() for p in self.params):
            return "non-finite weights"
        if probe is not None and not math.isfinite(probe):
            return f"the loss of the weights to save is {probe}"
        recent = self._recent_losses()
        if recent:
            median = statistics.median(recent)
            limit = SANE_LOSS_FACTOR * median
            for what, loss in (("the last training loss", recent[-1]),
                               ("the loss of the weights to save", probe)):
                if loss is not None and loss > limit:
                    return (f"{what} {loss:.4g} exceeds {SANE_LOSS_FACTOR:g} x the median training loss "
                            f"{median:.4g} of the last {len(recent)} steps")
        return None

    def _curve_batches(self) -> Optional[int]:
        t = self.cfg.train
        return t.eval_curve_batches if t.eval_curve_batches is not None else t.eval_max_batches

    def _checkpoint_valid_loss(self) -> Optional[float]:
        """Validation loss of the weights to save (which checkpoint is the best), on the curve's slice
        (``eval_curve_batches``): the evaluation of this step when it is an eval step on that slice, otherwise
        one more (not logged); None without validation data."""
        if len(self.data.valid) == 0:
            return None
        batches = self._curve_batches()
        if self._step_eval is None or self._step_eval[:2] != (self.step, batches):
            self._evaluate(record=False, max_batches=batches)
        return self._step_eval[2].loss

    def _save(self) -> None:
        problem = self.checkpoint_problem()
        if problem is not None:  # never replace a good checkpoint
            self._say(f"step {self.step}: checkpoint not saved ({problem}); last good checkpoint: "
                                 f"{f'step {self.last_saved}' if self.last_saved else 'none yet'}")
            return
        valid_loss = self._checkpoint_valid_loss()
        rngs = D.gather_objects(rng_state(), self.dist)
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self.step, self.model, self.term_module, self.optimizer, self.scheduler,
                            self.scaler, {"tokens": self.tokens, "position": self.batches.position.to_dict(),
                                          "world": self.dist.world, "interval_loss": float(self.interval_loss),
                                          "interval_steps": self.interval_steps,
                                          "recent_losses": self._recent_losses()}, rngs, valid_loss)
        D.barrier(self.dist)
        self.last_saved = self.step

    def _evaluate(self, record: bool = True, max_batches: Any = "final") -> EvalResult:
        """Validation loss over the first ``max_batches`` batches (default ``eval_max_batches``, the final
        evaluation's), recorded in metrics.jsonl unless ``record`` is False."""
        t = self.cfg.train
        batches = t.eval_max_batches if max_batches == "final" else max_batches
        res = evaluate(self.net if not self.dist.enabled else self.model, self.data.valid, t.batch_size,
                       self.precision, self.dist, batches)
        self._step_eval = (self.step, batches, res)
        if record:
            for observer in self.observers:
                observer.evaluated(self.step, res.loss, res.ppl, res.tokens)
        if not math.isfinite(res.loss):  # finite training loss but NaN/Inf on held-out data: same verdict
            first = torch.from_numpy(self.data.valid[: t.batch_size].astype("int64")).to(self.precision.device)
            self._diverged(first, res.loss, float("nan"), self.step, "validation loss is non-finite")
        return res

    def _diverged(self, chunk: torch.Tensor, loss: float, grad_norm: float, step: int,
                  what: str = "training diverged") -> None:
        msg = diagnose(self.model, chunk, self.precision, step, loss, grad_norm, self.last_saved, what)
        best = best_checkpoint(self.run_dir) if self.dist.is_main else None
        if best is not None and best.name != f"step-{self.last_saved:08d}":
            msg += f"; best checkpoint (model.safetensors): step {int(best.name.split('-')[1])}"
        for observer in self.observers:
            line = observer.dump(self.run_dir if self.dist.is_main else None, step, loss, grad_norm, what)
            msg = f"{msg}; {line}" if line else msg
        self._say(msg)
        if self.dist.is_main:
            self._write_summary(None, diverged=True, diagnosis=msg)
        for observer in self.observers:
            observer.close()
        raise DivergenceError(msg)

    def _write_summary(self, final: Optional[EvalResult], diverged: bool = False,
                       diagnosis: Optional[str] = None) -> dict:
        uni_loss, uni_ppl = unigram_ppl(self.data.train, self.data.valid, int(self.data.vocab_size))
        summary = {"preset": self.cfg.model.preset, "params": self.model.num_params(),
                   "tokens_trained": self.tokens, "steps": self.step,
                   "final_loss": final.loss if final else None, "final_ppl": final.ppl if final else None,
                   "diverged": diverged, "diagnosis": diagnosis,
                   "unigram_loss": uni_loss, "unigram_ppl": uni_ppl,  # same tokenizer, same valid targets
                   **self._best_summary()}
        self.dir.write_json("summary.json", summary)
        return summary

    def _best_summary(self) -> dict:
        """The checkpoint model.safetensors holds (state/BEST) and its validation loss."""
        from privlm.train.checkpoint import checkpoint_valid_loss
        best = best_checkpoint(self.run_dir)
        if best is None:
            return {"best_step": None, "best_loss": None}
        return {"best_step": int(best.name.split("-")[1]), "best_loss": checkpoint_valid_loss(best)}

    def _write_entropy(self) -> None:
        t, T = self.cfg.train, self.cfg.data.seq_len
        ent, _ = measure_entropy(self.model, self.data.valid, t.batch_size, self.precision,
                                 t.eval_max_batches if t.eval_max_batches is not None else 16)
        temps = None
        if self.cfg.model.attn_temperature:
            temps = [blk.attn.temperatures()[:, :T].detach().float().cpu().tolist() for blk in self.model.blocks]
        record: dict = {}
        for term in self.loss_terms:
            record.update(term.final_record())
        thresholds = record.get("thresholds")
        self.dir.write_json("entropy.json",
                          {"step": self.step, "seq_len": T, "head_entropy": ent.tolist(),
                           "thresholds": thresholds, "temperatures": temps})

    # ------------------------------------------------------------------------------------
    def train_step(self, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches, each forward shown to the observers. Returns
        (mean CE, grad norm, first micro-batch); ``want_entropy``: an observer reads this step's entropy."""
        cfg, dev = self.cfg, self.precision.device
        micro = self.batches.next_step()
        accum = len(micro)
        progress = self.step / cfg.train.max_steps
        need_entropy = want_entropy or any(term.needs_entropy for term in self.loss_terms)
        ce_sum = torch.zeros((), device=dev)
        for m, chunk in enumerate(micro):
            chunk = chunk.to(dev, non_blocking=True)
            if m == 0:
                first = chunk
            targets = shift_targets(chunk)
            sync = (self.net.no_sync() if self.dist.enabled and m < accum - 1 and hasattr(self.net, "no_sync")
                    else contextlib.nullcontext())
            stats: dict = {}  # the loss terms' statistics, on the steps an observer reads the entropy
            with sync:
                with self.precision.autocast():
                    out = self.net(chunk, targets, output_entropy=need_entropy)
                    loss = out.loss
                    for loss_term in self.loss_terms:  # e.g. Algorithm 1: lambda * L_ent
                        term, term_stats = loss_term(out, progress, want_entropy)
                        if term is not None:
                            loss = loss + term
                        if term_stats is not None:
                            stats[loss_term.stat_names] = term_stats
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            ce_sum += out.loss.detach().float()
            for observer in self.observers:
                observer.micro_batch(out, stats)
        for loss_term in self.loss_terms:
            loss_term.after_backward(self.dist.enabled)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        ce = D.all_reduce_sum(ce_sum / accum, self.dist) / self.dist.world
        return ce, grad_norm, first

    def host_step(self, step: int) -> bool:
        """Whether the loop reads step ``step`` (1-based) on the host: it logs, evaluates, saves or is the last,
        or an observer reads its entropy; every step when the optimizer cannot skip an update on the device
        (a non-fused AdamW, or a GradScaler, which owns ``found_inf``)."""
        t = self.cfg.train
        return (not self._device_guard or step == t.max_steps
                or any(step % every == 0 for every in (t.log_every, t.eval_every, t.save_every))
                or any(observer.wants_entropy(step) for observer in self.observers))

    def _guard_on_device(self, step: int, bad: torch.Tensor, ce: torch.Tensor, grad_norm: torch.Tensor,
                         first: torch.Tensor) -> None:
        """A step the host does not read: remember the first non-finite step (its number, loss, grad norm and
        micro-batch) on the device, and make the fused AdamW skip every update from it on (``found_inf``), so
        that the weights stay those of the last good step until the next host step raises."""
        p = self._pending
        if p is None:
            p = self._pending = {"bad": torch.zeros((), dtype=torch.bool, device=bad.device),
                                 "step": torch.zeros((), dtype=torch.long, device=bad.device),
                                 "loss": ce.detach().clone(), "grad_norm": grad_norm.detach().clone(),
                                 "chunk": first.clone()}
        new = bad & ~p["bad"]
        p["step"] = torch.where(new, step, p["step"])
        p["loss"] = torch.where(new, ce, p["loss"])
        p["grad_norm"] = torch.where(new, grad_norm, p["grad_norm"])
        p["chunk"] = torch.where(new, first, p["chunk"])
        p["bad"] = p["bad"] | bad
        self.optimizer.found_inf = p["bad"].float()

    def _raise_pending(self) -> None:
        """On a host step: if a step since the last one went non-finite, stop there (its diagnosis, with the
        weights of the step before it, which the skipped updates left unchanged)."""
        p, self._pending = self._pending, None
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf
        if p is None or not bool(p["bad"]):
            return
        bad_step = int(p["step"])
        skipped = self.step - (bad_step - 1)  # steps that ran (without an update) since the last good one
        self.step -= skipped
        self.tokens -= skipped * _tokens_per_step(self.cfg, self.dist.world)
        self.optimizer.zero_grad(set_to_none=True)
        self._diverged(p["chunk"], float(p["loss"]), float(p["grad_norm"]), bad_step)

    def step_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches, divergence checks, optimizer and schedule update.
        Returns (mean CE, grad norm) as device tensors; raises DivergenceError instead of stepping. The host
        reads the step only on ``host_step`` steps; on the others a non-finite loss or gradient is kept on the
        device and raised at the next host step."""
        step = self.step + 1
        lr = self.optimizer.param_groups[0]["lr"]
        want_entropy = any(observer.wants_entropy(step) for observer in self.observers)
        for observer in self.observers:
            observer.begin(step)
        ce, grad_norm, first = self.train_step(want_entropy)
        for observer in self.observers:
            observer.end(ce, grad_norm, lr)
        if self.host_step(step):
            self._raise_pending()
            loss_f, gn_f = ce.item(), grad_norm.item()
            bad_attention = any(observer.nonfinite() for observer in self.observers)
            grads_bad = self.scaler is None and not math.isfinite(gn_f)  # fp16 overflow is the scaler's job
            if not math.isfinite(loss_f) or grads_bad or bad_attention:
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged(first, loss_f, gn_f, step)
        else:
            self._guard_on_device(step, ~torch.isfinite(ce) | ~torch.isfinite(grad_norm), ce, grad_norm, first)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens += _tokens_per_step(self.cfg, self.dist.world)
        self.recent_losses.append(ce.detach())
        self._last_chunk = first
        for observer in self.observers:
            observer.stepped(self.step)
        return ce, grad_norm

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        tok_step = _tokens_per_step(cfg, self.dist.world)
        self.net.train()
        if self.dist.is_main and self.step == 0:
            self._say(f"training {cfg.model.preset}: {self.model.num_params():,} parameters, "
                                 f"{len(self.data.train):,} train / {len(self.data.valid):,} valid chunks of "
                                 f"T={cfg.data.seq_len}, {tok_step:,} tokens per step, device "
                                 f"{self.precision.device} ({str(self.precision.dtype).replace('torch.', '')})")
        t_interval = time.time()
        final: Optional[EvalResult] = None
        while self.step < t.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            ce, grad_norm = self.step_once()
            self.interval_loss = self.interval_loss + ce.double()  # on the device
            self.interval_steps += 1
            last = self.step == t.max_steps
            if self.step % t.log_every == 0 or last:
                elapsed = max(time.time() - t_interval, 1e-9)
                record = (self.step, float(self.interval_loss) / self.interval_steps, lr, self.tokens,
                          self.interval_steps * tok_step / elapsed, grad_norm.item())
                for observer in self.observers:
                    observer.logged(*record)
                self.interval_loss, self.interval_steps, t_interval = 0.0, 0, time.time()
            if last and self._curve_batches() != t.eval_max_batches:  # the curve's last point, then the final
                self._evaluate(max_batches=self._curve_batches())
            if last:
                final = self._evaluate()
            elif self.step % t.eval_every == 0:
                self._evaluate(max_batches=self._curve_batches())
                t_interval = time.time()  # evaluation time is not training throughput
            if self.step % t.save_every == 0 or last:
                self._save()
        if final is None:  # resumed a finished run: its eval record exists; evaluate for the summary only
            final = self._evaluate(record=False)
        summary = None
        if self.dist.is_main:
            self._write_entropy()
            summary = self._write_summary(final)
        self._say(f"done: {self.step} steps, {self.tokens:,} tokens, final valid loss {final.loss:.4f}"
                             f", PPL {final.ppl:.3f}; run directory {self.run_dir}")
        if summary is not None:
            self._say(f"unigram baseline (same tokenizer, same valid targets): loss "
                                 f"{summary['unigram_loss']:.4f}, PPL {summary['unigram_ppl']:.3f}")
        for observer in self.observers:
            observer.close()
        return summary or {}


def train(cfg: Config, run_dir: Path | str, *, resume: bool = False, quiet: bool = False,
          data: Any = None, status_file: Optional[Path] = None, spec: TrainSpec = PRIVLM) -> dict:
    """Train (or continue) the run in ``run_dir``; returns summary.json's content (empty on ranks > 0).
    ``status_file``: where to report progress as JSON at every log step (``privlm sweep --jobs``)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(cfg, Path(run_dir), resume=resume, quiet=quiet, data=data, status_file=status_file,
                          spec=spec)
        try:
            return trainer.run()
        finally:
            trainer.close()
            D.shutdown(trainer.dist)
    finally:  # a global switch: do not leak it into the caller (tests, notebooks)
        torch.use_deterministic_algorithms(deterministic_before)
