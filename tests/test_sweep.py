"""`privlm sweep`: resolution of presets/grids, one-line errors, and resume of an interrupted sweep with
real (tiny) `privlm train` runs: finished runs are never retrained, a partial run continues from its
checkpoint, a run directory without a checkpoint is moved aside, results come out in Table 3 layout."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from privlm.cli import main
from privlm.config import ConfigError
from privlm.sweep import load_sweep, run_sweep
from privlm.train.rundir import run_status

pytestmark = pytest.mark.slow  # make test-fast leaves this file out

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "cpu" / "tiny.yaml"
FAST = ["model.n_embd=32", "train.max_steps=6", "train.batch_size=2", "train.eval_every=3",
        "train.eval_max_batches=2", "train.save_every=2", "train.entropy_every=2", "train.log_every=2"]


def write_sweep(path: Path, runs, overrides=FAST, **extra) -> Path:
    spec = {"name": "t", "config": str(TINY), "overrides": list(overrides), "runs": runs, **extra}
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_presets_and_grid_resolve_with_shared_budget(tmp_path):
    f = write_sweep(tmp_path / "s.yaml", ["SM+LN+G", {"preset": "EReg(SM(t)+ScFuFFN)", "name": "ereg",
                                                      "overrides": ["reg.lambda_=1e-4"]}],
                    grid={"reg.gamma": [0.0, 0.1]}, baseline="SM+LN+G")
    sw = load_sweep(f)
    assert [r.name for r in sw.runs] == ["sm-ln-g-gamma=0.0", "sm-ln-g-gamma=0.1", "ereg-gamma=0.0", "ereg-gamma=0.1"]
    assert [r.cfg.reg.gamma for r in sw.runs] == [0.0, 0.1, 0.0, 0.1]
    ereg = sw.runs[3].cfg
    assert ereg.reg.enabled and ereg.reg.lambda_ == 1e-4 and ereg.model.attn_temperature and ereg.model.ffn == "fused"
    base = sw.runs[0].cfg
    assert base.model.norm == "layernorm" and base.model.n_embd == 32 and base.model.n_layer == 2  # tiny.yaml
    # same data, budget and seed for every entry
    for r in sw.runs:
        assert (r.cfg.data, r.cfg.train.max_steps, r.cfg.train.batch_size, r.cfg.train.seed) == \
               (base.data, 6, 2, base.train.seed)


def test_inline_base_config_and_shipped_sweeps_resolve(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("config: {model: {n_layer: 3, n_head: 2, n_embd: 64}, train: {max_steps: 7}}\nruns: [SM+R, SM]\n")
    sw = load_sweep(f)
    assert [(r.cfg.model.n_layer, r.cfg.model.activation, r.cfg.train.max_steps) for r in sw.runs] == \
           [(3, "relu", 7), (3, "identity", 7)]
    cpu = load_sweep(ROOT / "configs" / "sweeps" / "cpu-study.yaml")
    assert [r.preset for r in cpu.runs] == [
        "SM+LN+G", "SM+LN+R", "SM+LN", "SM+G", "SM+R", "SM", "SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN",
        "SM+ScFuFFN", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)"]
    assert all(r.cfg.model.n_layer >= 4 and r.cfg.model.n_head >= 4 for r in cpu.runs)
    assert len({(r.cfg.train.max_steps, r.cfg.train.batch_size, r.cfg.train.seed, r.cfg.data.seq_len)
                for r in cpu.runs}) == 1
    seeds = load_sweep(ROOT / "configs" / "sweeps" / "cpu-study-seeds.yaml")
    by_preset = {r.preset: r.cfg for r in cpu.runs}
    for r in seeds.runs:  # the seed study differs from the study in the seed only
        assert r.cfg.train.seed in (1, 2)
        r.cfg.train.seed = by_preset[r.preset].train.seed
        assert r.cfg == by_preset[r.preset]
    gamma = load_sweep(ROOT / "configs" / "sweeps" / "paper-gamma.yaml")
    assert [r.cfg.reg.gamma for r in gamma.runs] == [0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30]
    assert all(r.cfg.reg.enabled and r.cfg.model.n_layer == 12 for r in gamma.runs)
    assert len({r.name for r in gamma.runs}) == 7
    paper = load_sweep(ROOT / "configs" / "sweeps" / "paper-table3.yaml")
    assert paper.runs[0].cfg.model.n_layer == 12 and paper.runs[0].cfg.model.n_embd == 768
    assert paper.runs[0].cfg.data.source.startswith("hf:")


@pytest.mark.parametrize("text,match", [
    ("runs: [SM+LN+G]\nbogus: 1\n", "unknown key"),
    ("runs: [SM+XX]\n", r"runs\[0\].*unknown preset"),
    ("runs: [SM+LN+G, SM+LN+G]\n", "share the directory"),
    ("runs: [SM+LN+G]\nbaseline: SM+R\n", "baseline 'SM\\+R' is not one of the runs"),
    ("runs: [SM+LN+G]\noverrides: [train.max_steps=-1]\n", "train.max_steps"),
    ("runs: [SM]\ngrid: {reg.gamma: []}\n", "non-empty lists"),
    ("- SM\n", "must be a mapping"),
])
def test_bad_sweep_files_fail_with_one_line(tmp_path, text, match):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_sweep(f)
    assert "\n" not in str(err.value)


def test_interrupted_sweep_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    f = write_sweep(tmp_path / "s.yaml", ["SM+LN+G", "SM+ScFuFFN"], baseline="SM+LN+G")
    out = tmp_path / "out"
    first, second = out / "sm-ln-g", out / "sm-scfuffn"
    second.mkdir(parents=True)
    (second / "leftover.txt").write_text("a run directory without any checkpoint")

    # 1) stop after the first run
    assert main(["sweep", str(f), "--out", str(out), "--max-runs", "1"]) == 0
    assert run_status(first) == "done" and run_status(second) == "incomplete"
    metrics_before = (first / "metrics.jsonl").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    # 2) Ctrl-C in the middle of the second run, right after its step-4 checkpoint
    from privlm.train import loop
    real_save = loop.Trainer._save

    def save_then_interrupt(self):
        real_save(self)
        if self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "_save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(f), out, log=lambda *_: None)
    monkeypatch.undo()
    aside = list(out.glob("sm-scfuffn.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "leftover.txt").is_file()  # moved, not deleted
    assert run_status(second) == "resumable"
    partial = (second / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["step"] for x in partial) == 4

    # 3) the same command again: first run untouched, second resumed from step 4 and finished
    readme = "# page\n\n<!-- privlm:begin setup -->\nstale\n<!-- privlm:end setup -->\n\nProse stays.\n"
    (out / "README.md").write_text(readme)  # a results page: the sweep rewrites its blocks, nothing else
    capsys.readouterr()
    assert main(["sweep", str(f), "--out", str(out)]) == 0
    page = (out / "README.md").read_text()
    assert "stale" not in page and page.endswith("\n\nProse stays.\n") and page.startswith("# page\n\n")
    assert f"2 runs of 2 variants: {6 * 2 * 128:,} training tokens per run (6 optimizer steps)" in page
    log = capsys.readouterr().out
    assert "sm-ln-g: already finished, skipped" in log and "sm-scfuffn: resuming" in log
    assert (first / "metrics.jsonl").read_bytes() == metrics_before
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes
    records = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [2, 4, 6]  # no step repeated or lost across the interruption
    assert records[:len(partial)] == [json.loads(x) for x in partial]  # the part before Ctrl-C is kept as is
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_trained"] == 6 * 2 * 128

    # results in Table 3 layout, savings relative to the baseline, plus the report
    res = json.loads((out / "results.json").read_text())
    rows = {r["preset"]: r for r in res["rows"]}
    assert rows["SM+LN+G"]["comm_savings"] == pytest.approx(1.0)
    assert rows["SM+ScFuFFN"]["comm_savings"] == pytest.approx(
        rows["SM+LN+G"]["comm_gb"] / rows["SM+ScFuFFN"]["comm_gb"])
    assert rows["SM+LN+G"]["ppl"] == pytest.approx(json.loads((first / "summary.json").read_text())["final_ppl"])
    md = (out / "results.md").read_text()
    assert "| Network Arch. | PPL | #Nonlinear Ops | FFN FLOPs | Attn FLOPs | Comm. (GB) | Lat. (min.) | Comm. Sav. | Lat. Sav." in md
    assert re.search(r"\| SM\+ScFuFFN \| [\d.]+ \| SM:4×R\^\{128×128\} \|", md)
    assert (out / "report.html").stat().st_size > 10000 and (out / "figures" / "entropy-heatmaps.png").is_file()
    assert not list((out / "figures").glob("*.svg"))
    state = json.loads((out / "sweep.json").read_text())
    assert {k: v["status"] for k, v in state["runs"].items()} == {"sm-ln-g": "done", "sm-scfuffn": "done"}


def test_changed_sweep_config_is_refused_before_training(tmp_path, capsys):
    f = write_sweep(tmp_path / "s.yaml", ["SM+LN+G"])
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out)]) == 0
    before = (out / "sm-ln-g" / "metrics.jsonl").read_bytes()
    write_sweep(f, ["SM+LN+G"], overrides=FAST + ["train.lr=0.003"])
    capsys.readouterr()
    assert main(["sweep", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another config (train.lr: sweep 0.003 vs run 0.001)" in err
    assert (out / "sm-ln-g" / "metrics.jsonl").read_bytes() == before


def test_parallel_sweep_resumes_after_ctrl_c_and_matches_one_job(tmp_path):
    """`--jobs 2`: two runs train at once in their own processes; an interrupt of the sweep process alone (SIGTERM
    to the parent, the harder case than Ctrl-C, which also reaches the children) stops both runs after
    checkpoints and leaves no process behind; the same command resumes both to the end, and every run's numbers
    equal those of the same run trained alone (one thread) from scratch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from privlm.train import train

    steps = ["model.n_embd=32", "train.max_steps=40", "train.batch_size=2", "train.eval_every=20",
             "train.eval_max_batches=2", "train.save_every=5", "train.entropy_every=10", "train.log_every=5"]
    f = write_sweep(tmp_path / "s.yaml", ["SM+LN+G", "SM+ScFuFFN"], overrides=steps)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "privlm.cli", "sweep", str(f), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    dirs = [out / "sm-ln-g", out / "sm-scfuffn"]
    deadline = time.time() + 240
    while time.time() < deadline and not all((d / "state" / "LATEST").is_file() for d in dirs):
        time.sleep(0.05)
    assert all((d / "state" / "LATEST").is_file() for d in dirs), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in log, log
    for _ in range(100):  # the session's processes: the runs (and multiprocessing's tracker) must be gone
        leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not leftover:
            break
        time.sleep(0.1)
    assert leftover == [], f"processes still alive after the sweep stopped: {leftover}"
    state = json.loads((out / "sweep.json").read_text())
    assert {v["status"] for v in state["runs"].values()} == {"interrupted"}  # both were mid-run together
    assert all(run_status(d) == "resumable" for d in dirs)
    assert all((out / "logs" / f"{d.name}.log").is_file() for d in dirs)

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": resuming") == 2 and "wrote" in res.stdout
    state = json.loads((out / "sweep.json").read_text())
    assert {k: v["status"] for k, v in state["runs"].items()} == {"sm-ln-g": "done", "sm-scfuffn": "done"}

    sweep = load_sweep(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = train(sweep.runs[1].cfg, tmp_path / "alone", quiet=True)
    finally:
        torch.set_num_threads(threads)
    for d in dirs:
        recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(5, 41, 5))  # none lost/repeated
    got = json.loads((dirs[1] / "summary.json").read_text())
    assert got["steps"] == 40 and got["final_loss"] == alone["final_loss"]  # exact resume, same numbers
    def numbers(run_dir):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r["step"], r.get("loss"), r.get("head_entropy")) for r in recs]
    assert numbers(dirs[1]) == numbers(tmp_path / "alone")
    assert (out / "results.md").is_file() and "| SM+ScFuFFN |" in (out / "results.md").read_text()


