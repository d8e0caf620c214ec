"""Divergence flight recorder: its per-head measurements against a by-hand reference, the ring buffer and
cadence, the dump of a run forced to diverge (tiny model, huge learning rate), and where it shows up
(`privlm entropy RUN`, the report's figure and the stability map)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from privlm.cli import main
from privlm.config import load_config
from privlm.errors import DivergenceError
from privlm.model import GPT
from privlm.model.hooks import capture
from privlm.train import train
from privlm.train.flight_recorder import FLIGHT_FILE, FlightRecorder, attention_head_stats, read_trace

from test_train import T, V, synthetic_data, tiny_cfg

DIVERGE = ("train.lr=1.0", "train.warmup_frac=0", "train.max_steps=40", "train.save_every=2",
           "train.log_every=1", "train.eval_every=100", "train.flight_every=1")


@pytest.mark.parametrize("preset", ["SM+LN+G", "SM(t)+ScFuFFN"])
def test_head_stats_match_a_by_hand_reference(preset):
    cfg = load_config(preset, ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={T}",
                               f"data.seq_len={T}", f"model.vocab_size={V}", "model.init_std=0.3"])
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    if cfg.model.attn_temperature:  # a different temperature per head and query: checks the per-block slicing
        for blk in model.blocks:
            blk.attn.temperature.data.uniform_(-0.5, 0.5)
    idx = torch.randint(0, V, (3, T))
    with torch.no_grad():
        out, cache = model.run_with_cache(idx, names=["hook_resid_pre", "hook_q", "hook_k"], output_attentions=True)
    wants = []
    for i, blk in enumerate(model.blocks):
        x = blk.ln_1(cache.resid_pre(i))
        B, _, d = x.shape
        H = cfg.model.n_head
        q = (x @ blk.attn.q_proj.weight.T + blk.attn.q_proj.bias).view(B, T, H, d // H).transpose(1, 2)
        k = (x @ blk.attn.k_proj.weight.T + blk.attn.k_proj.bias).view(B, T, H, d // H).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // H)
        if cfg.model.attn_temperature:
            logits = logits / blk.attn.temperatures()[:, :T, None]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        want_max = logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3))
        p = out.attentions[i]  # the model's own probabilities
        want_ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
        for block in (8, 13, 128):  # several query blocks, one ragged, one covering all of T
            got_max, got_ent = attention_head_stats(cache.q(i), cache.k(i), blk.attn.temperatures(), None,
                                                    query_block=block)
            assert torch.allclose(got_max, want_max, rtol=1e-5, atol=1e-5)
            assert torch.allclose(got_ent, want_ent, rtol=1e-5, atol=1e-6)
        assert want_max.max() > 1.0  # init_std 0.3: logits far from 0, so the check means something
        wants.append((want_max, want_ent))
    # the recorder takes every layer's heads in one computation (3 sequences: all of them recorded), from q and k
    # or, when the forward computed it, from the attention's own entropy
    for output_entropy in (False, True):
        rec = FlightRecorder(model, capacity=2)
        rec.begin(1)
        with torch.no_grad():
            model(idx, output_entropy=output_entropy)
        rec.end(0.0, 0.0)
        got = rec.records[0]
        rec.close()
        assert torch.allclose(torch.tensor(got["max_logit"]), torch.stack([w[0] for w in wants]), rtol=1e-5, atol=1e-5)
        assert torch.allclose(torch.tensor(got["head_entropy"]), torch.stack([w[1] for w in wants]), rtol=1e-4,
                              atol=1e-5)


def test_ring_buffer_cadence_and_residual_norms():
    cfg = tiny_cfg(f"model.vocab_size={V}")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    model.eval()  # no dropout: the reference forwards below see the same activations
    idx = torch.randint(0, V, (4, T))
    want = []
    for batch in (idx, idx[:2]):  # two micro-batches of one step: the recorder averages them
        with torch.no_grad(), capture(model, lambda n: n.endswith("hook_resid_post")) as acts:
            model(batch)
        want.append([acts[f"blocks.{i}.hook_resid_post"].norm(dim=-1).mean().item() for i in range(2)])
    rec = FlightRecorder(model, capacity=3, every=2)
    for step in range(1, 10):
        rec.begin(step)
        with torch.no_grad():
            model(idx)
            model(idx[:2])
        rec.end(float(step), 0.5)
        if rec.records and rec.records[-1]["step"] == step:
            assert rec.records[-1]["resid_norm"] == pytest.approx([(a + b) / 2 for a, b in zip(*want)], rel=1e-5)
            assert rec.records[-1]["loss"] == step
    assert [r["step"] for r in rec.records] == [2, 4, 6, 8]  # step 1 (the first), then every 2nd; last 3 + 1 kept
    assert all(len(r["head_entropy"]) == 2 and len(r["head_entropy"][0]) == 2 for r in rec.records)
    rec.close()
    off = FlightRecorder(model, capacity=0)
    hooks = [m._forward_hooks for m in model.modules() if m is not model]
    assert not any(hooks)  # closed, and off registers nothing
    rec = FlightRecorder(model, capacity=3, every=2)
    rec.begin(3)  # the first step is always recorded: hooks attached for it only
    assert any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model(idx)
    rec.end(1.0, 1.0)
    assert len(rec.records) == 1
    rec.begin(3)  # not a recorded step (3 % 2): nothing attached
    assert not any(m._forward_hooks for m in model.modules())
    rec.end(1.0, 1.0)
    off.begin(1)
    off.end(1.0, 1.0)
    assert off.dump(None, 2, math.nan, math.nan, "x") == ""


@pytest.mark.slow
def test_forced_divergence_dumps_the_window_before_the_nan(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as err:
        train(tiny_cfg(*DIVERGE, "train.flight_steps=4", preset="SM"), run, quiet=True, data=synthetic_data())
    msg = str(err.value)
    trace = json.loads((run / FLIGHT_FILE).read_text())
    step = trace["divergence_step"]
    assert re.search(rf"diverged at step {step}\b", msg) and "flight recorder (steps" in msg and "\n" not in msg
    records = trace["records"]
    # the window: the last 4 steps before the divergence, all with a finite loss; the diverging step apart
    assert [r["step"] for r in records] == list(range(step - 4, step)) and step >= 5  # a full window
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records)
    assert records[-1]["step"] < step and trace["at_divergence"]["step"] == step
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["loss"] for m in metrics if m["kind"] == "train"}
    assert [r["loss"] for r in records] == pytest.approx([logged[r["step"]] for r in records], rel=1e-6)
    # the verdict names layers/heads and how far before the divergence
    v = trace["verdict"]
    assert v["first"] in ("collapse", "logit_blowup", "resid_blowup")
    first = v["events"][v["first"]]
    assert first["steps_before"] == step - first["step"] >= 0 and first["where"]
    assert re.search(r"L[01](h[01])? \(", msg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] and summary["diagnosis"] == msg

    # `privlm entropy RUN` prints the verdict and the recorded steps
    capsys.readouterr()
    assert main(["entropy", str(run)]) == 0
    out = capsys.readouterr().out
    assert "flight recorder (steps" in out and f"before the divergence at step {step}" in out
    assert re.search(rf"^\s*{step - 1} ", out, re.M) and "<- diverged" in out

    # the report draws the trace and the run row carries the verdict
    from privlm.report import build_report
    rows = build_report([run], tmp_path / "r.html", tmp_path / "fig")
    assert (tmp_path / "fig" / "flight-run.png").is_file()
    assert rows[0].divergence_step == step and rows[0].flight.first == v["first"]


@pytest.mark.slow
def test_recorder_off_and_finished_runs_leave_no_trace(tmp_path):
    with pytest.raises(DivergenceError) as err:
        train(tiny_cfg(*DIVERGE, "train.flight_steps=0", preset="SM"), tmp_path / "off", quiet=True,
              data=synthetic_data())
    assert "flight recorder" not in str(err.value) and not (tmp_path / "off" / FLIGHT_FILE).exists()
    train(tiny_cfg("train.max_steps=4"), tmp_path / "ok", quiet=True, data=synthetic_data())
    assert read_trace(tmp_path / "ok") is None


def test_bad_trace_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / FLIGHT_FILE).write_text("{not json")
    from privlm.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_trace(tmp_path)
    (tmp_path / FLIGHT_FILE).write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not a flight-recorder trace"):
        read_trace(tmp_path)


def _row(preset, lr, diverged, step=None, ppl=None, first=None):
    flight = {"first": first, "event_step": step - 3, "steps_before": 3, "where": ["L5h1", "L5h2", "L4h0"],
              "line": "x"} if first else None
    return {"preset": preset, "lr": lr, "diverged": diverged, "divergence_step": step, "ppl": ppl,
            "finished": True, "max_steps": 100, "flight": flight}


def test_stability_map_table_claim_and_figure(tmp_path):
    from privlm.report.analysis import stability_cell_text, stability_map
    from privlm.report.claims import claim_c1_stability
    rows = [_row("SM+LN+G", 1e-3, False, ppl=80.0), _row("SM+LN+G", 1e-2, False, ppl=95.5),
            _row("SM", 1e-3, False, ppl=120.0), _row("SM", 1e-2, True, step=24, first="collapse"),
            _row("SM+WN(ffn)", 1e-3, False, ppl=110.0), _row("SM+WN(ffn)", 1e-2, False, ppl=130.0),
            _row("SM+ScFuFFN", 1e-3, True, step=40, first="logit_blowup"), _row("SM+ScFuFFN", 1e-2, False, ppl=1.0)]
    presets, lrs, cells = stability_map(rows)
    assert presets == ["SM+LN+G", "SM", "SM+WN(ffn)", "SM+ScFuFFN"] and lrs == [1e-3, 1e-2]
    assert stability_cell_text(cells[("SM", 1e-2)]) == "NaN @ 24 (collapse -3: L5h1,L5h2)"
    assert stability_cell_text(cells[("SM+LN+G", 1e-2)]) == "PPL 95.5"
    c1 = claim_c1_stability(rows)
    # SM stable up to 1e-3; WN up to 1e-2 (wider); ScFuFFN diverged at the smallest rate (narrower): not all wider
    assert c1["stable_up_to"] == {"SM": 1e-3, "SM+WN(ffn)": 1e-2, "SM+ScFuFFN": None} and c1["holds"] is False
    assert claim_c1_stability([r for r in rows if r["preset"] != "SM+ScFuFFN"])["holds"] is True
    assert claim_c1_stability([r for r in rows if r["lr"] == 1e-3]) is None  # one rate: no map
    # an untested (or unfinished) cell is skipped, not counted as stable or unstable
    partial = [r for r in rows if not (r["preset"] == "SM" and r["lr"] == 1e-3)]
    partial.append({**_row("SM", 1e-3, False), "finished": False})
    assert claim_c1_stability(partial)["stable_up_to"]["SM"] is None
    partial += [_row("SM", 3e-3, False, ppl=100.0)]
    assert claim_c1_stability(partial)["stable_up_to"]["SM"] == 3e-3

    from privlm.report.figures import stability_map_figure
    from privlm.report.runs import RunData
    runs = []
    for preset, lr, div in (("SM", 1e-3, False), ("SM", 1e-2, True), ("SM+LN+G", 1e-3, False), ("SM+LN+G", 1e-2, False)):
        cfg = load_config(preset, [f"train.lr={lr}", "train.max_steps=100"])
        runs.append(RunData(tmp_path / f"{preset}-{lr}", cfg, {"preset": preset, "diverged": div, "steps": 30,
                                                               "final_ppl": None if div else 50.0}))
    fig = stability_map_figure(runs)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["NaN @ 31", "PPL 50.0", "PPL 50.0", "PPL 50.0"]
    assert stability_map_figure(runs[::2]) is None
