"""Inputs shared by the `privlm pi` commands (run, eval, export, generate): loading a model for a 2PC run after the
memory check, the prompt's token ids, the --peer-timeout flag, and what `privlm pi export` writes (the client's
copy of the public files, what an export directory is, its tokenizer and its generation shapes). Main
environment."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Optional

from privlm.errors import MAX_T, CheckpointError, PrivlmError, finite_float
from privlm.opschema import CONSTANTS_FILE, DECODE, PREFILL, SERVER_FILE, TRACE_FILE


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


# --- exports of `privlm pi export` -----------------------------------------------------------------------------
def copy_public(program_dir: Path, client_dir: Path) -> None:
    """The files of a traced program both parties hold (program.json, public.safetensors) into the client's
    directory; server.safetensors stays where it is."""
    client_dir.mkdir(parents=True, exist_ok=True)
    for name in (TRACE_FILE, CONSTANTS_FILE):
        shutil.copy(program_dir / name, client_dir / name)


def export_kind(path: Path) -> Optional[str]:
    """What `privlm pi export` wrote at ``path``: ``"run"`` (one traced program: program.json, for `pi run`),
    ``"generate"`` (prefill/ and decode/ programs, for `pi generate`), None for anything else (a model)."""
    path = Path(path)
    if not path.is_dir() or (path / "model.safetensors").is_file() or (path / "config.json").is_file():
        return None
    if (path / TRACE_FILE).is_file():
        return "run"
    if (path / PREFILL / TRACE_FILE).is_file():
        return "generate"
    return None


def is_server_half(path: Path) -> bool:
    """An export directory holding the server's tensors (the `server/` half) rather than a client bundle."""
    path = Path(path)
    return (path / SERVER_FILE).is_file() or (path / PREFILL / SERVER_FILE).is_file()


def bundle_tokenizer(path: Path):
    """The tokenizer.json of a client bundle (checked like a run's), or None when the bundle has none."""
    path = Path(path) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    from privlm.validate import check_tokenizer_files
    check_tokenizer_files(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load '{path}': {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


def generation_shapes(path: Path) -> tuple[int, int, int]:
    """(P, C, vocabulary size) of a generation export: the prompt length its prefill program was traced for and
    the capacity of its decode program's cache (C = P without a decode program: one new token), read from the
    public program.json files; it generates up to C - P + 1 tokens."""
    from privlm.validate import read_json
    path = Path(path)
    pre = read_json(path / PREFILL / TRACE_FILE)
    P, V, C = pre["T"], pre["vocab_size"], pre["T"]
    if (path / DECODE / TRACE_FILE).is_file():
        where = path / DECODE / TRACE_FILE
        dec = read_json(where, {"format": str, "T": int, "vocab_size": int, "inputs": {"sel": {"shape": [int]}}})
        shape = dec["inputs"]["sel"]["shape"]
        if len(shape) != 2 or not P < shape[1] <= MAX_T or dec["vocab_size"] != V or dec["T"] != 1:
            raise CheckpointError(f"'{where}' is malformed: its decode step does not continue the {P}-token prefill "
                                  f"of vocabulary {V} (inputs.sel.shape {shape}, T {dec['T']})")
        C = shape[1]
    if not 1 <= P <= MAX_T:
        raise CheckpointError(f"'{path / PREFILL / TRACE_FILE}' is malformed: T={P} must be in 1..{MAX_T}")
    return P, C, V
