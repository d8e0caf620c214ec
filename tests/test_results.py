"""`privlm.results.RunRow`: the typed row every results reader uses, and the results.json format it keeps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privlm.pi.summary import CostSummary
from privlm.results import EntropyDiagnosis, FlightSummary, RunRow, as_rows

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "docs" / "results").glob("*/results.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_results_files_load_and_keep_their_keys(path):
    rows = json.loads(path.read_text())["rows"]
    for d in rows:
        row = RunRow.from_dict(d)
        back = row.to_dict()
        assert {k: back[k] for k in d} == d  # every stored key comes back with its value
        assert set(back) - set(d) <= {"arch", "T", "complete", "unknown", "embed_head_flops", "vs"}  # older files
        assert row.ppl == d["ppl"] and row.preset == d["preset"]
        if "bin_shares" in d:
            assert row.diagnosis.verdict == d["verdict"] and row.diagnosis.top_bin_share == d["bin_shares"][3]
        if d.get("flight"):
            assert row.flight.first == d["flight"]["first"] and list(row.flight.where) == d["flight"]["where"]
        if d.get("comm_gb") is not None:
            assert row.cost.comm_gb == d["comm_gb"]


def test_a_row_round_trips_through_json():
    cost = CostSummary(arch="SM+LN+G", T=64, profile="paper-fit", comm_gb=1.5, lat_min=0.5, complete=True,
                       unknown=(), nonlinear="SM:4×R^{64×64}", nonlinear_all="SM:4×R^{64×64}", ffn_flops=10,
                       attn_flops_paper=20, attn_flops_dense=21, embed_head_flops=3, comm_savings=2.0,
                       lat_savings=1.5, vs="SM+LN+G")
    diag = EntropyDiagnosis(bin_shares=(0.0, 0.25, 0.25, 0.5), bin_max=3.1, layer_mean_entropy=(3.0, math.nan),
                            deep_layer_min_entropy=math.nan, nan_total=4.0, overloaded=False, overloaded_layers=(),
                            collapsed=True, collapsed_layers=(1,), too_early=False, near_uniform_share=0.25,
                            layer_verdicts=("ok", "collapse"), verdict="entropy collapse (layers 1)")
    flight = FlightSummary(first="collapse", first_all=("collapse",), event_step=3, steps_before=2, where=("L1h0",),
                           line="x")
    row = RunRow(name="a", label="A", preset="SM+LN+G", params=100, tokens_trained=4096, steps=8, finished=True,
                 diverged=True, ppl=None, lr=1e-3, seed=1, max_steps=8, divergence_step=5, flight=flight, cost=cost,
                 diagnosis=diag)
    d = json.loads(json.dumps(row.to_dict()))
    assert d["comm_savings"] == 2.0 and d["collapsed_layers"] == [1] and d["flight"]["where"] == ["L1h0"]
    assert "excess_vs_baseline" not in d and "spu_bytes" not in d
    back = RunRow.from_dict(d)
    assert back.cost == cost and back.flight == flight and back.ppl_or_inf == math.inf
    assert back.diagnosis.layer_verdicts == diag.layer_verdicts and back.verdict == diag.verdict
    assert as_rows([d, back])[1] is back


def test_results_is_a_leaf_module():
    import ast
    tree = ast.parse((ROOT / "src" / "privlm" / "results.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("privlm")} == {"privlm.pi.summary"}
