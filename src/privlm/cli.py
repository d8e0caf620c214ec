"""`privlm` command line. Each subcommand lives in the module of its concept and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from privlm.errors import OneLineArgumentParser, PrivlmError, one_line

# Modules that contribute subcommands (imported lazily so `privlm --help` stays fast and a broken optional
# dependency only breaks its own command).
SUBCOMMAND_MODULES: dict[str, str] = {
    "inspect": "privlm.inspect",
    "data": "privlm.data.cli",
    "train": "privlm.train.cli",
    "eval": "privlm.evaluate",
    "sample": "privlm.sample",
    "entropy": "privlm.entropy.cli",
    "cost": "privlm.pi.cost_cli",
    "export-hf": "privlm.hfexport",
    "pi": "privlm.spu.cli",
    "sweep": "privlm.sweep",
    "report": "privlm.report.cli",
    "demo": "privlm.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="privlm", description="Design, train, diagnose and cost language models for private inference.")
    parser.add_argument("--version", action="version", version=f"privlm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMAND_MODULES.items():
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:  # one broken optional dependency must not take every command down
            broken = sub.add_parser(name, help=f"(unavailable: {exc})", add_help=False)
            broken.add_argument("rest", nargs=argparse.REMAINDER)
            broken.set_defaults(func=_unavailable(name, exc))
    return parser


def _unavailable(name: str, exc: ImportError):
    def fail(_args: argparse.Namespace) -> int:
        raise PrivlmError(f"'privlm {name}' cannot run: {exc}")
    return fail


def _closed_pipe() -> int:
    """`privlm ... | head`: the reader left; stop quietly (and keep Python from complaining at exit)."""
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def _version() -> str:
    from privlm import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        return exc.exit_code
    except OSError as exc:  # unwritable --out or cache, disk full, a file vanished: the OS's one line
        if exc.errno == errno.EPIPE:
            return _closed_pipe()
        where = f": '{exc.filename}'" if exc.filename else ""
        print(f"privlm {args.command}: error: {one_line(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"privlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