def test_study_v2_stability_map_grid_and_gpu_sweeps_resolve():
    sweeps = ROOT / "configs" / "sweeps"
    v1 = load_sweep(sweeps / "cpu-study.yaml")
    v2 = load_sweep(sweeps / "cpu-study-v2.yaml")
    tokens = {r.name: r.cfg.train.max_steps * r.cfg.train.batch_size * r.cfg.train.grad_accum * r.cfg.data.seq_len
              for r in v2.runs}
    assert min(tokens.values()) >= 5_000_000
    assert [r.preset for r in v2.runs[:12]] == [r.preset for r in v1.runs]  # the same 12 variants
    seeds: dict[str, set] = {}
    for r in v2.runs:
        seeds.setdefault(r.preset, set()).add(r.cfg.train.seed)
    three = {"SM+LN+G", "SM+G", "SM+R", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)"}
    assert {p for p, s in seeds.items() if len(s) == 3} == three and all(len(s) == 1 for p, s in seeds.items()
                                                                          if p not in three)
    base = v2.runs[0].cfg
    for r in v2.runs:  # one data set, model size, budget and schedule; only the seed (and the preset) differ
        assert (r.cfg.data, r.cfg.train.max_steps, r.cfg.train.lr, r.cfg.model.n_layer, r.cfg.model.n_embd) == \
               (base.data, base.train.max_steps, base.train.lr, base.model.n_layer, base.model.n_embd)

    grid = load_sweep(sweeps / "ereg-grid-v2.yaml")
    pairs = {(r.cfg.reg.lambda_, r.cfg.reg.gamma) for r in grid.runs if r.cfg.reg.enabled}
    assert len(pairs) == 9 and sum(not r.cfg.reg.enabled for r in grid.runs) == 1
    assert all(r.cfg.train.seed not in seeds["SM+LN+G"] for r in grid.runs)  # not one of the study's seeds
    assert all(r.cfg.model == v2.runs[11].cfg.model for r in grid.runs if r.cfg.reg.enabled)

    smap = load_sweep(sweeps / "stability-map.yaml")
    assert sorted({r.cfg.train.lr for r in smap.runs}) == [1e-3, 3e-3, 1e-2, 3e-2] and len(smap.runs) == 24
    assert {"SM", "SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN", "SM+ScFuFFN", "SM+LN+G"} == {r.preset for r in smap.runs}
    assert all(r.cfg.train.flight_steps > 0 and r.cfg.train.flight_every == 1 for r in smap.runs)

    gpu = load_sweep(sweeps / "gpu-study.yaml")
    assert len(gpu.runs) == 6 and gpu.runs[0].cfg.model.n_embd == 768
    assert all(r.cfg.train.max_steps * r.cfg.train.batch_size * r.cfg.data.seq_len >= 50_000_000 for r in gpu.runs)
    # the released-code penalty is a sum over the micro-batch: lambda scales as 1/B from the paper's 1e-5 at B=128
    for sw in (v2, gpu):
        ereg = next(r.cfg for r in sw.runs if r.cfg.reg.enabled)
        assert ereg.reg.lambda_ == pytest.approx(1e-5 * 128 / ereg.train.batch_size)


