"""Token arrays: encode a split, cut it into non-overlapping T-token chunks, cache it memory-mapped.

Chunking (``data.chunking``):

* ``concat`` (default) -- GPT-2/nanoGPT packing: every document is followed by the EOS separator, the
  documents are concatenated in corpus order and the stream is cut into ``floor(total / T)`` chunks; only
  the incomplete tail chunk (< T tokens) of the whole split is dropped, so almost no text is lost and short
  files still contribute.
* ``document`` -- the paper's ``run_clm.py``: each document is tokenized on its own with truncation and
  ``return_overflowing_tokens`` (no separator) and only chunks of exactly T tokens are kept, i.e.
  ``floor(len(doc) / T)`` chunks per document; documents shorter than T contribute nothing.

A built split is stored as a raw little-endian ``uint16`` (vocab <= 65535) or ``uint32`` file of shape
``[n_chunks, T]`` under ``<cache>/tokens/<key>/``, where the key hashes (corpus fingerprint, tokenizer hash,
T, chunking, format and tokenizers-library version); it is read back with ``np.memmap`` (read-only), so a
second run with the same inputs does no tokenization. The directory is written under a temporary name and
renamed into place, so a killed build never leaves a half-written cache entry behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from privlm.data.tokenizer import corpus_encoder
from privlm.errors import DataError

CACHE_FORMAT = 2  # 2: tokens_sha256 in meta.json
_ENCODE_BATCH = 512  # documents per encode_batch call (tokenizers parallelises inside a batch)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else $PRIVLM_CACHE, else ~/.cache/privlm."""
    root = cache_dir or os.environ.get("PRIVLM_CACHE") or "~/.cache/privlm"
    return Path(root).expanduser()


def token_cache_key(corpus_fingerprint: str, tokenizer_sha: str, seq_len: int, chunking: str) -> str:
    # the library version is part of the key: a tokenizers upgrade may change how the same file encodes
    raw = f"v{CACHE_FORMAT}:{corpus_fingerprint}:{tokenizer_sha}:T={seq_len}:{chunking}:{tokenizers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass
class ChunkStats:
    documents: int
    tokens: int  # tokens produced by the split (separators included), before chunking
    chunks: int
    dropped_tokens: int  # tokens not in any chunk (tail of the stream, or per-document tails)
    tokens_sha256: str  # of the chunk array's bytes (little-endian, row-major), as stored

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _encoded(tok: Tokenizer, texts: Iterator[str]) -> Iterator[list[int]]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.20)
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == _ENCODE_BATCH:
            yield from (e.ids for e in encode(batch, add_special_tokens=False))
            batch = []
    if batch:
        yield from (e.ids for e in encode(batch, add_special_tokens=False))


def write_chunks(path: Path, tok: Tokenizer, texts: Iterator[str], eos_id: int, seq_len: int,
                 chunking: str, dtype: np.dtype) -> ChunkStats:
    """Encode `texts` and write the complete T-token chunks to `path` (raw array, row-major)."""
    enc = corpus_encoder(tok)
    docs = tokens = 0
    with open(path, "wb") as f:
        for ids in _encoded(enc, texts):
            docs += 1
            if chunking == "concat":
                arr = np.asarray(ids + [eos_id], dtype=dtype)
            else:
                arr = np.asarray(ids[: len(ids) // seq_len * seq_len], dtype=dtype)
            tokens += len(ids) + (chunking == "concat")
            f.write(arr.tobytes())
        written = f.tell() // dtype.itemsize
    n_chunks = written // seq_len
    os.truncate(path, n_chunks * seq_len * dtype.itemsize)  # concat: drop the incomplete tail chunk
    return ChunkStats(docs, tokens, n_chunks, tokens - n_chunks * seq_len, _file_sha256(path))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def open_chunks(path: Path, n_chunks: int, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Read-only memory map of shape [n_chunks, T] (an empty array when there are no chunks)."""
    if n_chunks == 0:
        return np.empty((0, seq_len), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_chunks, seq_len))


def load_cached(entry: Path) -> dict | None:
    """The metadata of a complete cache entry, or None if absent or unreadable (then it is rebuilt)."""
    meta_path = entry / "meta.json"
    try:
        from privlm.errors import PrivlmError
        from privlm.validate import read_json
        try:
            meta = read_json(meta_path, {"splits": {"train": {"chunks": int}, "valid": {"chunks": int}},
                                         "seq_len": int, "dtype": str})
        except PrivlmError:
            return None
        for split in ("train", "valid"):
            expected = meta["splits"][split]["chunks"] * meta["seq_len"] * np.dtype(meta["dtype"]).itemsize
            if (entry / f"{split}.bin").stat().st_size != expected:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_cache_entry(entry: Path, tok: Tokenizer, splits: dict, eos_id: int, seq_len: int, chunking: str,
                      vocab_size: int, extra_meta: dict) -> dict:
    """Tokenize `splits` ({name: Split}) into a new cache entry at `entry`, atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        stats = {name: write_chunks(tmp / f"{name}.bin", tok, split.texts(), eos_id, seq_len, chunking, dtype)
                 for name, split in splits.items()}
        meta = {"format": CACHE_FORMAT, "seq_len": seq_len, "chunking": chunking, "dtype": dtype.str,
                "vocab_size": vocab_size, "eos_id": eos_id,
                "splits": {name: s.as_dict() for name, s in stats.items()}, **extra_meta}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: keep theirs
            if load_cached(entry) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            meta = load_cached(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def check_chunks(meta: dict, seq_len: int, chunking: str, source: str) -> None:
    """A training split without a single complete chunk cannot train anything: say why in one line."""
    tr = meta["splits"]["train"]
    if tr["chunks"] == 0:
        if chunking == "document":
            raise DataError(f"data.seq_len={seq_len} is larger than every document of '{source}' "
                            f"({tr['documents']} documents, {tr['tokens']} tokens): no complete chunk; "
                            f"lower data.seq_len or use data.chunking=concat")
        raise DataError(f"training split of '{source}' has {tr['tokens']} tokens, fewer than "
                        f"data.seq_len={seq_len}: no complete chunk; lower data.seq_len or add data")
