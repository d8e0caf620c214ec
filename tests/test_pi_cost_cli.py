"""`privlm cost`: Table 3 layout, --table comparisons, run directories, output formats and bad input."""
from __future__ import annotations

import csv
import io
import json

import pytest

from privlm.cli import main
from privlm.config import load_config, to_yaml
from privlm.pi import CostSummary


def _run(capsys, *argv):
    code = main(["cost", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_fused_vs_baseline_savings_at_gpt2_size(capsys):
    code, out, _ = _run(capsys, "SM+ScFuFFN", "--vs", "SM+LN+G", "--format", "json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["n_layer"], row["n_head"], row["n_embd"], row["vocab_size"], row["T"]) == (12, 12, 768, 50257, 128)
    assert row["comm_savings"] == pytest.approx(3.94, abs=0.03)  # the paper's 3.94x
    assert row["nonlinear_ops"] == [{"op": "softmax", "count": 144, "shape": [128, 128], "where": "attention",
                                     "in_paper": True}]
    assert row["nonlinear"] == "SM:144×R^{128×128}" and row["vs"] == "SM+LN+G"
    code, out, _ = _run(capsys, "SM+ScFuFFN", "--vs", "SM+LN+G")
    assert code == 0 and "SM:144×R^{128×128}" in out
    assert f"{row['comm_savings']:.2f}×" in out and "Comm. Savings" in out


@pytest.mark.slow  # privlm cost in several interpreters: seconds of CPU
def test_several_presets_with_overrides_md(capsys):
    code, out, _ = _run(capsys, "SM+LN+G", "SM+LN+R", "--T", "256", "model.n_layer=18", "--format", "md")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("| SM")]
    assert len(lines) == 2
    assert "SM:216×R^{256×256}, LN:36×R^{256×768}, G:18×R^{256×3072}" in lines[0]
    assert "| 1.00× | 1.00× |" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("table", ["paper-t128", "paper-t256", "paper-l18", "paper-languini-t512", "aero-t128"])
def test_table_json_rows(capsys, table):
    code, out, _ = _run(capsys, "--table", table, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    for r in rows:
        for key in ("arch", "comm_gb", "lat_min", "paper_comm_gb", "paper_lat_min", "ffn_flops", "attn_flops_paper",
                    "nonlinear", "nonlinear_ops"):
            assert key in r
        assert all({"op", "count", "shape"} <= set(op) for op in r["nonlinear_ops"])
        assert r["nonlinear"] == r["paper_nonlinear"]
        # the flat JSON row is the typed summary: it reads back by attribute with the same numbers
        summary = CostSummary.from_dict(r)
        assert (summary.comm_gb, summary.ffn_flops, summary.nonlinear) == (r["comm_gb"], r["ffn_flops"], r["nonlinear"])
        if r["paper_ffn_flops"]:
            assert r["ffn_flops"] / 1e9 == pytest.approx(r["paper_ffn_flops"] / 1e9, abs=0.06)
        assert r["nonlinear_match"] is True and r["ffn_flops_match"] is True and r["attn_flops_match"] is True
        assert r["comm_err"] == pytest.approx(r["comm_gb"] / r["paper_comm_gb"] - 1)
        assert abs(r["comm_err"]) < 0.03


@pytest.mark.slow  # privlm cost in several interpreters: seconds of CPU
def test_table_text_and_csv(capsys):
    code, out, _ = _run(capsys, "--table", "aero-t256")
    assert code == 0 and "Worst Comm error" in out and "SOTA SM+ScFuFFN" in out
    code, out, _ = _run(capsys, "--table", "paper-t128", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][0] == "Network Arch." and len(rows) == 5
    assert rows[3][0] == "SM+ScFuFFN" and rows[3][-4] == "3.94×" and rows[3][-3] == "3.94×"


def test_run_dir(capsys, tmp_path):
    cfg = load_config("SM+LN+R", ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.vocab_size=300",
                                  "model.block_size=64", "data.seq_len=32"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    code, out, _ = _run(capsys, str(tmp_path), "--format", "json")
    assert code == 0
    (row,) = json.loads(out)
    assert row["T"] == 32 and row["n_layer"] == 2 and row["vocab_size"] == 300
    assert row["nonlinear_ops"][0] == {"op": "softmax", "count": 8, "shape": [32, 32], "where": "attention",
                                   "in_paper": True}
    assert row["vs"] == "SM+LN+G" and row["comm_savings"] > 1  # reference built at the run's size
    code, out, _ = _run(capsys, str(tmp_path), "--T", "16", "model.n_layer=3", "--format", "json")
    assert code == 0 and json.loads(out)[0]["T"] == 16 and json.loads(out)[0]["n_layer"] == 3


@pytest.mark.parametrize("argv, message", [
    (["SM+XYZ"], "unknown preset"),
    (["SM+LN+G", "--T", "2048"], "block_size"),
    (["SM+LN+G", "--profile", "nope"], "cost profile 'nope' not found"),
    (["SM+LN+G", "--table", "paper-t128"], "--table prints a published table"),
])
def test_bad_input_is_one_line_error(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code != 0 and out == ""
    assert err.startswith("privlm cost: error:") and message in err and err.count("\n") == 1


def test_dir_without_config_is_an_error(capsys, tmp_path):
    code, _, err = _run(capsys, str(tmp_path))
    assert code != 0 and "no config.yaml" in err


def test_calibrate_validates_and_writes_through_the_profile_writer(tmp_path, monkeypatch, capsys):
    """`privlm pi calibrate` (measurement stubbed out: it needs the SPU environment) writes its profile to the
    user profile directory through `save_profile`: a malformed fit is a one-line error and leaves no file."""
    import argparse

    from privlm.config import ConfigError
    from privlm.pi import costs
    from privlm.spu import calibrate
    monkeypatch.setenv("PRIVLM_HOME", str(tmp_path))
    measured = json.loads(json.dumps(costs.load_profile("spu-cheetah-measured").raw))
    monkeypatch.setattr(calibrate, "run_microbench", lambda *a, **k: {})
    monkeypatch.setattr(calibrate, "fit_profile", lambda bench, name, *a, **k: {**measured, "name": name})
    args = argparse.Namespace(spu_profile="default", name=None, out=None, force=False, quick=True,
                              rounds_delay_ms=None, protocol="cheetah", json=True, ops=None,
                              rounds_only=False)
    assert calibrate.cmd_calibrate(args) == 0
    out = tmp_path / "profiles" / "spu-cheetah-measured.json"
    assert costs.load_profile("spu-cheetah-measured").path == str(out)
    assert costs.shadowed_profiles() == ["spu-cheetah-measured"]
    measured["nonlinear"]["softmax"]["bytes_per_element"] = float("nan")
    args.name = "broken"
    with pytest.raises(ConfigError, match="non-negative number") as exc:
        calibrate.cmd_calibrate(args)
    assert "\n" not in str(exc.value) and not (tmp_path / "profiles" / "broken.json").exists()
    capsys.readouterr()
    code = main(["pi", "calibrate", "--quick"])  # the profile of the first run is there now
    err = capsys.readouterr().err
    assert code != 0 and "exists" in err and "--force" in err and "Traceback" not in err
