"""Inputs shared by the `privlm pi` commands (run, eval, generate): loading a model for a 2PC run after the memory
check, the prompt's token ids, the --peer-timeout flag. Main environment."""
from __future__ import annotations

import argparse
from pathlib import Path

from privlm.errors import CheckpointError, PrivlmError, finite_float


def peer_timeout_seconds(text: str) -> float:
    """argparse type of --peer-timeout: a number of seconds in 1..86400."""
    value = finite_float(text)
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} must be between 1 and 86400 seconds")
    return value


def add_peer_timeout_arg(parser) -> None:
    from privlm.spu.party import PEER_TIMEOUT_S
    parser.add_argument("--peer-timeout", type=peer_timeout_seconds, default=PEER_TIMEOUT_S, metavar="S",
                        help=f"2proc: a party whose peer does not connect within S seconds, or whose peer's "
                             f"process ends, exits with one line naming it (default {PEER_TIMEOUT_S:g})")


def check_2pc_memory(run_dir: Path, T: int = 1, sequences: int = 1):
    """The run's config, after checking that a 2PC run of it on ``sequences`` x ``T`` tokens can fit in memory
    (privlm.validate.spu_memory)."""
    from privlm.run import load_run_config
    from privlm.validate import check_fits, spu_memory
    cfg = load_run_config(run_dir)
    check_fits(spu_memory(cfg.model, T, sequences), f"a 2PC run of '{run_dir}' (L{cfg.model.n_layer} "
               f"d{cfg.model.n_embd} V{cfg.model.vocab_size}, {sequences}x{T} tokens)")
    return cfg


def load_for_2pc(spec: str, T: int = 1, sequences: int = 1):
    """(model, tokenizer or None, vocabulary size, positions, is_hf) of a privlm run (after the 2PC memory
    check) or a Hugging Face model (its loader checks memory)."""
    from privlm.hfmodel import is_hf_spec
    from privlm.spu.export import load_any
    if not is_hf_spec(spec):
        check_2pc_memory(Path(spec), T, sequences)
    return load_any(spec)


def prompt_tokens(args, tokenizer, vocab_size: int) -> list[int]:
    """The prompt's token ids from ``--tokens`` or ``--prompt`` (one-line errors: not integers, empty, outside
    the vocabulary)."""
    if args.tokens is not None:
        try:
            ids = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise PrivlmError(f"--tokens '{args.tokens}' must be comma-separated integers") from None
    else:
        if tokenizer is None:
            raise CheckpointError(f"'{args.run_dir}' has no tokenizer.json; pass --tokens instead of --prompt")
        ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise PrivlmError("the prompt is empty after tokenization; give at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PrivlmError(f"token ids {bad[:5]} are outside the vocabulary 0..{vocab_size - 1}")
    return ids
