"""`privlm eval RUN_DIR [--split valid|heldout] [--data SOURCE] [--json]`: perplexity of a run's latest checkpoint.

Without --data it uses the run's own validation split (rebuilt from the data cache), or with
--split heldout its held-out split (runs trained with data.heldout_fraction > 0: documents carved from the
training side, never trained on, for choosing settings apart from the reported validation split). With --data
(files:<glob>, hf:<id> or stdlib) every chunk of that source, tokenized with the run's tokenizer, is scored.
"""
from __future__ import annotations

import argparse
import dataclasses

from privlm.errors import MAX_BATCH, bounded_int, positive_int
from privlm.fileio import strict_json


def evaluate_run(run_dir: str, data_source: str | None = None, batch_size: int | None = None,
                 max_batches: int | None = None, device: str = "auto", split: str = "valid") -> dict:
    from privlm.data import prepare_data
    from privlm.errors import DataError
    from privlm.run import load_run, load_run_config
    from privlm.train.evaluation import evaluate
    from privlm.errors import ConfigError
    from privlm.train.precision import resolve_precision
    from privlm.validate import check_model_fits, check_token_ids

    if data_source is not None and split != "valid":
        raise ConfigError(f"--split {split} names one of the run's own splits; it cannot be combined with --data")
    precision = resolve_precision(device, "auto")
    cfg = load_run_config(run_dir)
    check_model_fits(cfg.model, batch_size or cfg.train.batch_size, cfg.data.seq_len, device=precision.device)
    run = load_run(run_dir, precision.device)
    data_cfg = dataclasses.replace(run.cfg.data, tokenizer=str(run.path / "tokenizer.json"))
    if data_source is None:
        chunks = prepare_data(data_cfg, None).split(split)
    else:
        # every document of the source is scored: build it as one split (no validation hold-out)
        data_cfg = dataclasses.replace(data_cfg, source=data_source, valid_source=None, valid_fraction=0.0,
                                       max_train_docs=None)
        chunks = prepare_data(data_cfg, None).train
    check_token_ids(chunks, run.cfg.model.vocab_size, f"the data of '{data_source or run.cfg.data.source}'",
                    DataError)
    res = evaluate(run.model, chunks, batch_size or run.cfg.train.batch_size, precision, max_batches=max_batches)
    return {"run": str(run.path), "data": data_source or run.cfg.data.source,
            "split": None if data_source is not None else split, "seq_len": run.cfg.data.seq_len,
            **res.to_dict()}


def run(args: argparse.Namespace) -> int:
    rep = evaluate_run(args.run_dir, args.data, args.batch_size, args.max_batches, args.device, args.split)
    if args.json:  # an overflowed PPL is null, not Infinity (which is not JSON)
        print(strict_json(rep))
    else:
        print(f"{rep['run']}: {rep['split'] or 'valid'} loss {rep['loss']:.4f}  PPL {rep['ppl']:.4f}  "
              f"({rep['tokens']:,} tokens, T={rep['seq_len']}, data {rep['data']})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="evaluate on this source instead (files:<glob>, hf:<id>, stdlib)")
    p.add_argument("--split", default="valid", choices=("valid", "heldout"),
                   help="the run's split to score: valid (default) or heldout (needs data.heldout_fraction > 0)")
    p.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=None)
    p.add_argument("--max-batches", type=positive_int, default=None, help="score only the first N batches")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--json", action="store_true", help="print {ppl, loss, tokens, ...} as JSON")
    p.set_defaults(func=run)
