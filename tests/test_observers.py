"""Observers never change training: for every paper preset, a few steps with every observer on (flight recorder
every step, entropy telemetry every step, metrics and TensorBoard every step, the model's hook points captured)
and with all of them off give bit-identical losses, gradient norms, weights (spectral-norm vectors included)
and optimizer state."""
from __future__ import annotations

import pytest
import torch

from privlm.model.hooks import capture
from privlm.presets import PAPER_PRESETS
from privlm.train import Trainer
from privlm.train.flight_recorder import FlightRecorder
from privlm.train.spec import PRIVLM, UNOBSERVED
from privlm.train.telemetry import EntropyLog, Telemetry

from test_train import synthetic_data, tiny_cfg

STEPS = 3
# the preset of the recorder's old bug (another power iteration per recorded step), beside the paper's 22
PRESETS = [*PAPER_PRESETS, "SM+SN(qk+ffn)"]
# every hook point that leaves the attention path as it is, plus hook_entropy (the path entropy telemetry takes)
OBSERVED_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_pre",
                  "hook_mlp_post", "hook_q", "hook_k", "hook_v", "hook_z", "hook_entropy", "hook_pre_act",
                  "hook_post_act")


@pytest.fixture(autouse=True)
def _one_thread_and_restore():
    """One torch thread (tiny matrices: more threads only wait on each other on a shared machine)."""
    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(before)


def _train(preset: str, run_dir, observed: bool):
    layers = 7 if "^i6" in preset else 2  # AERO's ^i6 prunes the 6 deepest FFNs: keep one
    common = [f"model.n_layer={layers}", "model.n_embd=16", f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
              f"train.save_every={STEPS}", "train.eval_max_batches=1", "train.lr=3e-2"]
    # observed: privlm's spec with every observer at its most frequent; off: the spec without observers
    over = ["train.flight_steps=8", "train.flight_every=1", "train.entropy_every=1", "train.log_every=1"]
    cfg = tiny_cfg(*common, *(over if observed else []), preset=preset)
    trainer = Trainer(cfg, run_dir, quiet=True, data=synthetic_data(n_train=64, n_valid=8),
                      spec=PRIVLM if observed else UNOBSERVED)
    steps = []
    step_once = trainer.step_once

    def recorded_step():
        loss, grad_norm = step_once()
        steps.append((loss, grad_norm))
        return loss, grad_norm

    trainer.step_once = recorded_step
    try:
        if observed:
            with capture(trainer.model, lambda n: n.rsplit(".", 1)[-1] in OBSERVED_HOOKS) as acts:
                trainer.run()
            assert any(k.endswith("attn.hook_q") for k in acts)  # the hooks did see the training forward
            kinds = {type(o): o for o in trainer.observers}
            assert set(kinds) == {Telemetry, EntropyLog, FlightRecorder}
            assert len(kinds[FlightRecorder].records) == STEPS
            records = (run_dir / "metrics.jsonl").read_text().splitlines()
            assert sum('"kind": "entropy"' in r for r in records) == STEPS  # the entropy log wrote every step
        else:
            assert trainer.observers == []
            trainer.run()
            assert not (run_dir / "metrics.jsonl").exists()  # no telemetry: no metrics.jsonl, no TensorBoard
    finally:
        trainer.close()
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.term_module is not None:
        state.update({f"reg.{k}": v for k, v in trainer.term_module.state_dict().items()})
    for i, s in trainer.optimizer.state_dict()["state"].items():
        state.update({f"optim.{i}.{k}": v for k, v in s.items()})
    return steps, state


@pytest.mark.parametrize("preset", PRESETS)
def test_observers_leave_training_bit_identical(preset, tmp_path):
    steps_off, off = _train(preset, tmp_path / "off", observed=False)
    steps_on, on = _train(preset, tmp_path / "on", observed=True)
    assert len(steps_off) == STEPS and steps_on == steps_off  # float equality: bit-identical losses
    assert on.keys() == off.keys() and any(k.startswith("optim.") for k in on)
    different = [k for k in on if not torch.equal(on[k], off[k])]
    assert not different, f"{preset}: observers changed {different}"
