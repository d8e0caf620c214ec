"""CPU study v3, all of it, in order and resumable: the held-out selection of lambda and gamma, the 5M and 10M
arms, the stability map, then the generated README (docs/results/cpu-study-v3/README.md).

    PYTHONPATH=src python bench/study_v3.py --jobs 2            # `make study-v3`; rerun the same to resume
    PYTHONPATH=src python bench/study_v3.py --tiny --root /tmp/study-v3-tiny   # smoke: a few runs, 4 steps each

Each step is exactly `privlm sweep FILE --out runs/sweeps/NAME --results docs/results/cpu-study-v3/SUB --jobs N`
(the commands are in configs/sweeps/cpu-study-v3-10m.yaml's header): `privlm.sweep.run_sweep` trains what is
not finished, `write_results` writes results.json / results.md / report.html / figures (and, for the grid,
selection.json), and the study sweeps read the selection (`overrides_from`), so the grid comes first. Last, the
README is copied from docs/templates/cpu-study-v3.md if it does not exist yet and its blocks are regenerated
(`privlm.report.readme`).

`--tiny` copies the sweep files, the base config and the template into ``--root`` (never the repository's own
docs/results), keeps a few runs of each sweep (two seeds where the claims pair them) at 4 steps each, and runs
the same pipeline there: it checks that everything resolves and the README is generated, nothing more.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = (("ereg-grid-v3", "ereg-grid"), ("cpu-study-v3-5m", "5m"), ("cpu-study-v3-10m", "10m"),
         ("stability-map-v3", "stability-map"))
RESULTS = Path("docs") / "results" / "cpu-study-v3"
TEMPLATE = Path("docs") / "templates" / "cpu-study-v3.md"
# --tiny: the runs kept per sweep (by name prefix), enough for every claim to have two paired seeds
TINY_KEEP = {
    "ereg-grid-v3": ("no-reg", "ereg-lambda=8e-05-gamma=0.1", "ereg-lambda=8e-05-gamma=0.2"),
    "cpu-study-v3-5m": tuple(f"{n}-s{s}" for s in (1337, 1) for n in ("sm-scfuffn", "sm-t-scfuffn", "ereg-sm-t-scfuffn")),
    "cpu-study-v3-10m": tuple(f"{n}-s{s}" for s in (1337, 1) for n in ("sm-ln-g", "sm-ln-r", "sm-g", "sm-r", "sm-scfuffn",
                                                                        "ereg-sm-t-scfuffn")),
    "stability-map-v3": tuple(f"{n}-lr={lr}-s1337" for lr in ("0.03", "0.001") for n in ("sm", "sm-scfuffn", "sm-fuffn")),
}


def _tiny_copy(root: Path) -> None:
    """The study's files under ``root`` (configs/sweeps/*, configs/cpu/study-v3.yaml, the README template)."""
    for rel in [Path("configs") / "cpu" / "study-v3.yaml", TEMPLATE,
                *(Path("configs") / "sweeps" / f"{name}.yaml" for name, _ in STEPS)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, root / rel)


def _shrink(sweep) -> None:
    keep = TINY_KEEP[sweep.name]
    sweep.runs = [r for r in sweep.runs if r.name in keep]
    for r in sweep.runs:
        r.cfg = dataclasses.replace(r.cfg, train=dataclasses.replace(
            r.cfg.train, max_steps=4, eval_every=2, entropy_every=2, save_every=4, log_every=2,
            eval_max_batches=2, eval_curve_batches=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at a time, one torch thread each")
    ap.add_argument("--root", default=None, help="repository root whose configs and docs/results are used "
                    "(default: this repository; required with --tiny, which copies the study's files there)")
    ap.add_argument("--runs", default=None, help="where the sweep directories go (default ROOT/runs/sweeps)")
    ap.add_argument("--tiny", action="store_true", help="a few runs of 4 steps per sweep, under --root")
    args = ap.parse_args(argv)
    if args.tiny and args.root is None:
        ap.error("--tiny needs --root (a scratch directory: it never writes the repository's docs/results)")
    root = Path(args.root) if args.root else ROOT
    if args.tiny:
        _tiny_copy(root)
    runs = Path(args.runs) if args.runs else root / "runs" / "sweeps"

    import torch

    from privlm.report.readme import update_readme
    from privlm.sweep import load_sweep, run_sweep, write_results

    torch.set_num_threads(1)
    t0 = time.time()
    for name, sub in STEPS:
        sweep = load_sweep(root / "configs" / "sweeps" / f"{name}.yaml")  # after the grid: reads its selection
        if args.tiny:
            _shrink(sweep)
        out, results = runs / name, root / RESULTS / sub
        command = (f"privlm sweep configs/sweeps/{name}.yaml --out {out} --results {RESULTS / sub}"
                   + (f" --jobs {args.jobs}" if args.jobs > 1 else ""))
        print(f"== {name}: {len(sweep.runs)} runs -> {out}", flush=True)
        run_sweep(sweep, out, jobs=args.jobs, threads=1, command=command)
        write_results(sweep, out, results)
    readme = root / RESULTS / "README.md"
    if not readme.is_file():
        shutil.copyfile(root / TEMPLATE, readme)
    update_readme(readme)
    print(f"wrote {readme} ({time.time() - t0:.0f} s this call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
