"""The results pages: every number between markers, written from the committed results files.

The committed READMEs (README.md and docs/results/*/README.md) are regenerated block by block from the
committed results.json / demo.json and compared with what is committed; their prose has no number of its
own; figures exist in one format. The block writer itself is checked on small results files whose numbers
are worked out by hand here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privlm.errors import CheckpointError, PrivlmError
from privlm.report import readme as R

ROOT = Path(__file__).resolve().parents[1]
READMES = R.repository_readmes(ROOT)
RESULTS_READMES = [p for p in READMES if p.parent.parent == ROOT / "docs" / "results"]


def test_the_results_pages_are_the_ones_expected():
    assert {p.parent.name for p in RESULTS_READMES} == {"cpu-study-v2", "ereg-grid-v2", "stability-map", "demo"}
    assert ROOT / "README.md" in READMES


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_blocks_equal_what_the_committed_results_give(path):
    text = path.read_text()
    assert R.BLOCK_RE.search(text), f"{path} has no generated block"
    assert R.stale_blocks(path) == [], "run `make docs` (python -m privlm.report.readme) and commit the result"


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_number_outside_the_generated_blocks(path):
    loose = R.bare_numbers(R.results_prose(path.read_text()))
    assert loose == [], "\n".join(f"{path.name}:{no}: {line}" for no, line in loose)


def test_the_readme_results_section_is_the_one_checked():
    text = (ROOT / "README.md").read_text()
    prose = R.results_prose(text)
    assert R.README_RESULTS_SECTION in prose and "study-summary" in prose
    assert len(prose.split("\n")) == len(text.split("\n"))


def test_figures_in_one_format():
    tracked = subprocess.run(["git", "ls-files", "docs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: look at the files
        tracked = [str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*") if p.is_file()]
    assert not [p for p in tracked if p.lower().endswith((".svg", ".pdf", ".jpg", ".jpeg"))]
    assert any(p.endswith(".png") for p in tracked)


# --------------------------------------------------------------------------------------------- the writer
def _row(name, preset, ppl, seed=1337, **kw):
    row = {"name": name, "label": preset, "preset": preset, "ppl": ppl, "seed": seed, "lr": 0.001,
           "diverged": False, "finished": True, "tokens_trained": 4096, "max_steps": 8, "unigram_ppl": 400.04,
           "layer_mean_entropy": [3.0, 2.5], "verdict": "healthy",
           "nonlinear": "SM:4×R^{64×64}, LN:4×R^{64×64}", "comm_gb": 1.0, "lat_min": 0.5}
    row.update(kw)
    return row


@pytest.fixture
def folder(tmp_path):
    rows = [_row("a", "SM+LN+G", 50.0), _row("b", "SM+ScFuFFN", 100.0),
            _row("c", "EReg(SM(t)+ScFuFFN)", 90.0, verdict="entropic overload (layers 0)"),
            _row("b1", "SM+ScFuFFN", 110.0, seed=1), _row("c1", "EReg(SM(t)+ScFuFFN)", 96.0, seed=1)]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows, "command": "privlm sweep s.yaml --jobs 2",
                                                       "run_seconds": {"a": 100.0, "b": 50.0, "c": 30.0}}))
    return tmp_path


def test_setup_time_and_variant_blocks_from_a_small_results_file(folder):
    setup = R.block_setup(folder)
    assert setup.startswith("5 runs of 3 variants: 4,096 training tokens per run (8 optimizer steps), peak "
                            "learning rate 0.001, seed 1337 for every variant, seed 1 also for SM+ScFuFFN, "
                            "EReg(SM(t)+ScFuFFN); 20,480 training tokens in all.")
    assert "unigram model: 400.0." in setup
    # uniform causal attention over T = 64 positions: (1/T) Σ_i log i
    import math
    assert f"T = 64 (the causal maximum): {sum(math.log(i) for i in range(1, 65)) / 64:.2f} nats" in setup
    # 180 s in all, two at a time: 1.5 minutes
    assert R.block_time(folder) == ("The training times of the 3 runs (`results.json` → `run_seconds`) add up to "
                                    "180 s (30–100 s per run); 2 at a time, that is at least 1.5 minutes of "
                                    "wall clock.")
    table = R.block_variants(folder).split("\n")
    assert table[2] == "| SM+LN+G | 1 | 50.00 | 3.00 2.50 | healthy |"
    assert table[3] == "| SM+ScFuFFN | 2 | 105.00 [100.00–110.00] | 3.00 2.50 | healthy |"
    assert table[4] == ("| EReg(SM(t)+ScFuFFN) | 2 | 93.00 [90.00–96.00] | 3.00 2.50 | "
                        "1/2 entropic overload (layers 0); 1/2 healthy |")
    # C4 from the same rows: 93 vs 105 is 11.4 % lower; paired by seed 10.0 % and 12.7 %: holds
    claims = R.block_claims(folder)
    assert "**(C4) EReg(SM(t)+ScFuFFN) has lower PPL than SM+ScFuFFN: holds.**" in claims
    assert "(11.4% lower" in claims and "per seed +10.0%, +12.7%; sign-flip p = 0.25" in claims
    assert claims.endswith("not testable on these runs (variants missing): C1, C2, C3")


def test_grid_block(tmp_path):
    rows = [_row("no-reg", "SM(t)+ScFuFFN", 120.0)]
    for lam, gam, ppl in [("1e-05", "0.1", 121.0), ("1e-05", "0.2", 119.0), ("8e-05", "0.1", 130.0)]:
        rows.append(_row(f"ereg-lambda={lam}-gamma={gam}", "EReg(SM(t)+ScFuFFN)", ppl))
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    lines = R.block_grid(tmp_path).split("\n")
    assert lines[0] == "| lambda \\ gamma | 0.1 | 0.2 |"
    assert lines[2] == "| 1e-05 | 121.00 (healthy) | 119.00 (healthy) |"
    assert lines[3] == "| 8e-05 | 130.00 (healthy) | – |"
    # best 119 against 120 without the regularizer: 1/120 = 0.8 % lower
    assert lines[-1].startswith("Best cell: lambda 1e-05, gamma 0.2, PPL 119.00.")
    assert lines[-1].endswith("the best cell is 0.8 % lower.")


def test_update_rewrites_blocks_only_and_reads_the_named_folder(folder, tmp_path):
    (tmp_path / "sub").mkdir()
    (folder / "results.json").rename(tmp_path / "sub" / "results.json")
    page = tmp_path / "README.md"
    prose = "# Title\n\nSome prose with `code 12`.\n"
    page.write_text(prose + "<!-- privlm:begin time sub -->\nold 1\n<!-- privlm:end time -->\n"
                    "Inline: <!-- privlm:begin time sub -->old<!-- privlm:end time -->.\n")
    assert R.stale_blocks(page) == ["time sub", "time sub"]
    assert R.update_readme(page) is True
    text = page.read_text()
    fresh = R.block_time(tmp_path / "sub")
    assert text == (prose + f"<!-- privlm:begin time sub -->\n{fresh}\n<!-- privlm:end time -->\n"
                    f"Inline: <!-- privlm:begin time sub -->{fresh}<!-- privlm:end time -->.\n")
    assert R.stale_blocks(page) == [] and R.update_readme(page) is False


@pytest.mark.parametrize("text, match", [
    ("<!-- privlm:begin nosuch -->\n<!-- privlm:end nosuch -->\n", "unknown README block 'nosuch'"),
    ("<!-- privlm:begin time -->\n<!-- privlm:end setup -->\n", "has no partner"),
    ("<!-- privlm:begin time missing -->\n<!-- privlm:end time -->\n", "does not exist"),
])
def test_bad_pages_fail_with_one_line(tmp_path, text, match):
    (tmp_path / "README.md").write_text(text)
    with pytest.raises(PrivlmError, match=match):
        R.update_readme(tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == text  # nothing written


def test_bare_numbers_rule():
    text = ("# Study v2 at L4 H4 d128, T = 128 (Fig. 2a, Table 3, Eq. 8, C4, GPT-2, 2PC)\n"
            "PPL went down by 8 %.\n"
            "<!-- privlm:begin setup -->\n12 runs\n<!-- privlm:end setup -->\n"
            "Inline <!-- privlm:begin time -->42 s<!-- privlm:end time --> is fine, and `--jobs 2` too.\n"
            "```\nprivlm sweep --jobs 2\n```\n"
            "A [link](../v2/README.md) and 1e-3 here.\n")
    assert R.bare_numbers(text) == [(2, "PPL went down by 8 %."), (10, "A [link](../v2/README.md) and 1e-3 here.")]


@pytest.mark.slow
def test_check_command_exits_zero_on_the_committed_pages():
    proc = subprocess.run([sys.executable, "-m", "privlm.report.readme", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_check_command_names_a_stale_block_and_a_bad_file_in_one_line(folder):
    page = folder / "README.md"
    page.write_text("<!-- privlm:begin time -->\nold\n<!-- privlm:end time -->\nA bare 7 here.\n")
    proc = subprocess.run([sys.executable, "-m", "privlm.report.readme", "--check", str(page)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"{page}: block 'time' differs from its results files",
                                        f"{page}:4: number outside a generated block: A bare 7 here."]
    (folder / "results.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "privlm.report.readme", str(page)], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("python -m privlm.report.readme: error: ") and "is not a readable JSON" in proc.stderr
    assert "old" in page.read_text()  # nothing written


def test_wall_clock_is_the_union_of_the_runs_training_intervals(tmp_path):
    """busy_seconds: overlapping stretches count once, a gap not at all (hand-computed); the time block adds the
    measured wall clock, the study block sums the core time of every sweep and measures the union of all their
    intervals, naming the runs that recorded none."""
    assert R.busy_seconds([]) == 0.0
    assert R.busy_seconds([[0, 10], [5, 20], [30, 40], [31, 32]]) == 30.0  # [0, 20] and [30, 40]
    assert R.busy_seconds([[100, 200], [0, 50]]) == 150.0
    grid, arm = tmp_path / "grid", tmp_path / "arm"
    grid.mkdir()
    arm.mkdir()
    (grid / "results.json").write_text(json.dumps({
        "rows": [], "command": "privlm sweep g.yaml --jobs 2", "run_seconds": {"a": 3000.0, "b": 2400.0},
        "run_intervals": {"a": [[0.0, 3000.0]], "b": [[600.0, 1800.0], [4000.0, 5200.0]]}}))
    (arm / "results.json").write_text(json.dumps({
        "rows": [], "run_seconds": {"c": 7200.0, "d": None}, "run_intervals": {"c": [], "d": []}}))
    assert R.block_time(grid).endswith("; 2 at a time, that is at least 45.0 minutes of wall clock; measured, runs "
                                       "were training during 70 min of wall clock (the union of their training "
                                       "intervals, `run_intervals`).")  # [0, 3000] and [4000, 5200]
    assert R.block_study_time(tmp_path) == (
        "3 runs over 2 sweeps (`arm/`, `grid/`): 3.5 core-hours of training, during 70 min of wall clock with at "
        "least one run training (measured: the union of the runs' training intervals, whatever the number of "
        "calls it took); 1 run(s) have no recorded intervals: arm/c.")
    (arm / "results.json").write_text(json.dumps({"rows": [], "run_seconds": {"c": 1.0},
                                                  "run_intervals": {"c": [[0, "x"]]}}))
    with pytest.raises(PrivlmError, match=r"arm/results.json': run_intervals must be a list of \[start, end\] pairs"):
        R.block_study_time(tmp_path)


def test_sweep_records_each_stretch_of_training(tmp_path):
    """A sweep.json record gets one [start, end] per stretch of training; a record from before the intervals
    were kept (last start and seconds only) becomes its one stretch when the run starts again."""
    import datetime

    from privlm import sweep as S
    state = {"runs": {"r": {"status": "interrupted", "started": "2026-12-07T21:17:43+0000", "seconds": 600.0}}}
    rec = state["runs"]["r"]
    t_old = datetime.datetime(2026, 12, 7, 21, 17, 43, tzinfo=datetime.timezone.utc).timestamp()
    assert S.training_intervals(rec) == [[t_old, t_old + 600.0]]
    t0 = S._start(rec, state, tmp_path)
    assert rec["intervals"] == [[t_old, t_old + 600.0]] and rec["status"] == "running"
    S._finish(rec, state, tmp_path, t0 - 5.0)
    (a, b), = rec["intervals"][1:]
    assert rec["seconds"] == pytest.approx(605.0, abs=0.2) and b - a == pytest.approx(5.0, abs=0.2)
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"]["r"]["intervals"] == rec["intervals"]
    assert S.training_intervals({"status": "pending"}) == []
    assert S.training_intervals({"started": "yesterday", "seconds": 5.0}) == []
    with pytest.raises(CheckpointError, match="'intervals' must be a list of \\[start, end\\] pairs"):
        S.training_intervals({"intervals": [[1.0]]})
