"""Regenerate the shipped ``paper-fit`` cost profile and the fit tables of docs/pi-cost.md (maintainers only).

    .venv/bin/python bench/paper_fit.py            # print what would change
    .venv/bin/python bench/paper_fit.py --write    # write src/privlm/pi/profiles/paper-fit.json and the doc

The library never writes into its package or docs/ at run time; this script is the one place that
refreshes the shipped data after a change to the fit (`privlm.pi.fit`) or to the published rows. The profile
goes through `privlm.pi.costs.save_profile`, i.e. the same validation as every profile `privlm cost` reads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from privlm.fileio import atomic_write_text
from privlm.pi.costs import SHIPPED_PROFILE_DIR, save_profile
from privlm.pi.fit import fit_rows, leave_one_setting_out, markdown_cv, markdown_residuals, run

DOC = Path(__file__).resolve().parents[1] / "docs" / "pi-cost.md"
BEGIN, END = "<!-- BEGIN paper-fit residuals (python bench/paper_fit.py --write) -->", "<!-- END paper-fit residuals -->"
CV_BEGIN, CV_END = ("<!-- BEGIN leave-one-setting-out (python bench/paper_fit.py --write) -->",
                    "<!-- END leave-one-setting-out -->")


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{DOC}: markers {begin!r} ... {end!r} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + body + "\n" + end + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the shipped profile and the doc tables")
    args = parser.parse_args()
    out = run()
    profile_path = SHIPPED_PROFILE_DIR / "paper-fit.json"
    old = json.loads(profile_path.read_text())
    text = replace_between(DOC.read_text(), BEGIN, END, markdown_residuals(out["residuals"]))
    text = replace_between(text, CV_BEGIN, CV_END, markdown_cv(leave_one_setting_out(fit_rows())))
    print(f"{profile_path}: {'unchanged' if old == out['profile'] else 'changed'}")
    print(f"{DOC}: {'unchanged' if text == DOC.read_text() else 'changed'}")
    if args.write:
        save_profile(out["profile"], profile_path, overwrite=True)
        atomic_write_text(DOC, text)
        print("written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
