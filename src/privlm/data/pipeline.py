"""`prepare_data`: corpus -> tokenizer -> cached T-token chunks, plus the data manifest of a run.

The three stages are cached separately under ``data.cache_dir`` (see `tokens.cache_root`):

* the corpus is rebuilt every time (a sorted walk + SHA-256, about 2 s for the stdlib corpus) because its
  fingerprint is what the other caches are keyed by, so edited files are always noticed;
* a trained BPE lives in ``tokenizers/<hash of recipe, training split, vocab size>.json``;
* token arrays live in ``tokens/<hash of corpus, tokenizer, T, chunking>/``.

A warm call therefore reads files and maps arrays; it neither trains nor tokenizes (``manifest["cache"]``
says which stages were hits).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from privlm.data.corpus import Corpus, build_corpus
from privlm.data.tokenizer import BPE_RECIPE, ensure_eos, load_tokenizer, tokenizer_sha256, train_bpe
from privlm.data.tokens import (build_cache_entry, cache_root, check_chunks, load_cached, open_chunks,
                                token_cache_key, token_dtype)
from privlm.errors import DataError
from privlm.fileio import atomic_write_text

MANIFEST_VERSION = 1


@dataclass
class TokenData:
    """Chunked token ids of the splits (shape [n_chunks, T]) and everything needed to decode them;
    `heldout` only with data.heldout_fraction > 0."""

    train: np.ndarray
    valid: np.ndarray
    tokenizer: Tokenizer
    vocab_size: int
    manifest: dict
    eos_id: int = 0
    heldout: Optional[np.ndarray] = None

    def split(self, name: str) -> np.ndarray:
        """The chunks of split `name` (train, valid or heldout); DataError if it was not built."""
        if name == "heldout" and self.heldout is None:
            raise DataError("this run's data has no held-out split (data.heldout_fraction=0); "
                            "train with data.heldout_fraction > 0 to evaluate on one")
        if name not in ("train", "valid", "heldout"):
            raise DataError(f"unknown data split '{name}'; choose train, valid or heldout")
        return getattr(self, name)

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def _tokenizer_for(dcfg, corpus: Corpus, root: Path) -> tuple[Tokenizer, dict]:
    spec = dcfg.tokenizer
    if spec != "bpe":
        t0 = time.perf_counter()
        tok, kind, eos = load_tokenizer(spec)
        return tok, {"kind": kind, "spec": spec, "preferred_eos": eos, "cache": "n/a",
                     "load_seconds": round(time.perf_counter() - t0, 3)}
    key = hashlib.sha256(f"{BPE_RECIPE}:{corpus.train.sha256}:{dcfg.vocab_size}".encode()).hexdigest()[:32]
    path = root / "tokenizers" / f"{key}.json"
    info = {"kind": "bpe", "spec": "bpe", "preferred_eos": None, "recipe": BPE_RECIPE,
            "trained_on": {"split": "train", "sha256": corpus.train.sha256, "documents": corpus.train.n_docs,
                           "bytes": corpus.train.n_bytes}}
    if path.is_file():
        try:
            from privlm.validate import check_tokenizer_files
            check_tokenizer_files(path, DataError)
            return Tokenizer.from_file(str(path)), {**info, "cache": "hit", "train_seconds": None}
        except Exception:  # corrupt cache file: retrain and overwrite it
            pass
    t0 = time.perf_counter()
    tok = train_bpe(corpus.train.texts(), dcfg.vocab_size, length=corpus.train.n_docs)
    seconds = time.perf_counter() - t0
    atomic_write_text(path, tok.to_str())
    return tok, {**info, "cache": "miss", "train_seconds": round(seconds, 3)}


def prepare_data(dcfg, out_dir: Optional[Path] = None) -> TokenData:
    """Build (or load from cache) the chunked token arrays described by `dcfg` (a DataConfig).

    With `out_dir`, also writes ``tokenizer.json`` and ``data_manifest.json`` there (atomically). An
    existing ``tokenizer.json`` that differs from this config's tokenizer is an error, never overwritten.
    """
    t_start = time.perf_counter()
    if dcfg.seq_len <= 0:
        raise DataError(f"data.seq_len={dcfg.seq_len} must be a positive integer")
    chunking = getattr(dcfg, "chunking", "concat")
    if chunking not in ("concat", "document"):
        raise DataError(f"data.chunking='{chunking}' is not allowed; choose concat or document")
    root = cache_root(dcfg.cache_dir)

    corpus = build_corpus(dcfg)
    t_corpus = time.perf_counter()
    if corpus.valid.n_docs == 0 and (dcfg.valid_fraction > 0 or dcfg.valid_source is not None):
        raise DataError(f"validation split of '{dcfg.valid_source or dcfg.source}' is empty "
                        f"({corpus.train.n_docs} training documents, data.valid_fraction={dcfg.valid_fraction}); "
                        f"raise data.valid_fraction or set data.valid_source")
    if corpus.heldout is not None and corpus.heldout.n_docs == 0:
        raise DataError(f"held-out split of '{dcfg.source}' is empty ({corpus.train.n_docs} training documents, "
                        f"data.heldout_fraction={dcfg.heldout_fraction}); raise data.heldout_fraction")

    tok, tok_info = _tokenizer_for(dcfg, corpus, root)
    eos_token, eos_id, eos_added = ensure_eos(tok, tok_info.pop("preferred_eos"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok_sha = tokenizer_sha256(tok)
    tok_info.update({"sha256": tok_sha, "vocab_size": vocab_size, "eos_token": eos_token, "eos_id": eos_id,
                     "eos_added": eos_added})
    t_tok = time.perf_counter()

    key = token_cache_key(corpus.fingerprint, tok_sha, dcfg.seq_len, chunking)
    entry = root / "tokens" / key
    meta = load_cached(entry)
    tokens_cache = "hit" if meta is not None else "miss"
    if meta is None:
        meta = build_cache_entry(entry, tok, corpus.splits, eos_id,
                                 dcfg.seq_len, chunking, vocab_size,
                                 {"corpus": corpus.fingerprint, "tokenizer": tok_sha})
    t_chunks = time.perf_counter()
    check_chunks(meta, dcfg.seq_len, chunking, dcfg.source)
    if corpus.valid.n_docs and meta["splits"]["valid"]["chunks"] == 0:
        raise DataError(f"validation split ({corpus.valid.n_docs} documents, "
                        f"{meta['splits']['valid']['tokens']} tokens) has no complete chunk of "
                        f"data.seq_len={dcfg.seq_len} tokens; lower data.seq_len or enlarge the validation set")

    if corpus.heldout is not None and meta["splits"]["heldout"]["chunks"] == 0:
        raise DataError(f"held-out split ({corpus.heldout.n_docs} documents) has no complete chunk of "
                        f"data.seq_len={dcfg.seq_len} tokens; raise data.heldout_fraction")

    dtype = token_dtype(vocab_size)
    arrays = {s: open_chunks(entry / f"{s}.bin", meta["splits"][s]["chunks"], dcfg.seq_len, dtype)
              for s in corpus.splits}
    if tokens_cache == "hit":  # a cache file from disk: every id must index the tokenizer's vocabulary
        from privlm.validate import check_token_ids
        for s, arr in arrays.items():
            check_token_ids(arr, vocab_size, f"token cache '{entry / s}.bin'", DataError)

    manifest = corpus.manifest()
    for s in corpus.splits:
        split_bytes = manifest["splits"][s]["bytes"]
        manifest["splits"][s].update(meta["splits"][s])
        manifest["splits"][s]["tokens_per_byte"] = (round(meta["splits"][s]["tokens"] / split_bytes, 4)
                                                    if split_bytes else None)
    manifest.update({
        "version": MANIFEST_VERSION,
        "config": {k: getattr(dcfg, k) for k in dcfg.__dataclass_fields__},
        "seq_len": dcfg.seq_len, "chunking": chunking, "dtype": dtype.str,
        "tokenizer": tok_info,
        "cache": {"dir": str(entry), "key": key, "tokenizer": tok_info.get("cache"), "tokens": tokens_cache},
        "timing": {"corpus_seconds": round(t_corpus - t_start, 3), "tokenizer_seconds": round(t_tok - t_corpus, 3),
                   "tokenize_seconds": round(t_chunks - t_tok, 3),
                   "total_seconds": round(time.perf_counter() - t_start, 3)},
    })
    if out_dir is not None:
        write_run_files(Path(out_dir), tok, manifest)
    return TokenData(arrays["train"], arrays["valid"], tok, vocab_size, manifest, eos_id, arrays.get("heldout"))


def write_run_files(out_dir: Path, tok: Tokenizer, manifest: dict) -> None:
    """RUN_DIR/tokenizer.json and RUN_DIR/data_manifest.json (see docs/CONTRACTS.md)."""
    tok_path = out_dir / "tokenizer.json"
    text = tok.to_str()
    if tok_path.is_file():
        try:
            existing = tokenizer_sha256(Tokenizer.from_file(str(tok_path)))
        except Exception:
            existing = None
        if existing != tokenizer_sha256(tok):
            raise DataError(f"'{tok_path}' exists and differs from the tokenizer of this data config; "
                            f"use a new run directory")
    else:
        atomic_write_text(tok_path, text)
    atomic_write_text(out_dir / "data_manifest.json", json.dumps(manifest, indent=1) + "\n")
