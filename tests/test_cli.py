"""The `privlm` entry point itself: what `--help` imports, and `--debug` / PRIVLM_DEBUG."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import sys
from privlm.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "matplotlib", "transformers", "numpy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def _heavy_modules_after(argv: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


def test_top_level_help_imports_no_command_module():
    assert _heavy_modules_after(["--help"]) == []


def test_a_command_help_imports_no_torch():
    for command in ("pi", "eval", "data"):
        assert not {"torch", "matplotlib", "transformers"} & set(_heavy_modules_after([command, "--help"])), command


def _privlm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privlm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_debug_adds_the_traceback_to_the_one_line_error(tmp_path):
    missing = str(tmp_path / "no-such-run")
    plain = _privlm("eval", missing, env={"PRIVLM_DEBUG": "0"})
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"privlm eval: error: run directory '{missing}' does not exist"]
    for debug in (_privlm("eval", missing, "--debug"), _privlm("--debug", "eval", missing),
                  _privlm("eval", missing, env={"PRIVLM_DEBUG": "1"})):
        assert debug.returncode == 2
        lines = debug.stderr.strip().splitlines()
        assert lines[0] == plain.stderr.strip()
        assert "Traceback (most recent call last):" in lines
        assert lines[-1].startswith("privlm.errors.CheckpointError: run directory")