# --- study v3: selection on the held-out split, the study's sweeps, the GPU study's C1 --------------------
def _study_v3_tree(tmp_path, overrides=("reg.lambda_=0.00032", "reg.gamma=0.1")):
    """The v3 sweep files and base config copied into tmp_path with a selection.json at the path they read."""
    import shutil
    for rel in ["configs/cpu/study-v3.yaml", *(f"configs/sweeps/{n}.yaml" for n in
                ("ereg-grid-v3", "cpu-study-v3-5m", "cpu-study-v3-10m", "stability-map-v3"))]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    sel = tmp_path / "docs" / "results" / "cpu-study-v3" / "ereg-grid" / "selection.json"
    sel.parent.mkdir(parents=True)
    if overrides is not None:
        sel.write_text(json.dumps({"format": "privlm-selection/1", "overrides": list(overrides)}))
    return tmp_path / "configs" / "sweeps"


def _tokens(r):
    return r.cfg.train.max_steps * r.cfg.train.batch_size * r.cfg.train.grad_accum * r.cfg.data.seq_len


def _seeds(sweep):
    out: dict[str, set] = {}
    for r in sweep.runs:
        out.setdefault(r.preset, set()).add(r.cfg.train.seed)
    return out


def test_study_v3_sweeps_resolve_with_the_held_out_selection(tmp_path):
    import yaml
    sweeps = _study_v3_tree(tmp_path)
    grid, s5, s10 = (load_sweep(sweeps / f"{n}.yaml") for n in ("ereg-grid-v3", "cpu-study-v3-5m", "cpu-study-v3-10m"))
    # the stability map's 84 entries read as written; its first 7 (one per variant) resolved (OmegaConf is slow)
    raw = yaml.safe_load((sweeps / "stability-map-v3.yaml").read_text())
    cells = {(e["preset"], *sorted(e["overrides"])) for e in raw["runs"]}
    assert len(raw["runs"]) == len(cells) == 84
    raw["runs"], raw["baseline"] = raw["runs"][:7], raw["runs"][0]["name"]
    (sweeps / "stability-map-v3.yaml").write_text(yaml.safe_dump(raw))
    smap = load_sweep(sweeps / "stability-map-v3.yaml")
    # the grid: 9 (lambda, gamma) pairs and the unregularized reference, selected among the EReg runs
    assert len({(r.cfg.reg.lambda_, r.cfg.reg.gamma) for r in grid.runs if r.cfg.reg.enabled}) == 9
    assert grid.select == {"among": "EReg(SM(t)+ScFuFFN)", "keys": ["reg.lambda_", "reg.gamma"]}
    # the selected values reach every EReg run of the study; the grid's seed is none of the study's
    for sw in (s5, s10):
        assert all((r.cfg.reg.lambda_, r.cfg.reg.gamma) == (3.2e-4, 0.1) for r in sw.runs if r.cfg.reg.enabled)
        assert all(r.cfg.train.seed != grid.runs[0].cfg.train.seed for r in sw.runs)
    c4 = {"SM+ScFuFFN", "SM(t)+ScFuFFN", "EReg(SM(t)+ScFuFFN)"}
    assert _seeds(s5) == {p: {1337, 1, 2} for p in c4} and {_tokens(r) for r in s5.runs} == {5_013_504}
    seeds10 = _seeds(s10)
    assert {p: len(s) for p, s in seeds10.items()} == {**{p: 3 for p in c4}, "SM+G": 5, "SM+R": 5,
                                                        "SM+LN+G": 3, "SM+LN+R": 3}
    assert seeds10["SM+LN+R"] <= seeds10["SM+R"] and {_tokens(r) for r in s10.runs} == {10_027_008}
    # one data set (with the held-out split) and one model for grid and study; >= 8 points of validation loss
    for r in [*grid.runs, *s5.runs, *s10.runs]:
        assert r.cfg.data == grid.runs[0].cfg.data and r.cfg.data.heldout_fraction > 0
        assert r.cfg.model.n_layer == 4 and r.cfg.train.max_steps // r.cfg.train.eval_every >= 8
    # stability map: 7 variants x 4 rates x 3 seeds, the unscaled fused FFN among them
    assert {(p, lr, sd) for p, lr, sd in cells} == {(p, f"train.lr={lr}", f"train.seed={sd}") for p in
                                                      {r.preset for r in smap.runs}
                                                      for lr in ("0.001", "0.003", "0.01", "0.03") for sd in (1337, 1, 2)}
    assert len(smap.runs) == 7 and all(r.cfg.model.n_layer == 6 for r in smap.runs)
    fu = next(r.cfg.model for r in smap.runs if r.preset == "SM+FuFFN")
    assert (fu.ffn, fu.ffn_scaling, fu.norm) == ("fused", False, "none")
    assert all(r.cfg.train.max_steps // r.cfg.train.eval_every >= 8 and r.cfg.train.flight_every == 1
               for r in smap.runs)


