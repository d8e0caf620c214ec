"""`privlm` command line. Each subcommand lives in the module of its concept and registers itself here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from privlm.errors import PrivlmError

# Modules that contribute subcommands (imported lazily so `privlm --help` stays fast and a broken optional
# dependency only breaks its own command).
SUBCOMMAND_MODULES: dict[str, str] = {
    "inspect": "privlm.inspect",
    "train": "privlm.train.cli",
    "eval": "privlm.evaluate",
    "sample": "privlm.sample",
    "entropy": "privlm.entropy.cli",
    "cost": "privlm.pi.cost_cli",
    "pi": "privlm.spu.cli",
    "report": "privlm.report.cli",
    "sweep": "privlm.sweep",
    "data": "privlm.data.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privlm", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--version", action="version", version=f"privlm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMAND_MODULES.items():
        importlib.import_module(module).register(sub)
    return parser


def _version() -> str:
    from privlm import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrivlmError as exc:
        print(f"privlm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"privlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
