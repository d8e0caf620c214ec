"""`privlm report RUN_DIR... [-o report.html] [--figures DIR] [--baseline NAME]`: one self-contained
HTML file with the summary table, the entropy diagnosis and every figure of the given runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from privlm.errors import PrivlmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", description=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--figures", metavar="DIR", help="also write every figure as PNG into DIR")
    p.add_argument("--baseline", help="run (directory name or preset) the savings are relative to; default first")
    p.add_argument("--profile", default="paper-fit", help="PI cost profile for Comm/Lat (default paper-fit)")
    p.add_argument("--title", default="privlm report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from privlm.report import build_report

    out = Path(args.output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise PrivlmError(f"output '{out}' must end in .html")
    if out.is_dir():
        raise PrivlmError(f"output '{out}' is a directory; give a file name such as {out / 'report.html'}")
    rows = build_report(args.run_dirs, out, Path(args.figures) if args.figures else None,
                        baseline=args.baseline, title=args.title, profile=args.profile)
    print(f"wrote {out} ({len(rows)} run(s))" + (f" and figures in {args.figures}" if args.figures else ""))
    return 0
