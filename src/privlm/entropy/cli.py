"""`privlm entropy RUN_DIR|HF_MODEL [--data SOURCE] [--json]`: per-head attention entropy of a run's
checkpoint or of a Hugging Face causal LM (a ``save_pretrained`` directory or ``hf:<hub id>``).

Recomputes the Eq. 7 head entropies [L, H] on validation data (the run's own validation split, or every
chunk of --data tokenized with the run's tokenizer; for a Hugging Face model the validation split of the
standard library, or every chunk of --data, tokenized with the model's own tokenizer in chunks of --T
tokens), then prints them as a layer x head table, the paper's
four histogram bins and the verdicts: entropic overload, entropy collapse, or too early to judge (criteria in
privlm/entropy/measure.py and docs/DECISIONS.md). For runs trained with the regularizer it also prints the learned thresholds
theta * log T and the share of heads outside the tolerance margin. For a run that diverged it then prints
the divergence flight recorder's verdict and its last recorded steps (RUN_DIR/flight_recorder.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import TYPE_CHECKING

from privlm.errors import MAX_BATCH, MAX_T, CheckpointError, DataError, bounded_float, bounded_int, positive_int
from privlm.fileio import strict_json

if TYPE_CHECKING:  # numpy, torch and the measurement are imported when a command runs, not by its --help
    import numpy as np


def _batches(chunks: np.ndarray, batch_size: int, max_batches: int | None):
    import numpy as np
    import torch

    n = len(chunks) if max_batches is None else min(len(chunks), batch_size * max_batches)
    for i in range(0, n, batch_size):
        yield torch.from_numpy(np.asarray(chunks[i:i + batch_size], dtype=np.int64))


def entropy_report(run_dir: str, data_source: str | None = None, batch_size: int | None = None,
                   max_batches: int | None = None, device: str = "auto", max_value: float | None = None,
                   T: int | None = None) -> dict:
    import numpy as np
    import torch

    from privlm.data import prepare_data
    from privlm.entropy.measure import diagnose, measure_model
    from privlm.entropy.regularizer import outside_band, threshold_deviation
    from privlm.hfmodel import check_model_dir, is_hf_spec
    from privlm.run import load_run, load_run_config
    from privlm.validate import check_model_fits, check_token_ids

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    check_model_dir(run_dir)
    if is_hf_spec(run_dir):
        return hf_entropy_report(run_dir, data_source, batch_size, max_batches, dev, max_value, T)
    if T is not None:
        raise DataError("--T applies to Hugging Face models; a run is measured at its training T")
    cfg = load_run_config(run_dir)
    check_model_fits(cfg.model, batch_size or cfg.train.batch_size, cfg.data.seq_len, device=dev)
    run = load_run(run_dir, dev)
    data_cfg = dataclasses.replace(run.cfg.data, tokenizer=str(run.path / "tokenizer.json"))
    if data_source is not None:
        # The whole source is the measurement set: make it the validation source of the run's own data build
        # (prepare_data needs a non-empty training split; the run's is cached, so this costs no tokenizing).
        data_cfg = dataclasses.replace(data_cfg, valid_source=data_source, max_valid_docs=None)
    chunks = prepare_data(data_cfg, None).valid
    if len(chunks) == 0:
        raise DataError(f"no validation chunks of T={data_cfg.seq_len} tokens in '{data_source or data_cfg.source}'")
    check_token_ids(chunks, run.cfg.model.vocab_size, f"the data of '{data_source or data_cfg.source}'", DataError)
    matrix, nans, n_seq = measure_model(run.model, _batches(chunks, batch_size or run.cfg.train.batch_size,
                                                            max_batches), dev)
    T = int(chunks.shape[1])
    rep = {"run": str(run.path), "preset": run.cfg.model.preset, "data": data_source or run.cfg.data.source,
           "sequences": n_seq, **diagnose(matrix, nans, T, max_value)}
    theta = run.theta()
    rep["thresholds"] = None
    if theta is not None:
        gamma = run.cfg.reg.gamma
        dev_ = threshold_deviation(matrix, theta.double().numpy(), T)
        rep["thresholds"] = {"theta": theta.tolist(), "gamma": gamma,
                             "outside_share": float(np.mean(outside_band(dev_, gamma, T))),
                             "mean_abs_dev": float(np.nanmean(np.abs(dev_)))}
    return rep


HF_DEFAULT_T = 128  # the paper's context length
HF_DEFAULT_BATCH = 8


def hf_entropy_report(spec: str, data_source: str | None, batch_size: int | None, max_batches: int | None,
                      device: str, max_value: float | None, T: int | None) -> dict:
    """`entropy_report` of a Hugging Face causal LM: same table, bins and verdicts, on text tokenized with
    the model's own tokenizer (the standard library's validation split, or all of ``data_source``)."""
    from privlm.entropy.measure import diagnose, measure_model
    from privlm.entropy.hf import hf_entropy
    from privlm.hfmodel import check_length, load_config, load_model, shape_of, text_chunks

    config = load_config(spec)[0]
    if T is None:
        T = min(HF_DEFAULT_T, shape_of(config)["max_positions"] or HF_DEFAULT_T)
    check_length(config, T)
    hf = load_model(spec, device)
    chunks, what = text_chunks(hf, T, data_source)
    matrix, nans, n_seq = measure_model(hf.model, _batches(chunks, batch_size or HF_DEFAULT_BATCH, max_batches),
                                        device, entropy_fn=hf_entropy)
    return {"run": spec, "preset": f"{hf.family.name}: {type(hf.model).__name__}",
            "data": what, "sequences": n_seq,
            **diagnose(matrix, nans, T, max_value), "thresholds": None}


def _table(rows: list[list[float | None]], fmt: str, marks=None) -> list[str]:
    H = len(rows[0])
    width = 7 if marks else 6
    lines = ["layer | " + " ".join(f"{'h' + str(h):>{width}}" for h in range(H)) + " |   mean"]
    for l, row in enumerate(rows):
        cells = []
        for h, v in enumerate(row):
            text = "   nan" if v is None else format(v, fmt)
            cells.append(text + (marks[l][h] if marks else ""))
        finite = [v for v in row if v is not None]
        mean = format(sum(finite) / len(finite), fmt) if finite else "   nan"
        lines.append(f"{l:>5} | " + " ".join(cells) + f" | {mean}")
    return lines


def format_report(rep: dict) -> str:
    import numpy as np

    from privlm.entropy.measure import BIN_LABELS, COLLAPSE_NATS, near_uniform_heads

    hm = rep["head_entropy"]
    bins, over, coll = rep["bins"], rep["overload"], rep["collapse"]
    matrix = [[np.nan if v is None else v for v in row] for row in hm]
    uniform = near_uniform_heads(matrix, rep["seq_len"], over["near_uniform"])
    marks = [["*" if u else ("_" if v is not None and v < coll["near_zero"] else " ")
              for u, v in zip(urow, row)] for urow, row in zip(uniform, hm)]
    uniform_nats = over["near_uniform"] * rep["causal_max"]
    out = [f"{rep['run']}  ({rep['preset']}; {rep['sequences']} sequences of T={rep['seq_len']} from {rep['data']})",
           f"head entropy in nats (Eq. 7; log T = {rep['log_T']:.3f}, causal max = {rep['causal_max']:.3f}; "
           f"* near-uniform >= {uniform_nats:.3f}, _ below {COLLAPSE_NATS} nats):"]
    out += _table(hm, "6.3f", marks)
    out.append(f"paper's bins (max = {bins['max_value']:.3f}, the largest head entropy"
               f"{'' if bins['max_value'] == max(v for r in hm for v in r if v is not None) else ', shared'}):  "
               + "  ".join(f"{lab} {100 * s:.0f}%" for lab, s in zip(BIN_LABELS, bins["shares"]))
               + (f"  ({bins['nan_heads']} NaN heads)" if bins["nan_heads"] else ""))
    per_layer = " ".join(f"L{l} {100 * s:.0f}%" for l, s in enumerate(over["layer_share"]))
    out.append(f"near-uniform heads (>= {100 * over['near_uniform']:.0f}% of the causal max): "
               f"{100 * over['share']:.0f}% ({per_layer})")
    if over["too_early"]:
        out.append("entropic overload: not judged — every layer still has >= "
                   f"{100 * over['layer_threshold']:.0f}% of its heads near-uniform (too early to judge)")
    else:
        ol = ", ".join(map(str, over["overloaded_layers"])) or "none"
        out.append(f"entropic overload: {'YES' if over['overloaded'] else 'no'} — layers with >= "
                   f"{100 * over['layer_threshold']:.0f}% of heads near-uniform while others have left it: {ol}")
    cl = ", ".join(str(l) for l in coll["collapsed_layers"]) or "none"
    nan_total = sum(coll["nan_counts"] or [])
    out.append(f"entropy collapse: {'YES' if coll['collapsed'] else 'no'} — {100 * coll['share']:.0f}% of heads below "
               f"{coll['near_zero']} nats or NaN; collapsed layers (>= {100 * coll['layer_threshold']:.0f}% or NaN "
               f"attention): {cl}; NaN attention entries: {int(nan_total)}")
    out.append(f"verdict: {rep['verdict']}")
    th = rep.get("thresholds")
    if th:
        out.append(f"learned thresholds theta * log T (nats; gamma = {th['gamma']}, margin = "
                   f"±{th['gamma'] * rep['log_T']:.3f}):")
        out += _table([[t * rep["log_T"] for t in row] for row in th["theta"]], "6.3f")
        out.append(f"heads outside the margin: {100 * th['outside_share']:.0f}%; "
                   f"mean |E - theta log T| = {th['mean_abs_dev']:.3f} nats")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from privlm.flight_trace import format_trace, read_trace
    trace = read_trace(args.run_dir) if os.path.isdir(args.run_dir) else None
    try:
        rep = entropy_report(args.run_dir, args.data, args.batch_size, args.max_batches, args.device, args.max_value,
                             args.T)
    except CheckpointError as exc:
        if trace is None:
            raise
        # diverged before its first checkpoint: no weights to measure, but the trace says what happened
        print(strict_json({"run": args.run_dir, "error": str(exc), "flight_recorder": trace}) if args.json else
              f"{args.run_dir}: no weights to measure ({exc})\n{format_trace(trace)}")
        return 0
    if args.json:
        print(strict_json({**rep, "flight_recorder": trace}))
    else:
        print(format_report(rep))
        if trace is not None:  # the run diverged: what the last recorded steps before the NaN looked like
            print(format_trace(trace))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("entropy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR|HF_MODEL",
                   help="a privlm run directory, a save_pretrained directory or hf:<hub id>")
    p.add_argument("--T", type=bounded_int(1, MAX_T), default=None,
                   help=f"tokens per sequence for a Hugging Face model (default {HF_DEFAULT_T}); a run uses its own")
    p.add_argument("--data", default=None, help="measure on this source instead (files:<glob>, hf:<id>, stdlib)")
    p.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH), default=None,
                   help=f"sequences per forward (default: the run's; {HF_DEFAULT_BATCH} for a Hugging Face model)")
    p.add_argument("--max-batches", type=positive_int, default=None, help="measure only the first N batches")
    p.add_argument("--max-value", type=bounded_float(1e-6, 1e6), default=None,
                   help="shared bin maximum (e.g. the largest head entropy over the runs being compared)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=run)
