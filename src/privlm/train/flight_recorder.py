"""Divergence flight recorder: the last K recorded training steps' per-head attention entropy, per-head
maximum attention logit, per-layer residual-stream norm, loss and gradient norm, kept in memory and written
to RUN_DIR/flight_recorder.json when training diverges, with a verdict: which layers/heads collapsed
(entropy toward zero) or blew up first, and how many steps before the divergence.

It observes the training forward and changes nothing: on recorded steps (every ``train.flight_every``-th
step, ``train.flight_steps`` of them kept; 0 turns the recorder off) it attaches forward hooks to each block's
``attn.hook_q``, ``attn.hook_k``, attention module and ``hook_resid_post``, and takes detached views of what
that forward computed; between recorded steps no hook is attached. Nothing recomputes a projection or runs a
module again (a spectral-norm projection would run another power iteration and change the weights). The
residual norm is read off the block output. The entropy is the attention's own when the loop asked for it
(telemetry or regularizer steps); otherwise it and the max logit come from the recorded q and k (with the
SM(t) temperature), without autograd, one block of queries at a time, on the first ``SEQUENCES`` sequences of
each micro-batch, every layer's heads in one computation at the forward's last layer: a recorded step costs one
q k^T product of those sequences per layer more than an unrecorded one (bench/observer_overhead.py measures it per recorded step; docs/DECISIONS.md#observer-cadences).

Verdict thresholds (ours, documented with the numbers they rest on):
  * collapse: head entropy below ``privlm.entropy.measure.COLLAPSE_NATS`` (the project's collapse threshold)
    or NaN;
  * logit blow-up: a head's max logit non-finite, or at least ``BLOWUP_FACTOR`` times its value in the oldest
    record of the window and at least ``LOGIT_FLOOR`` (a logit lead of 10 already gives one key >= 99% of the
    weight against 127 keys at 0, so smaller values are ordinary training, whatever their growth);
  * residual blow-up: a layer's mean residual norm non-finite or at least ``BLOWUP_FACTOR`` times its value in
    the oldest record of the window.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from privlm.entropy.measure import COLLAPSE_NATS, head_entropy, row_entropy
from privlm.fileio import atomic_write_json
from privlm.flight_trace import (BLOWUP_FACTOR, FLIGHT_FILE, FORMAT, LOGIT_FLOOR, format_trace, json_number,
                                 read_trace, verdict, verdict_line)
from privlm.model.attention import attention_logits, causal_mask
from privlm.train.observers import Observer

__all__ = ["FlightRecorder", "attention_head_stats", "FLIGHT_FILE", "FORMAT", "read_trace", "format_trace",
           "verdict", "verdict_line"]
QUERY_BLOCK = 128
# Sequences of each micro-batch the per-head statistics are taken on: the q k^T of the whole batch
# would cost 20-40% of a small model's training step on CPU; 4 sequences (512 queries at T=128) cost a quarter
# of that and still average every head over hundreds of queries.
SEQUENCES = 4
# Largest logit block of a recorded forward (elements; 32 MiB in float32): all layers' heads go through one
# computation, a block of queries at a time, so that a deep, long-context model never holds more than this.
LOGIT_ELEMENTS = 2**23


@torch.no_grad()
def attention_head_stats(q: torch.Tensor, k: torch.Tensor, temperature: Optional[torch.Tensor],
                         entropy: Optional[torch.Tensor],
                         query_block: int = QUERY_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit [H], head entropy [H]) of one attention layer from its projections q, k [B, H, T, d_k] (as
    ``attn.hook_q`` / ``attn.hook_k`` see them: before 1/sqrt(d_k) and the temperature) and its SM(t)
    temperature [H, >= T] or None.

    The logits are Eq. 2's (with the SM(t) temperature), masked causally; the entropy is Eq. 7's head entropy
    (mean over batch and queries), taken from ``entropy`` [B, H, T] when the forward computed it. Pure: reads
    its arguments, in float32 whatever the training dtype."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.detach().float(), k.detach().float()
        t = None if temperature is None else temperature.detach().float()
        B, H, T, _ = q.shape
        max_logit = torch.full((H,), -math.inf, device=q.device)
        ent_sum = None if entropy is not None else torch.zeros(H, device=q.device)
        for s in range(0, T, query_block):
            e = min(s + query_block, T)
            logits = causal_mask(attention_logits(q[..., s:e, :], k[..., :e, :], None if t is None else t[:, s:e]))
            max_logit = torch.maximum(max_logit, logits.amax(dim=(0, 2, 3)))  # both propagate NaN
            if ent_sum is not None:
                ent_sum += row_entropy(logits.softmax(dim=-1)).sum(dim=(0, 2))
        # the attention's own entropy when it was computed; otherwise the same Eq. 7 mean, over query blocks
        head_ent = head_entropy(entropy.detach()[None])[0] if entropy is not None else ent_sum / (B * T)
    return max_logit, head_ent


class FlightRecorder(Observer):
    """Ring buffer of per-step measurements fed by forward hooks. ``begin(step)`` attaches the hooks for the
    forward passes of one recorded optimizer step (all micro-batches: max logit is the max, the rest the mean
    over them), ``end(loss, grad_norm, lr)`` removes them and files the record, ``dump(...)`` writes the window
    and returns the verdict. With ``capacity=0`` every call is a no-op."""

    def __init__(self, model: nn.Module, capacity: int, every: int = 1):
        self.capacity, self.every = int(capacity), max(1, int(every))
        # one more than kept: the diverging step's own record is split off by dump()
        self._ring: deque[dict] = deque(maxlen=max(1, self.capacity) + 1)
        self._armed = False
        self._step = 0
        self._qk: dict[int, dict[str, torch.Tensor]] = {}
        self._layers: list[tuple] = []  # one forward's (layer, q, k, temperature, entropy), until its last layer
        self._heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # per forward: (max logit, entropy) [L, H]
        self._resid: dict[int, list[torch.Tensor]] = {}
        self._handles: list = []
        self.blocks = list(getattr(model, "blocks"))
        self.n_layer = len(self.blocks)

    @classmethod
    def for_training(cls, model: nn.Module, train_cfg) -> "FlightRecorder":
        return cls(model, train_cfg.flight_steps, train_cfg.flight_every)

    @property
    def records(self) -> list[dict]:
        """The kept records as the trace writes them (JSON numbers; a host sync: for dumps and tests)."""
        return [_to_json(r) for r in self._ring]

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    # -- hooks: detached views of what the forward computed ---------------------------------------
    def _attach(self) -> None:
        for i, block in enumerate(self.blocks):
            attn = block.attn
            self._handles += [
                attn.hook_q.register_forward_hook(lambda _m, _a, out, i=i: self._on_qk(i, "q", out)),
                attn.hook_k.register_forward_hook(lambda _m, _a, out, i=i: self._on_qk(i, "k", out)),
                attn.register_forward_hook(lambda mod, _a, out, i=i: self._on_attention(i, mod, out)),
                block.hook_resid_post.register_forward_hook(lambda _m, _a, out, i=i: self._on_residual(i, out)),
            ]

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._qk, self._layers = {}, []

    def _on_qk(self, layer: int, which: str, out: torch.Tensor) -> None:
        self._qk.setdefault(layer, {})[which] = out.detach()[:SEQUENCES]

    def _on_attention(self, layer: int, attn: nn.Module, out) -> None:
        qk = self._qk.pop(layer, {})
        if "q" not in qk or "k" not in qk:
            return
        entropy = getattr(out, "entropy", None)
        with torch.no_grad():
            t = attn.temperatures()
        self._layers.append((layer, qk["q"], qk["k"], t, None if entropy is None else entropy.detach()[:SEQUENCES]))
        if layer == self.n_layer - 1:
            self._head_stats()

    def _head_stats(self) -> None:
        """Every layer's head statistics of one forward at once: the layers' heads side by side as the heads of
        one attention (a few operators per recorded forward instead of a few dozen per layer)."""
        layers, self._layers = self._layers, []
        if [lay[0] for lay in layers] != list(range(self.n_layer)):
            return  # a forward that stopped half-way: nothing consistent
        q, k = (torch.cat([lay[i] for lay in layers], dim=1) for i in (1, 2))  # [S, L*H, T, d_k]
        t = None if layers[0][3] is None else torch.cat([lay[3] for lay in layers])  # [L*H, >= T]
        ent = None if any(lay[4] is None for lay in layers) else torch.cat([lay[4] for lay in layers], dim=1)
        S, heads, T, _ = q.shape
        block = max(1, min(QUERY_BLOCK, LOGIT_ELEMENTS // (S * heads * T)))
        max_logit, head_ent = attention_head_stats(q, k, t, ent, query_block=block)
        self._heads.append((max_logit.view(self.n_layer, -1), head_ent.view(self.n_layer, -1)))

    def _on_residual(self, layer: int, out: torch.Tensor) -> None:
        with torch.no_grad():
            norm = out.detach().float().norm(dim=-1).mean()
        self._resid.setdefault(layer, []).append(norm)

    # -- the loop's three calls ----------------------------------------------------------------
    def begin(self, step: int) -> None:
        """Attach the hooks when ``step`` (1-based, the step about to run) is a recorded one."""
        self._detach_hooks()  # a forward that raised may have left them attached
        self._heads, self._resid = [], {}
        self._step = step
        self._armed = self.enabled and (step % self.every == 0 or not self._ring)
        if self._armed:
            self._attach()

    def end(self, loss, grad_norm, lr: Optional[float] = None) -> None:
        """File the record of the step ``begin`` armed; ``loss`` and ``grad_norm`` may be device tensors."""
        if not self._armed:
            return
        self._armed = False
        self._detach_hooks()
        heads, resid, self._heads, self._resid = self._heads, self._resid, [], {}
        if not heads or any(len(resid.get(i, ())) != len(heads) for i in range(self.n_layer)):
            return  # e.g. a forward that raised: nothing consistent to file
        # kept on the device (no host sync on a step that logs nothing); made JSON numbers by dump()
        self._ring.append({"step": self._step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                           "head_entropy": torch.stack([e for _, e in heads]).mean(0),
                           "max_logit": torch.stack([m for m, _ in heads]).amax(0),
                           "resid_norm": torch.stack([torch.stack(resid[i]).mean() for i in range(self.n_layer)])})

    def dump(self, run_dir: Optional[Path], step: int, loss: float, grad_norm: float, what: str) -> str:
        """Write the window to run_dir/flight_recorder.json (when run_dir is given, i.e. on rank 0) and return
        the one-line verdict (empty when the recorder is off or recorded nothing)."""
        if not self.enabled:
            return ""
        # steps after ``step`` (run before the divergence was seen, at the loop's next host sync) are dropped
        records = [_to_json(r) for r in self._ring if r["step"] <= step]
        at_divergence = records.pop() if records and records[-1]["step"] == step else None
        if not records and at_divergence is None:
            return ""
        trace = {"format": FORMAT, "divergence_step": step, "what": what, "loss": json_number(loss),
                 "grad_norm": json_number(grad_norm), "every": self.every, "capacity": self.capacity,
                 "thresholds": {"collapse_nats": COLLAPSE_NATS, "blowup_factor": BLOWUP_FACTOR,
                                "logit_floor": LOGIT_FLOOR},
                 "records": records, "at_divergence": at_divergence}
        trace["verdict"] = verdict(trace)
        line = verdict_line(trace)
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / FLIGHT_FILE, trace)
        return line

    def close(self) -> None:
        self._detach_hooks()
        self._armed = False


# ----------------------------------------------------------------------------------------------
def _nested(t: torch.Tensor):
    """JSON-safe nested list: NaN -> null, +-inf -> +-1e308 (JSON has neither)."""
    if t.dim() == 0:
        return json_number(t)
    return [_nested(row) for row in t]


def _to_json(record: dict) -> dict:
    """A ring-buffer record (device tensors) as the trace's JSON record."""
    return {"step": record["step"], "loss": json_number(record["loss"]),
            "grad_norm": json_number(record["grad_norm"]),
            "lr": json_number(record["lr"]) if record["lr"] is not None else None,
            **{k: _nested(record[k].detach().float().cpu()) for k in ("head_entropy", "max_logit", "resid_norm")}}