def test_study_v3_needs_its_selection(tmp_path, capsys):
    sweeps = _study_v3_tree(tmp_path, overrides=None)
    with pytest.raises(ConfigError, match="overrides_from .* does not exist yet: run the selection sweep"):
        load_sweep(sweeps / "cpu-study-v3-5m.yaml")
    sel = tmp_path / "docs" / "results" / "cpu-study-v3" / "ereg-grid" / "selection.json"
    sel.write_text(json.dumps({"format": "privlm-selection/1", "overrides": []}))  # nothing selected yet
    assert main(["sweep", str(sweeps / "cpu-study-v3-10m.yaml"), "--list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no selected overrides" in err
    sel.write_text("[1]")
    with pytest.raises(ConfigError, match="selection.json' is malformed"):
        load_sweep(sweeps / "cpu-study-v3-5m.yaml")
    sel.write_text(json.dumps({"format": "other/1", "overrides": ["reg.gamma=0.1"]}))
    with pytest.raises(ConfigError, match="is not a privlm-selection/1 file"):
        load_sweep(sweeps / "cpu-study-v3-5m.yaml")


def test_selection_picks_the_lowest_held_out_ppl_among_the_candidates(tmp_path, monkeypatch):
    from privlm import selection
    from privlm.report.readme import block_selection
    from privlm.results import RunRow

    grid = load_sweep(_study_v3_tree(tmp_path) / "ereg-grid-v3.yaml")
    held = {r.name: 100.0 + i for i, r in enumerate(grid.runs)}
    held["no-reg"] = 50.0  # the reference is scored but never selected
    held["ereg-lambda=8e-05-gamma=0.3"] = 90.0
    monkeypatch.setattr(selection, "heldout_eval", lambda out, name: {"ppl": held[name], "tokens": 1000})
    rows = {r.name: RunRow(name=r.name, label=r.name, preset=r.preset, finished=True, ppl=held[r.name] + 1,
                           seed=7) for r in grid.runs[:-1]}  # the last run has not finished
    sel = selection.select(grid.runs, rows, tmp_path, grid.select, log=lambda *a: None)
    assert sel["selected"] == "ereg-lambda=8e-05-gamma=0.3"
    assert sel["overrides"] == ["reg.lambda_=8e-05", "reg.gamma=0.3"]
    assert sel["not_finished"] == [grid.runs[-1].name] and len(sel["runs"]) == 9
    # what the study reads back is what was selected
    path = tmp_path / "docs" / "results" / "cpu-study-v3" / "ereg-grid" / "selection.json"
    path.write_text(json.dumps(sel))
    with pytest.raises(ConfigError, match=r"is a partial selection \(1 run\(s\) of the selection sweep not finished"):
        selection.selection_overrides(path, "x")  # the last candidate could still win
    path.write_text(json.dumps({**sel, "not_finished": []}))
    assert selection.selection_overrides(path, "x") == ["reg.lambda_=8e-05", "reg.gamma=0.3"]
    s5 = load_sweep(tmp_path / "configs" / "sweeps" / "cpu-study-v3-5m.yaml")
    assert {(r.cfg.reg.lambda_, r.cfg.reg.gamma) for r in s5.runs if r.cfg.reg.enabled} == {(8e-5, 0.3)}
    text = block_selection(path.parent)
    assert "| **ereg-lambda=8e-05-gamma=0.3** | 8e-05 | 0.3 | 90.00 | 91.00 |" in text
    assert "| no-reg | – | – | 50.00 | 51.00 |" in text  # the reference: scored, its reg keys unused
    assert "handed to the study as `reg.lambda_=8e-05`, `reg.gamma=0.3`" in text


def test_study_v3_readme_template_has_only_generated_numbers():
    from privlm.report.readme import BLOCK_RE, BLOCKS, OPEN_RE, bare_numbers
    text = (ROOT / "docs" / "templates" / "cpu-study-v3.md").read_text()
    blocks = [(m.group("name"), m.group("dir")) for m in BLOCK_RE.finditer(text)]
    assert len(OPEN_RE.findall(text)) == 2 * len(blocks) and all(n in BLOCKS for n, _ in blocks)
    # the --results of each step, and the study's folder itself (its time over all steps)
    assert {d for _, d in blocks} == {"ereg-grid", "5m", "10m", "stability-map", None}
    assert ("study-time", None) in blocks
    assert not bare_numbers(text)
    header = (ROOT / "configs" / "sweeps" / "cpu-study-v3-10m.yaml").read_text()
    for _, d in blocks:
        if d is not None:
            assert f"--results docs/results/cpu-study-v3/{d} --jobs 2" in header


def test_gpu_study_c1_in_the_papers_form():
    c1 = load_sweep(ROOT / "configs" / "sweeps" / "gpu-study-c1.yaml")
    gpu = load_sweep(ROOT / "configs" / "sweeps" / "gpu-study.yaml")
    assert [r.preset for r in c1.runs] == ["SM+LN+G", "SM", "SM+WN(ffn)", "SM+SN(ffn)", "SM+ScFFN"]
    for r in c1.runs:
        m = r.cfg.model
        assert (m.n_layer, m.n_head, m.n_embd, r.cfg.train.device) == (12, 12, 768, "cuda")
        assert r.cfg.data == gpu.runs[0].cfg.data  # the GPU study's corpus and token cache
        assert r.cfg.train.max_steps // r.cfg.train.eval_every >= 8 and r.cfg.train.eval_curve_batches
    assert "gpu-study-c1.yaml" in (ROOT / "configs" / "sweeps" / "gpu-study.yaml").read_text()
    assert c1.slurm.gpus == 1


def test_heldout_scores_are_cached_by_the_weights_they_scored(tmp_path, monkeypatch):
    """`heldout_eval` scores a run once per set of weights: a cache naming the same weights' SHA-256 is reused;
    other weights, or a cache file that does not read as one, are scored again (and the cache rewritten)."""
    import hashlib

    import privlm.evaluate
    from privlm import selection
    calls = []
    monkeypatch.setattr(privlm.evaluate, "evaluate_run",
                        lambda run, split, device: calls.append((run, split)) or {"ppl": 12.5, "tokens": 640})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.safetensors").write_bytes(b"weights one")
    assert selection.heldout_eval(tmp_path, "r") == {"ppl": 12.5, "tokens": 640}
    assert calls == [(str(tmp_path / "r"), "heldout")]
    saved = json.loads((tmp_path / "heldout" / "r.json").read_text())
    assert saved["weights_sha256"] == hashlib.sha256(b"weights one").hexdigest()
    assert selection.heldout_eval(tmp_path, "r") == {"ppl": 12.5, "tokens": 640} and len(calls) == 1  # cached
    (tmp_path / "r" / "model.safetensors").write_bytes(b"weights two")
    selection.heldout_eval(tmp_path, "r")
    assert len(calls) == 2  # new weights: scored again
    (tmp_path / "heldout" / "r.json").write_text('{"weights_sha256": 3, "result": []}')
    selection.heldout_eval(tmp_path, "r")
    assert len(calls) == 3  # not a cache: scored again
    assert json.loads((tmp_path / "heldout" / "r.json").read_text())["result"] == {"ppl": 12.5, "tokens": 640}
