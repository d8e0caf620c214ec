"""`privlm` command line. Each subcommand lives in the module of its concept and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code. The command's one-line summary
is written once, in ``SUBCOMMANDS``: ``add_parser`` takes it from there (a module passing ``help=`` is a
programming error).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from privlm.errors import OneLineArgumentParser, PrivlmError, one_line

# Subcommand → (module that registers it, one-line summary). Only the named command's module is imported, so
# `privlm --help` imports nothing heavy and a broken optional dependency only breaks its own command.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("privlm.inspect", "show a preset's (or Hugging Face model's) config, parameter counts and modules"),
    "data": ("privlm.data.cli", "build/inspect the tokenized data of a config"),
    "train": ("privlm.train.cli", "train a model; writes a run directory"),
    "eval": ("privlm.evaluate", "perplexity of a run's checkpoint"),
    "sample": ("privlm.sample", "generate text from a run's checkpoint"),
    "entropy": ("privlm.entropy.cli", "per-head attention entropy, bins and overload/collapse verdicts of a run or "
                                      "a Hugging Face model"),
    "cost": ("privlm.pi.cost_cli", "PI communication/latency of a preset or run (paper Table 3 layout)"),
    "export-hf": ("privlm.hfexport", "write a run's checkpoint as a Hugging Face transformers model"),
    "pi": ("privlm.spu.cli", "measured private inference under SecretFlow SPU (2PC)"),
    "sweep": ("privlm.sweep", "train a list of presets / a config grid and tabulate them (Table 3 layout)"),
    "report": ("privlm.report.cli", "self-contained HTML report (tables + figures) of one or more runs"),
    "demo": ("privlm.demo", "the paper's story in minutes: three designs, verdicts, costs, 2PC prediction"),
}
SUBCOMMAND_MODULES: dict[str, str] = {name: module for name, (module, _) in SUBCOMMANDS.items()}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (``only=None``), or the parser with only subcommand ``only`` registered by its module
    (``only=""``: none) and a placeholder carrying the summary for every other one."""
    parser = OneLineArgumentParser(
        prog="privlm", description="Design, train, diagnose and cost language models for private inference.")
    parser.add_argument("--version", action="version", version=f"privlm {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback behind a one-line error (also: PRIVLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMAND_MODULES.items():
        if only is not None and name != only:
            sub.add_parser(name, help=SUBCOMMANDS[name][1], add_help=False)
            continue
        try:
            importlib.import_module(module).register(_Subparsers(sub))
        except ImportError as exc:  # one broken optional dependency must not take every command down
            broken = sub.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
            broken.add_argument("rest", nargs=argparse.REMAINDER)
            broken.set_defaults(func=_unavailable(name, exc))
    return parser


class _Subparsers:
    """The subparsers action as a command module sees it: ``add_parser(NAME)`` gets NAME's summary from
    ``SUBCOMMANDS`` as its ``help``."""

    def __init__(self, action: argparse._SubParsersAction):
        self._action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if "help" in kwargs:
            raise TypeError(f"'{name}': its summary is SUBCOMMANDS['{name}'] in privlm.cli, not a help= argument")
        return self._action.add_parser(name, help=SUBCOMMANDS[name][1], **kwargs)


def _unavailable(name: str, exc: ImportError):
    def fail(_args: argparse.Namespace) -> int:
        raise PrivlmError(f"'privlm {name}' cannot run: {exc}")
    return fail


def _closed_pipe() -> int:
    """`privlm ... | head`: the reader left; stop quietly (and keep Python from complaining at exit)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def _traceback_if(debug: bool) -> None:
    """--debug / PRIVLM_DEBUG=1: the traceback behind the one-line error, after it (call inside ``except``)."""
    if debug:
        import traceback
        traceback.print_exc(file=sys.stderr)


def _version() -> str:
    from privlm import __version__
    return __version__


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not a top-level option)."""
    for arg in argv:
        if arg in SUBCOMMAND_MODULES:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug may stand anywhere on the line (`privlm train X --debug`); it only adds the traceback to an error
    debug = "--debug" in argv or os.environ.get("PRIVLM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    from privlm.proc import adopt_parent
    adopt_parent()  # a privlm started by privlm (`privlm.proc.spawn`, e.g. the demo's `pi run`) dies with it
    parser = build_parser(only=_command_of(argv) or "")
    args, extra = parser.parse_known_args(argv)
    if extra:  # `privlm train SPEC --quiet k=v`: overrides may follow options
        from privlm.config import is_override
        if hasattr(args, "overrides") and all(is_override(e) for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except PrivlmError as exc:
        print(f"privlm {args.command}: error: {one_line(exc)}", file=sys.stderr)
        _traceback_if(debug)
        return exc.exit_code
    except OSError as exc:  # unwritable --out or cache, disk full, a file vanished: the OS's one line
        if exc.errno == errno.EPIPE:
            return _closed_pipe()
        where = f": '{exc.filename}'" if exc.filename else ""
        print(f"privlm {args.command}: error: {one_line(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        _traceback_if(debug)
        return 1
    except KeyboardInterrupt:
        print(f"privlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
