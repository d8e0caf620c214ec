"""`privlm train CONFIG.yaml|PRESET [key=value ...] [--out RUN_DIR] [--resume RUN_DIR] [--quiet]`

Trains a model on the configured data and writes a run directory (docs/CONTRACTS.md). Under
`torchrun --nproc_per_node N` or `srun -n N` (SLURM) the same command trains with DDP (global batch = N x
batch_size x grad_accum).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from privlm.config import ConfigError, apply_overrides, load_config, split_spec
from privlm.errors import CheckpointError
from privlm.fileio import slug


def _default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{slug(preset)}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_config(run_dir: Path, overrides: list[str]):
    """The run's saved config with optional overrides (e.g. train.max_steps=... to extend a run, train.lr=...);
    the trainer rejects changes outside `RESUME_OVERRIDABLE` and records the others in config_history.jsonl."""
    from privlm.run import load_run_config

    try:
        cfg = load_run_config(run_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}") from None
    return apply_overrides(cfg, overrides)


def run(args: argparse.Namespace) -> int:
    from privlm.train.distributed import world_size
    from privlm.train.loop import train

    spec, overrides = split_spec(args.spec, args.overrides)
    if args.resume:
        if spec:
            raise ConfigError(f"--resume takes the config from the run directory; drop '{spec}'")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("use either --out (new run) or --resume RUN_DIR (continue a run), not both")
        run_dir = Path(args.resume)
        cfg = resume_config(run_dir, overrides)
    else:
        cfg = load_config(spec, overrides)
        if args.out:
            run_dir = Path(args.out)
        elif world_size() > 1:
            raise ConfigError("under torchrun or srun pass --out RUN_DIR (every process must write the same run)")
        else:
            run_dir = _default_run_dir(cfg.model.preset)
    from privlm.train.distributed import launch_env
    from privlm.train.precision import resolve_device
    from privlm.validate import check_model_fits
    check_model_fits(cfg.model, cfg.train.batch_size, cfg.data.seq_len, training=True,
                     device=resolve_device(cfg.train.device, launch_env().local_rank))
    summary = train(cfg, run_dir, resume=bool(args.resume), quiet=args.quiet)
    if summary:
        print(f"final valid PPL {summary['final_ppl']:.4f} (loss {summary['final_loss']:.4f}) after "
              f"{summary['steps']} steps; unigram baseline PPL {summary['unigram_ppl']:.4f}; run: {run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=None, help="YAML config or preset name (e.g. 'SM+R')")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    p.add_argument("--out", default=None, help="new run directory (default runs/<preset>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR exactly (from step 0 if it died before its first checkpoint); "
                        "train.* overrides such as train.max_steps or train.lr apply from the next step")
    p.add_argument("--quiet", action="store_true", help="no progress bar, log lines only (automatic off a TTY)")
    p.set_defaults(func=run)
