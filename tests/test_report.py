"""Figures and the HTML report, from synthetic run directories in the CONTRACTS.md layout and from
real `privlm train` runs; the HTML is opened in headless Chromium."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from privlm.cli import main
from privlm.config import from_dict, load_config, to_yaml
from privlm.errors import CheckpointError
from privlm.pi import CostSummary
from privlm.fileio import slug
from privlm.report import analysis, build_report, collect, figures, load_runs
from privlm.report.runs import read_metrics

L, H, T = 4, 4, 32


def write_run(path: Path, preset: str, *, steps: int = 60, collapse: bool = False, seed: int = 0,
              final_ppl: float = 20.0, torn_last_line: bool = False) -> Path:
    """A run directory as `privlm train` writes it (docs/CONTRACTS.md), with made-up telemetry."""
    rng = np.random.default_rng(seed)
    cfg = load_config(preset, [f"model.n_layer={L}", f"model.n_head={H}", "model.n_embd=32",
                               f"data.seq_len={T}", f"model.block_size={T}", "model.vocab_size=256"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    cmax = math.lgamma(T + 1) / T
    lines, tokens_per_step = [], 8 * T
    heads = None
    for step in range(0, steps + 1, 10):
        if step:
            lines.append({"kind": "train", "step": step, "loss": 5 - step / 30, "lr": 1e-3,
                          "tokens": step * tokens_per_step, "tok_per_s": 1000.0, "grad_norm": 1.0})
        frac = step / steps
        depth = np.linspace(0, 1, L)[:, None]
        heads = cmax * (0.2 + 0.75 * rng.random((L, H)))
        if collapse:  # deep layers drift toward zero entropy
            heads = heads * (1 - frac * depth * 0.99)
        nans = [0] * L
        if collapse and step == steps:
            nans = [0] * (L - 1) + [17]
            heads[-1, 0] = math.nan
        lines.append({"kind": "entropy", "step": step, "seq_len": T,
                      "head_entropy": [[None if math.isnan(v) else float(v) for v in row] for row in heads],
                      "layer_mean": [float(np.nanmean(row)) for row in heads], "nan_counts": nans,
                      "reg": None})
        if step % 30 == 0:
            loss = math.log(final_ppl) + 1.5 * (1 - frac)
            lines.append({"kind": "eval", "step": step, "loss": loss, "ppl": math.exp(loss),
                          "tokens": 4064})  # validation tokens evaluated, as privlm train logs them
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    if torn_last_line:
        text += '{"kind": "train", "step": 99, "lo'
    (path / "metrics.jsonl").write_text(text)
    theta = (0.3 + 0.1 * rng.random((L, H))).tolist() if cfg.reg.enabled else None
    (path / "entropy.json").write_text(json.dumps({
        "step": steps, "seq_len": T, "thresholds": theta, "temperatures": None,
        "head_entropy": [[None if math.isnan(v) else float(v) for v in row] for row in heads]}))
    (path / "summary.json").write_text(json.dumps({
        "preset": cfg.model.preset, "params": 12345, "tokens_trained": steps * tokens_per_step, "steps": steps,
        "final_loss": math.log(final_ppl), "final_ppl": None if collapse else final_ppl, "diverged": collapse,
        "diagnosis": "NaN in attention of layer 3 at step 60" if collapse else None}))
    return path


@pytest.fixture
def runs(tmp_path):
    return [write_run(tmp_path / "base", "SM+LN+G", final_ppl=12.0, seed=1),
            write_run(tmp_path / "sm", "SM", collapse=True, seed=2),
            write_run(tmp_path / "fu", "SM+ScFuFFN", final_ppl=15.0, seed=3),
            write_run(tmp_path / "ereg", "EReg(SM(t)+ScFuFFN)", final_ppl=14.0, seed=4, torn_last_line=True)]


# --- pure pieces ---------------------------------------------------------------------------
def test_pareto_front_hand_cases():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.5), (5.0, 1.0)]
    # (3,4) is dominated by (2,3); (2,3.5) by (2,3); (5,1) by (4,1)
    assert analysis.pareto_front(pts) == [0, 1, 3]
    assert analysis.pareto_front([(1.0, 1.0)]) == [0]
    assert analysis.pareto_front([]) == []


def test_slug_is_file_safe_and_distinct():
    names = ["SM+LN+G", "SM+LN+R", "EReg(SM(t)+ScFuFFN)", "SM(t)+ScFuFFN", "SM+WN(ffn)"]
    slugs = [slug(n) for n in names]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[a-z0-9.=-]+", s) for s in slugs)
    assert slug("EReg(SM(t)+ScFuFFN)") == "ereg-sm-t-scfuffn" and slug("lr=0.001") == "lr=0.001" and slug("++") == "run"


def test_read_metrics_ignores_only_a_torn_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"kind":"train","step":1}\n{"kind":"train","st')
    assert read_metrics(f) == [{"kind": "train", "step": 1}]
    f.write_text('{"kind":"train","st\n{"kind":"train","step":1}\n')
    with pytest.raises(CheckpointError, match="line 1"):
        read_metrics(f)


def test_load_runs_reads_contract_layout(runs):
    loaded = load_runs(runs)
    base, sm, fu, ereg = loaded
    assert [r.label for r in loaded] == ["SM+LN+G", "SM", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)"]
    assert base.final_ppl == 12.0 and math.isnan(sm.final_ppl) and sm.diverged
    assert base.head_entropy().shape == (L, H) and np.isnan(sm.head_entropy()[-1, 0])
    assert ereg.thresholds().shape == (L, H) and base.thresholds() is None
    assert from_dict(yaml.safe_load((runs[0] / "config.yaml").read_text())) == base.cfg
    assert ereg.train[-1]["step"] == 60  # the torn line was dropped


def test_duplicate_presets_get_distinct_labels(tmp_path):
    a = write_run(tmp_path / "g0", "EReg(SM(t)+ScFuFFN)")
    b = write_run(tmp_path / "g1", "EReg(SM(t)+ScFuFFN)")
    assert [r.label for r in load_runs([a, b])] == ["EReg(SM(t)+ScFuFFN) [g0]", "EReg(SM(t)+ScFuFFN) [g1]"]


def test_rows_costs_and_diagnosis(runs):
    # a measured SPU run saved beside the checkpoint (`privlm pi run RUN_DIR --json > RUN_DIR/pi_measured.json`)
    (runs[0] / "pi_measured.json").write_text(json.dumps({"protocol": "cheetah", "T": T, "bytes_total": 123456789}))
    loaded = load_runs(runs)
    rows, costs, notes = collect(loaded, baseline="SM+LN+G")
    base, sm, fu, ereg = rows
    # savings are relative to the baseline and equal the ratio of the predicted costs
    assert base.cost.comm_savings == pytest.approx(1.0)
    assert fu.cost.comm_savings == pytest.approx(costs[0].comm_gb / costs[2].comm_gb)
    assert fu.cost == costs[2].relative_to(costs[0])  # the row holds the typed summary
    assert CostSummary.from_dict(fu.to_dict()) == fu.cost  # and results.json stores it flat
    assert fu.cost.comm_savings > 1.0 and fu.cost.lat_savings > 1.0  # LN and GELU removed, FFN fused
    assert base.cost.nonlinear.startswith("SM:16×R^{32×32}") and "LN:8×R^{32×32}" in base.cost.nonlinear
    assert fu.cost.nonlinear == "SM:16×R^{32×32}"
    assert fu.cost.ffn_flops == 2 * L * T * 32 * 32  # fused d×d FFN: 2·L·T·d² (docs/pi-cost.md#two-flop-conventions)
    assert base.cost.ffn_flops == 16 * L * T * 32 * 32
    # the collapsing run: its deepest layer is flagged (NaN entries), the others are not
    assert sm.diverged and sm.ppl is None and sm.diagnosis.nan_total == 17
    assert sm.diagnosis.collapsed and 3 in sm.diagnosis.collapsed_layers and sm.diagnosis.layer_verdicts[0] == "ok"
    assert not base.diagnosis.collapsed
    assert base.spu_bytes == 123456789 and fu.spu_bytes is None and "spu_bytes" not in fu.to_dict()
    from privlm.report.html import summary_table
    assert "0.123 GB (cheetah)" in summary_table(rows)
    assert sum(base.diagnosis.bin_shares) == pytest.approx(1.0)
    # top bin is at least one head: the maximum lies in it by definition
    assert base.diagnosis.top_bin_share >= 1 / (L * H)


@pytest.mark.slow
def test_every_figure_kind_is_drawn(runs, tmp_path):
    loaded = load_runs(runs)
    _, costs, _ = collect(loaded)
    specs = figures.build_figures(loaded, costs)
    names = {s.name for s in specs}
    assert names == {"entropy-bins", "eval-loss", "entropy-heatmaps", "layer-entropy", "nan-counts",
                     "thresholds-ereg-sm-t-scfuffn", "ppl-vs-comm", "ppl-vs-latency"}
    out = tmp_path / "figs"
    for spec in specs:
        png = figures.save_figure(spec, out)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # one format: every figure as PNG, nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s.name}.png" for s in specs)
    # the heatmap prints every head's value (2 decimals) and NaN for the NaN head
    heat = next(s for s in specs if s.name == "entropy-heatmaps").figure
    texts = [t.get_text() for ax in heat.axes for t in ax.texts]
    assert len(texts) == 4 * L * H and "NaN" in texts
    assert f"{loaded[0].head_entropy()[0, 0]:.2f}" in texts
    # eval loss is plotted against training tokens (step x tokens per step), not validation tokens
    loss_fig = next(s for s in specs if s.name == "eval-loss").figure
    assert list(loss_fig.axes[0].get_lines()[0].get_xdata()) == [0.0, 30 * 8 * T, 60 * 8 * T]
    # one line per layer in the layer-entropy panels
    dyn = next(s for s in specs if s.name == "layer-entropy").figure
    assert len(dyn.axes[0].get_lines()) == L + 1  # + the causal-maximum reference line
    # the Pareto plot labels every run by preset; the diverged SM sits on the top edge marked NaN
    par = next(s for s in specs if s.name == "ppl-vs-comm").figure
    labels = [t.get_text() for t in par.axes[0].texts]
    assert set(labels) == {"SM+LN+G", "SM (NaN)", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)"}


def test_eval_loss_figure_draws_every_evaluation_and_the_whole_split_apart(runs):
    import dataclasses
    run = load_runs(runs)[0]
    per_step = run.tokens_at(1)
    # 8 evaluations on the curve's slice, then the final one on the whole split (other token count)
    evals = [{"kind": "eval", "step": 10 * i, "loss": 5.0 - 0.1 * i, "ppl": 0.0, "tokens": 4064} for i in range(1, 9)]
    evals.append({"kind": "eval", "step": 80, "loss": 4.5, "ppl": 0.0, "tokens": 50800})
    fig = figures.eval_loss_curves([dataclasses.replace(run, eval=evals)])
    curve, star = fig.axes[0].get_lines()
    assert list(curve.get_xdata()) == [10 * i * per_step for i in range(1, 9)]
    assert list(curve.get_ydata()) == pytest.approx([5.0 - 0.1 * i for i in range(1, 9)])
    assert list(star.get_xdata()) == [80 * per_step] and list(star.get_ydata()) == [4.5]
    assert star.get_marker() == "*" and star.get_color() == curve.get_color()


def test_bin_histogram_matches_entropy_module(runs):
    from privlm.entropy import entropy_bins
    loaded = load_runs(runs)
    fig = figures.entropy_bin_histogram(loaded)
    bars = [p.get_height() for p in fig.axes[0].patches]
    expected = np.concatenate([100 * np.array(entropy_bins(r.head_entropy()).shares) for r in loaded])
    assert np.allclose(bars, expected)


# --- the report end to end ---------------------------------------------------------------
def chromium_check(html_file: Path, tmp_path: Path) -> str:
    """Open the report in headless Chromium, let a script check every image decoded, return the DOM."""
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
              "const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
              "const p=document.createElement('pre');p.id='probe';"
              "p.textContent='IMAGES '+ok+'/'+imgs.length+' TABLE '+!!document.getElementById('summary-table')"
              "+' ROWS '+document.querySelectorAll('#summary-table tbody tr').length;"
              "document.body.appendChild(p);});</script>")
    probe.write_text(html_file.read_text().replace("</body>", script + "</body>"))
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tmp_path / "chromium-profile"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


TINY = Path(__file__).resolve().parents[1] / "configs" / "cpu" / "tiny.yaml"
FAST = ["model.n_embd=32", "train.max_steps=6", "train.batch_size=2", "train.eval_every=3",
        "train.eval_max_batches=2", "train.save_every=6", "train.entropy_every=2", "train.log_every=2"]


@pytest.mark.slow
def test_report_of_two_tiny_runs_renders_in_chromium(tmp_path, capsys):
    """Two real `privlm train` runs of configs/cpu/tiny.yaml (seconds), reported and opened in Chromium."""
    from privlm.train.loop import train
    dirs = []
    for preset in ("SM+LN+G", "EReg(SM(t)+ScFuFFN)"):
        cfg = load_config(str(TINY), FAST + [f"model.preset={preset}"])
        dirs.append(tmp_path / slug(preset))
        train(cfg, dirs[-1], quiet=True)
    out = tmp_path / "r" / "report.html"
    code = main(["report", *map(str, dirs), "-o", str(out), "--figures", str(tmp_path / "f")])
    assert code == 0 and out.is_file()
    text = out.read_text()
    # no external resource of any kind: every src is a data URI, no link/script tags
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert "<script" not in text and "<link" not in text
    n_img = text.count("<img ")
    # bins, loss, heatmaps, layer entropy, thresholds (the EReg run), NaN counts, PPL vs comm and vs latency
    assert n_img == 8 and len(list((tmp_path / "f").glob("*.png"))) == 8
    assert not list((tmp_path / "f").glob("*.svg"))
    summary = json.loads((dirs[1] / "summary.json").read_text())
    assert f"{summary['final_ppl']:.3f}" in text and "EReg(SM(t)+ScFuFFN)" in text
    dom = chromium_check(out, tmp_path)
    m = re.search(r"IMAGES (\d+)/(\d+) TABLE (\w+) ROWS (\d+)", dom)
    assert m, dom[-2000:]
    assert m.group(1) == m.group(2) == str(n_img) and m.group(3) == "true" and m.group(4) == "2"


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "notrun").mkdir()
    assert main(["report", str(tmp_path / "notrun"), "-o", str(tmp_path / "r.html")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# --- the paper's claims on sweep rows --------------------------------------------------------
def _row(preset, ppl=None, diverged=False, collapsed=False, top=0.1, deep=1.5):
    return {"preset": preset, "ppl": ppl, "diverged": diverged, "collapsed": collapsed,
            "collapsed_layers": [5] if collapsed else [], "deep_layer_min_entropy": deep, "nan_total": 0.0,
            "bin_shares": [0.1, 0.2, 0.7 - top, top]}


def test_claims_verdicts_follow_the_numbers():
    from privlm.report.claims import evaluate_claims
    rows = [_row("SM+LN+G", 2.69), _row("SM+LN+R", 2.76), _row("SM+G", 3.20, top=0.58), _row("SM+R", 2.94, top=0.23),
            _row("SM", None, diverged=True, deep=0.03), _row("SM+WN(ffn)", 3.64), _row("SM+SN(ffn)", 3.63),
            _row("SM+ScFFN", 3.50), _row("SM+ScFuFFN", 3.48), _row("EReg(SM(t)+ScFuFFN)", 3.21)]
    c1, c2, c3, c4 = evaluate_claims(rows)  # the paper's own numbers: every claim holds
    assert [c["holds"] for c in (c1, c2, c3, c4)] == [True, True, True, True]
    assert "58.0% vs SM+R 23.0%" in c2["numbers"]
    assert "3.210 vs SM+ScFuFFN 3.480 (7.8% lower" in c4["numbers"]  # (3.48 - 3.21) / 3.48
    # one seed each: the "<=" part holds unless contradicted, the strict parts cannot be resolved
    assert c3["numbers"].startswith("SM+LN+G 2.690 <= SM+LN+R 2.760 ~ SM+R 2.940 ~ SM+G 3.200")
    assert [c["verdict"] for c in (c2, c3, c4)] == ["not resolved at 1 seed"] * 3

    rows[5] = _row("SM+WN(ffn)", 3.64, collapsed=True)  # a fix that collapses breaks C1
    rows[3] = _row("SM+R", 3.30, top=0.60)  # SM+R worse than SM+G and more overloaded
    rows[-1] = _row("EReg(SM(t)+ScFuFFN)", 3.50)
    c1, c2, c3, c4 = evaluate_claims(rows)
    assert (c1["holds"], c2["holds"], c3["holds"], c4["holds"]) == (False, False, False, False)
    assert c3["parts"] == [True, True, False] and "SM+R 3.300 ~ SM+G 3.200" in c3["numbers"]
    assert "(0.6% higher" in c4["numbers"]
    assert evaluate_claims(rows[:2])[1]["holds"] is None  # SM+G / SM+R absent: not testable


def test_claim_c2_reports_the_verdicts_beside_the_papers_bins():
    from privlm.report.claims import claim_c2
    g = {**_row("SM+G", 3.2, top=0.58), "near_uniform_share": 0.5, "verdict": "entropic overload (layers 0, 1)"}
    r = {**_row("SM+R", 2.9, top=0.23), "near_uniform_share": 0.125, "verdict": "healthy"}
    c2 = claim_c2([g, r])
    assert c2["holds"] and c2["verdict"] == "not resolved at 1 seed" and c2["numbers"].endswith(
        "; near-uniform heads SM+G 50% (entropic overload (layers 0, 1)) vs SM+R 12% (healthy)")
    assert "SM+G − SM+R difference +35.0 pp (one seed: no interval)" in c2["numbers"]


# --- claims as statistics over seeds --------------------------------------------------------------
def _seeded(preset, ppls, tops=None, seeds=(1337, 1, 2, 3, 4)):
    tops = tops or [0.1] * len(ppls)
    return [{**_row(preset, p, top=t), "seed": s, "lr": 1e-3} for p, t, s in zip(ppls, tops, seeds)]


def _exact_bootstrap_quantiles(x, level=0.95):
    """The bootstrap distribution of the mean enumerated exactly (all n^n resamples, equally likely)."""
    import itertools
    x = np.asarray(x, dtype=float)
    means = np.array([x[list(idx)].mean() for idx in itertools.product(range(len(x)), repeat=len(x))])
    a = (1 - level) / 2
    return np.quantile(means, a), np.quantile(means, 1 - a)


def test_bootstrap_interval_of_the_mean_matches_the_exact_bootstrap():
    from privlm.report.claims import RESAMPLES, bootstrap_mean_ci
    # 3 values: each extreme resample (all three draws the same value) has probability 1/27 = 3.7% > 2.5%,
    # so the 95% interval is exactly the range of the values
    assert bootstrap_mean_ci([6.6, 8.6, 8.9]) == pytest.approx((6.6, 8.9), abs=1e-12)
    x = [3.0, -1.0, 4.0, 1.5, 2.0]
    lo, hi = bootstrap_mean_ci(x)
    elo, ehi = _exact_bootstrap_quantiles(x)  # 3,125 resamples enumerated
    # within one atom of the discrete distribution (the means of five halves are multiples of 0.1)
    assert abs(lo - elo) <= 0.1 + 1e-9 and abs(hi - ehi) <= 0.1 + 1e-9 and lo < np.mean(x) < hi
    # the same computation written out with numpy's generator (fixed seed 0, 10,000 resamples)
    idx = np.random.default_rng(0).integers(0, 5, size=(RESAMPLES, 5))
    assert (lo, hi) == tuple(np.percentile(np.asarray(x)[idx].mean(axis=1), [2.5, 97.5]))


def test_unpaired_bootstrap_interval_of_a_difference_of_means():
    from privlm.report.claims import bootstrap_diff_ci
    a, b = [97.0, 98.0, 99.0], [100.0, 104.0]
    lo, hi = bootstrap_diff_ci(a, b, lambda x, y: y - x)
    # exact: mean(a*) takes 97..99, mean(b*) takes 100, 102, 104; the extremes 104 - 97 and 100 - 99 each have
    # probability 1/27 x 1/4 < 2.5%, so the interval lies strictly inside [1, 7] and contains 102 - 98 = 4
    assert 1 < lo < 4 < hi < 7
    rng = np.random.default_rng(0)
    ma = np.asarray(a)[rng.integers(0, 3, size=(10_000, 3))].mean(axis=1)
    mb = np.asarray(b)[rng.integers(0, 2, size=(10_000, 2))].mean(axis=1)
    assert (lo, hi) == tuple(np.percentile(mb - ma, [2.5, 97.5]))


def test_sign_flip_p_by_enumeration():
    from privlm.report.claims import sign_flip_p
    assert sign_flip_p([6.6, 8.6, 8.9]) == 1 / 8  # 3 seeds, all one way: the smallest p there is
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == 1 / 32  # 5 seeds can reach p < 0.05
    # [1, -2, 3], mean 2/3: the sign vectors with mean >= 2/3 are (+,-,+), (+,+,+), (-,+,+): 3 of 8
    assert sign_flip_p([1.0, -2.0, 3.0]) == 3 / 8
    assert sign_flip_p([-1.0, -2.0, -3.0]) == 1.0


def test_c2_paired_by_seed_holds_only_when_the_interval_excludes_zero():
    from privlm.report.claims import claim_c2
    rows = _seeded("SM+G", [3.2, 3.3, 3.1], tops=[0.625, 0.75, 0.625]) + \
        _seeded("SM+R", [2.9, 3.0, 2.95], tops=[0.625, 0.6875, 0.6875])
    c2 = claim_c2(rows)  # paired differences 0, +6.25, -6.25 pp: the interval straddles zero
    assert c2["verdict"] == "not resolved at 3 seeds" and c2["holds"] is False  # equal means 66.7% vs 66.7%
    assert "SM+G 66.7% [62.5%–75.0%, 3 seeds] vs SM+R 66.7% [62.5%–68.8%, 3 seeds]" in c2["numbers"]
    assert "sign-flip p = 0.75 (smallest possible at 3 seeds: 0.125)" in c2["numbers"]
    tops_g, tops_r = [0.58, 0.60, 0.55, 0.62, 0.59], [0.23, 0.25, 0.30, 0.20, 0.24]
    c2 = claim_c2(_seeded("SM+G", [3.2] * 5, tops=tops_g) + _seeded("SM+R", [2.9] * 5, tops=tops_r))
    diffs = [100 * (g - r) for g, r in zip(tops_g, tops_r)]  # 35, 35, 25, 42, 35 pp
    assert c2["verdict"] == "holds" and f"mean +{np.mean(diffs):.1f} pp" in c2["numbers"]
    assert "sign-flip p = 0.0312 (smallest possible at 5 seeds: 0.0312)" in c2["numbers"]
    c2 = claim_c2(_seeded("SM+G", [3.2] * 5, tops=tops_r) + _seeded("SM+R", [2.9] * 5, tops=tops_g))
    assert c2["verdict"] == "contradicted" and c2["holds"] is False


def test_c3_links_are_paired_where_seeds_are_shared_and_unpaired_otherwise():
    from privlm.report.claims import claim_c3
    base = _seeded("SM+LN+G", [48.967, 49.071, 49.739]) + _seeded("SM+R", [94.904, 96.75, 96.1]) + \
        _seeded("SM+G", [99.649, 110.062, 104.0])
    c3 = claim_c3(base + _seeded("SM+LN+R", [45.415]))  # one seed of SM+LN+R: its links are not resolved
    assert c3["part_verdicts"] == ["not resolved at 1 seed", "not resolved at 1 seed", "holds"]
    assert c3["verdict"] == "not resolved at 1 seed"
    assert c3["numbers"].startswith("SM+LN+G 49.259 [48.967–49.739, 3 seeds] ~ SM+LN+R 45.415 ~ SM+R")
    # three seeds of SM+LN+R, each lower than SM+LN+G's of the same seed: the "<=" part is contradicted
    c3 = claim_c3(base + _seeded("SM+LN+R", [45.4, 46.0, 45.9]))
    assert c3["part_verdicts"] == ["contradicted", "holds", "holds"] and c3["verdict"] == "contradicted"
    assert c3["numbers"].startswith("SM+LN+G 49.259 [48.967–49.739, 3 seeds] > SM+LN+R")
    # SM+LN+R straddling SM+LN+G seed by seed: the "<=" part is not contradicted, so it holds
    c3 = claim_c3(base + _seeded("SM+LN+R", [49.5, 48.0, 50.0]))
    assert c3["part_verdicts"][0] == "holds" and c3["parts"][0] is False  # the means alone would say no
    # different seeds (no pair): the difference of the means with a bootstrap interval
    c3 = claim_c3(base + _seeded("SM+LN+R", [52.0, 53.0], seeds=(7, 8)))
    assert c3["part_verdicts"][0] == "holds" and "unpaired, difference of means" in c3["numbers"]


def test_c4_paired_by_seed_with_the_clean_control_beside_it():
    from privlm.report.claims import claim_c4
    e, s = [97.0, 108.0, 99.0], [100.0, 110.0, 103.0]
    rows = _seeded("EReg(SM(t)+ScFuFFN)", e) + _seeded("SM+ScFuFFN", s) + _seeded("SM(t)+ScFuFFN", [98.0, 107.0, 104.0])
    c4 = claim_c4(rows)
    saved = [(b - a) / b * 100 for a, b in zip(e, s)]  # +3.0, +1.8, +3.9 %: with 3 seeds the interval is their range
    assert c4["verdict"] == "holds"
    assert (f"paired over 3 seeds: mean +{np.mean(saved):.1f}%, 95% bootstrap CI [+{min(saved):.1f}%, "
            f"+{max(saved):.1f}%], per seed +3.0%, +1.8%, +3.9%; sign-flip p = 0.125") in c4["numbers"]
    # against the clean control: -1.0, -0.9, +4.8 %: not resolved
    assert "against SM(t)+ScFuFFN without the regularizer 103.000 [98.000–107.000, 3 seeds]: not resolved at " \
           "3 seeds, paired over 3 seeds" in c4["numbers"]
    rows = _seeded("EReg(SM(t)+ScFuFFN)", [97.0, 111.0]) + _seeded("SM+ScFuFFN", [100.0, 110.0])
    assert claim_c4(rows)["verdict"] == "not resolved at 2 seeds"  # one seed better, one worse
    rows = _seeded("EReg(SM(t)+ScFuFFN)", [101.0, 112.0]) + _seeded("SM+ScFuFFN", [100.0, 110.0])
    assert claim_c4(rows)["verdict"] == "contradicted"
    rows = _seeded("EReg(SM(t)+ScFuFFN)", [97.0, 98.0], seeds=(1, 2)) + _seeded("SM+ScFuFFN", [100.0], seeds=(3,))
    assert claim_c4(rows)["verdict"] == "not resolved at 1 seed"  # no shared seeds and one seed of SM+ScFuFFN
    rows = _seeded("EReg(SM(t)+ScFuFFN)", [97.0, 98.0], seeds=(1, 2)) + _seeded("SM+ScFuFFN", [100.0, 101.0], seeds=(3, 4))
    c4 = claim_c4(rows)
    assert c4["verdict"] == "holds" and "unpaired, difference of means +3.0%" in c4["numbers"]
    for r in rows:  # rows without seeds (older results files) are never paired, and none is dropped
        r["seed"] = None
    rows += _seeded("SM+ScFuFFN", [99.0], seeds=(None,))
    assert "unpaired, difference of means +2.5%" in claim_c4(rows)["numbers"]  # (100 - 97.5) / 100, 3 seeds kept


def test_claims_of_the_committed_study_v2():
    """The verdicts the sweep stored in docs/results/cpu-study-v2/results.json follow from its rows (evaluated
    again here, not copied into the test)."""
    import json
    from privlm.report.claims import evaluate_claims
    stored = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-study-v2" / "results.json").read_text())
    assert [(c["id"], c["verdict"]) for c in evaluate_claims(stored["rows"])] == \
        [(c["id"], c["verdict"]) for c in stored["claims"]]


def test_deep_layer_entropy_reads_the_diagnosis_means():
    from privlm.report.analysis import deep_layer_entropy
    assert deep_layer_entropy([3.0, 2.0, 0.5, 1.5]) == 0.5
    # a layer whose heads are all NaN or impossible has mean None in the diagnosis: it is skipped, not -9 nats
    assert deep_layer_entropy([3.0, 2.0, 0.01, None]) == 0.01
    assert math.isnan(deep_layer_entropy([3.0, None]))


def test_claims_command_rewrites_the_stored_claims_and_fails_in_one_line(tmp_path, capsys):
    import json
    from privlm.report import claims
    stored = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-study-v2" / "results.json").read_text())
    doc = {**stored, "claims": [{"id": "C4", "verdict": "stale"}]}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert claims.main([str(tmp_path / "results.json")]) == 0
    got = json.loads((tmp_path / "results.json").read_text())
    assert got["claims"] == claims.stored_claims(stored["rows"]) and got["rows"] == stored["rows"]
    for bad, why in ((tmp_path / "missing.json", "is not a readable results file"), (tmp_path / "norows.json", "no well-formed 'rows'")):
        if bad.name == "norows.json":
            bad.write_text("{}")
        capsys.readouterr()
        assert claims.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err
    assert json.loads((tmp_path / "norows.json").read_text()) == {}  # nothing written on failure
