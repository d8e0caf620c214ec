"""Live progress lines (privlm.progress): the content of a run's line, the status file a `--jobs` run writes,
the sweep process's board, and silence off a terminal. No timing assertion: throughputs are given, not measured."""
from __future__ import annotations

import json

import pytest

from privlm import progress
from privlm.progress import ProgressBoard, eta_seconds, progress_text, read_status, status_path, write_status
from privlm.train.telemetry import Telemetry
from test_train import records, synthetic_data, tiny_cfg


def test_progress_text_names_tokens_rate_eta_and_loss():
    # 983,040 - 245,760 = 737,280 tokens left at 5,120 tok/s: 144 s
    assert eta_seconds(245_760, 983_040, 5120.0) == 144.0
    assert progress_text(245_760, 983_040, 5120.0, 4.12345) == "245.8k/983.0k tok | 5.1k tok/s | ETA 2:24 | loss 4.1235"
    assert progress_text(2_500_000, 10_000_000, 1000.0, None) == "2.50M/10.00M tok | 1.0k tok/s | ETA 2:05:00 | loss ?"
    assert "ETA ?" in progress_text(0, 100, 0.0, float("nan")) and progress_text(0, 100, 0.0, float("nan")).endswith("?")


def test_status_file_round_trip_and_unreadable_is_none(tmp_path):
    path = status_path(tmp_path, "run-a")
    assert path.name == "run-a.progress.json" and read_status(path) is None
    write_status(path, step=3, max_steps=10, tokens=300, total_tokens=1000, tok_per_s=50.0, loss=float("inf"))
    assert read_status(path) == {"step": 3, "max_steps": 10, "tokens": 300, "total_tokens": 1000,
                                 "tok_per_s": 50.0, "loss": None, "done": False}
    path.write_text("{half")
    assert read_status(path) is None


def test_telemetry_line_on_a_terminal_and_nothing_off_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tele = Telemetry(tmp_path / "a", True, False, total_steps=10, tokens_per_step=100)
    for step in range(1, 6):
        tele.stepped(step)
    tele.logged(5, 2.5, 1e-3, 500, 100.0, 1.0)
    tele.close()
    err = capsys.readouterr().err
    assert "500/1.0k tok | 100 tok/s | ETA 0:05 | loss 2.5000" in err
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    tele = Telemetry(tmp_path / "b", True, False, total_steps=10, tokens_per_step=100)
    for step in range(1, 6):
        tele.stepped(step)
    tele.logged(5, 2.5, 1e-3, 500, 100.0, 1.0)
    tele.close()
    out = capsys.readouterr()
    assert "tok |" not in out.err and "ETA" not in out.err + out.out  # log lines only, no live line
    assert "step      5 loss 2.5000" in out.out


def test_board_draws_one_line_per_run_only_on_a_terminal(tmp_path, capsys):
    write_status(status_path(tmp_path, "r1"), step=1, max_steps=4, tokens=100, total_tokens=400,
                 tok_per_s=100.0, loss=3.0)
    quiet = ProgressBoard()  # pytest's stderr is not a terminal
    quiet.update("r1", status_path(tmp_path, "r1"))
    quiet.close()
    assert capsys.readouterr().err == ""
    board = ProgressBoard(enabled=True)
    board.update("r1", status_path(tmp_path, "r1"))
    board.update("r2", status_path(tmp_path, "r2"))  # no status yet
    board.close()
    err = capsys.readouterr().err
    assert "r1: 100/400 tok | 100 tok/s | ETA 0:03 | loss 3.0000" in err and "r2: starting" in err


def test_training_reports_its_progress_to_the_status_file(tmp_path, capsys):
    status = tmp_path / "logs" / "run.progress.json"
    status.parent.mkdir()
    from privlm.train import train
    train(tiny_cfg("train.max_steps=10", "train.log_every=5"), tmp_path / "run", quiet=True,
          data=synthetic_data(), status_file=status)
    got = json.loads(status.read_text())
    last = records(tmp_path / "run", "train")[-1]
    assert got["done"] and got["step"] == 10 == got["max_steps"]
    assert got["tokens"] == got["total_tokens"] == last["tokens"] and got["loss"] == pytest.approx(last["loss"])
    assert "tok |" not in capsys.readouterr().err  # pytest's stderr is not a terminal: no live line
