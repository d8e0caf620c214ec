"""`privlm demo`: parallel training of a sweep's runs, the comparison table (against the paper's Table 3 at
GPT-2 size), the private next-token prediction under SPU saved for the report, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from privlm.cli import main
from privlm.demo import comparison_table, gpt2_costs, run_demo
from privlm.pi import CostSummary

from small_corpus import stdlib_corpus_overrides

pytestmark = pytest.mark.slow  # make test-fast leaves this file out

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_demo_sweep_is_the_papers_three_designs_on_one_budget():
    from privlm.sweep import load_sweep
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "demo.yaml")
    assert [r.preset for r in sweep.runs] == ["SM+LN+G", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)"]
    budgets = {(r.cfg.train.max_steps, r.cfg.train.batch_size, r.cfg.data.seq_len, r.cfg.train.seed,
                r.cfg.data.source, r.cfg.data.vocab_size) for r in sweep.runs}
    assert len(budgets) == 1  # same data, budget and seed for every design
    ereg = sweep.runs[2].cfg.reg
    assert ereg.enabled and ereg.reduction == "released_code" and ereg.lambda_ == 1e-5
    assert not sweep.runs[1].cfg.reg.enabled


def test_gpt2_size_costs_reproduce_the_papers_table3():
    rows = [{"name": "base", "preset": "SM+LN+G"}, {"name": "fu", "preset": "SM+ScFuFFN"},
            {"name": "ereg", "preset": "EReg(SM(t)+ScFuFFN)"}]
    g = gpt2_costs(rows, "SM+LN+G", "paper-fit")
    # the paper's Table 3 (GPT-2, T=128) as transcribed in privlm.pi.published (in-sample: paper-fit is fitted
    # to these rows)
    from privlm.pi.published import load_rows
    paper = {r.arch: r for r in load_rows("paper-t128")}
    assert g["base"].comm_gb == pytest.approx(paper["SM+LN+G"].comm_gb, rel=0.02)
    assert g["fu"].comm_gb == pytest.approx(paper["SM+ScFuFFN"].comm_gb, rel=0.02)
    assert g["fu"].comm_savings == pytest.approx(paper["SM+ScFuFFN"].comm_sav, rel=0.03)
    assert g["fu"].lat_savings == pytest.approx(paper["SM+ScFuFFN"].lat_sav, rel=0.10)  # latency fits within ~8-12 %
    # the temperature is free: same cost as SM+ScFuFFN
    assert (g["ereg"].comm_gb, g["ereg"].lat_min, g["ereg"].nonlinear) == (g["fu"].comm_gb, g["fu"].lat_min,
                                                                           g["fu"].nonlinear)
    assert g["base"].comm_savings == 1.0 and g["fu"].vs == "SM+LN+G"


def test_comparison_table_cells():
    rows = [{"name": "a", "label": "SM+LN+G", "preset": "SM+LN+G", "diverged": False, "ppl": 80.123,
             "verdict": "healthy", "layer_verdicts": ["ok", "ok"], "layer_mean_entropy": [3.1, 2.5],
             "nonlinear": "SM:8×R^{128×128}", "comm_gb": 0.5, "lat_min": 1.0, "comm_savings": 1.0,
             "lat_savings": 1.0},
            {"name": "b", "label": "SM+ScFuFFN", "preset": "SM+ScFuFFN", "diverged": True, "ppl": None,
             "verdict": "entropic overload (layers 0)", "layer_verdicts": ["overload", "ok"],
             "layer_mean_entropy": [3.87, 2.4], "excess_vs_baseline": [0.77, -0.1], "nonlinear": "SM",
             "comm_gb": 0.25, "lat_min": 0.5, "comm_savings": 2.0, "lat_savings": 2.0}]
    g = {"a": CostSummary.from_dict({"comm_gb": 25.0, "lat_min": 8.0, "comm_savings": 1.0, "lat_savings": 1.0}),
         "b": CostSummary.from_dict({"comm_gb": 6.4, "lat_min": 4.8, "comm_savings": 3.9, "lat_savings": 1.7})}
    lines = comparison_table(rows, g, "L2")
    assert lines[0].startswith("| design | val PPL | entropy verdict | L0 | L1 |")
    assert "| SM+LN+G | 80.12 | healthy | 3.10 ok | 2.50 ok |" in lines[2]
    assert "| NaN (diverged) | entropic overload (layers 0) | 3.87 overload (+0.77) | 2.40 ok (-0.10) |" in lines[3]
    assert lines[3].endswith("| 6.40 GB / 4.80 min | 3.90× / 1.70× |")


def test_demo_end_to_end_with_private_inference_and_resume(tmp_path, capsys):
    over = stdlib_corpus_overrides(tmp_path, 30) + [
        "train.max_steps=6", "train.batch_size=4", "train.eval_every=6", "train.entropy_every=3",
        "train.log_every=3", "train.save_every=6", "data.max_valid_docs=2"]
    sweep = tmp_path / "demo.yaml"
    sweep.write_text(yaml.safe_dump({"name": "demo-test", "overrides": over, "baseline": "SM+LN+G",
                                     "runs": ["SM+LN+G", "SM+ScFuFFN"]}))
    out = tmp_path / "demo"
    res = run_demo(str(sweep), out, jobs=2, prompt="import os", pi_args=["--protocol", "semi2k"])
    text = capsys.readouterr().out
    rows = {r.preset: r for r in res["rows"]}
    assert set(rows) == {"SM+LN+G", "SM+ScFuFFN"}
    for r in rows.values():
        assert (out / r.name / "summary.json").is_file() and r.ppl is not None
        assert len(r.diagnosis.layer_verdicts) == 2 and r.verdict
    # the softmax-only run is compared with the baseline layer by layer; the baseline is not
    assert len(rows["SM+ScFuFFN"].diagnosis.excess_vs_baseline) == 2
    assert rows["SM+LN+G"].diagnosis.excess_vs_baseline is None
    # the private prediction: saved beside the checkpoint, agrees with plaintext, shown in the report
    pi = json.loads((out / "sm-scfuffn" / "pi_measured.json").read_text())
    assert pi == res["pi"] and pi["protocol"] == "semi2k" and pi["top1_agree"] is True and pi["bytes_total"] > 0
    assert rows["SM+ScFuFFN"].spu_bytes == pi["bytes_total"]
    assert f"{pi['bytes_total'] / 1e6:.1f} MB exchanged" in text and "agrees with plaintext" in text
    html = (out / "report.html").read_text()
    assert "diagnosis-table" in html and "vs baseline" in html and "(semi2k)" in html
    demo_md = (out / "demo.md").read_text()
    assert "| SM+ScFuFFN |" in demo_md and str((out / "report.html").resolve()) in demo_md
    assert json.loads((out / "demo.json").read_text())["run_seconds"].keys() == {"sm-ln-g", "sm-scfuffn"}

    # rerun: nothing retrained, same rows; --skip-pi leaves the saved measurement alone
    mtime = (out / "sm-ln-g" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--sweep", str(sweep), "--out", str(out), "--skip-pi"]) == 0
    assert "already finished, skipped" in capsys.readouterr().out
    assert (out / "sm-ln-g" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "sm-scfuffn" / "pi_measured.json").read_text()) == pi
    assert "MB exchanged" in (out / "demo.md").read_text()  # the earlier measurement is still shown


def test_bad_demo_inputs_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # a usage error (bounded --jobs): argparse exits with status 2
        main(["demo", "--jobs", "0", "--out", str(tmp_path / "d")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["privlm demo: error: argument --jobs: 0 must be a positive integer (see privlm demo --help)"]
    assert main(["demo", "--sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "d").exists()
