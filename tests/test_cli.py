"""The `privlm` entry point itself: what `--help` imports, and `--debug` / PRIVLM_DEBUG."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow  # CLI interpreters: seconds of CPU
def test_every_command_help_imports_no_torch():
    from privlm.cli import SUBCOMMANDS
    for command in SUBCOMMANDS:
        heavy = set(_heavy_modules_after([command, "--help"]))
        assert not {"torch", "matplotlib", "transformers", "submitit"} & heavy, (command, heavy)


def test_each_summary_is_the_one_in_the_table():
    import argparse

    from privlm.cli import SUBCOMMANDS, build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shown = {a.dest: a.help for a in sub._choices_actions}
    assert shown == {name: summary for name, (_, summary) in SUBCOMMANDS.items()}
    from privlm.cli import _Subparsers
    with pytest.raises(TypeError, match="SUBCOMMANDS"):  # a module cannot write a second summary
        _Subparsers(argparse.ArgumentParser().add_subparsers()).add_parser("cost", help="another summary")


LAZY_PROBE = """
import importlib, sys
import privlm.pi.census  # the submodule first: the package's `census` must still be the function
from privlm.pi import census
assert callable(census) and not isinstance(census, type(sys)), census
assert census is sys.modules["privlm.pi.census"].census
for package in ("privlm.data", "privlm.train", "privlm.entropy", "privlm.pi", "privlm.report"):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, (package, name)
    assert set(mod.__all__) <= set(dir(mod)), package
    try:
        mod.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError(package)
print("OK")
"""


@pytest.mark.slow  # an interpreter importing every package: seconds of CPU
def test_lazy_package_names_resolve_to_their_modules_objects():
    out = subprocess.run([sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def _privlm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privlm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow  # CLI interpreters: seconds of CPU
def test_debug_adds_the_traceback_to_the_one_line_error(tmp_path, capsys, monkeypatch):
    from privlm.cli import main
    missing = str(tmp_path / "no-such-run")
    plain = _privlm("eval", missing, env={"PRIVLM_DEBUG": "0"})
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"privlm eval: error: run directory '{missing}' does not exist"]
    debug = _privlm("eval", missing, "--debug")  # one interpreter; the other two spellings in this process
    assert debug.returncode == 2
    outputs = [debug.stderr]
    for argv, env in ((["--debug", "eval", missing], "0"), (["eval", missing], "1")):
        monkeypatch.setenv("PRIVLM_DEBUG", env)
        capsys.readouterr()
        assert main(argv) == 2
        outputs.append(capsys.readouterr().err)
    for err in outputs:
        lines = err.strip().splitlines()
        assert lines[0] == plain.stderr.strip()
        assert "Traceback (most recent call last):" in lines
        assert lines[-1].startswith("privlm.errors.CheckpointError: run directory")
