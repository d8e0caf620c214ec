"""Text corpora: where documents come from, which are kept, and which split each one lands in.

Three sources (``data.source``):

* ``stdlib`` -- the Python files of this interpreter's standard library (tests included, site-packages
  excluded), the offline stand-in for CodeParrot. Walked in sorted order.
* ``files:<glob>`` -- local ``.py``/``.txt`` files (one document per file) and ``.jsonl``/``.parquet`` files
  (one document per row, column ``data.text_field``, read through HF ``datasets``).
* ``hf:<dataset id>[:<config>]`` -- ``datasets.load_dataset(id, config, split=..., streaming=...)`` (or
  ``load_from_disk`` for a directory written by ``save_to_disk``), then ``shuffle(seed).select(range(max_docs))`` as the paper's
  ``run_clm.py`` does for ``huggingface-course/codeparrot-ds-train`` / ``-valid``.

Every document goes through the same gate (`_Gate`): strict UTF-8 decoding, the CodeParrot-clean filters
(for code: stdlib and ``.py`` files, or ``data.filters=codeparrot``), empty-document removal and exact
deduplication by SHA-256 of the content (first occurrence in walk order wins). Rejected documents are
counted per reason, never fatal, unless nothing is left.

Without ``data.valid_source`` (and with ``valid_split == train_split``) the validation split is chosen by a
stable hash: a file goes to validation iff ``sha256("privlm-split:" + relative path)`` falls below
``valid_fraction`` of the 64-bit range (rows without a path are keyed by their content hash). The choice
depends only on the key, so adding or removing other files never moves a file between splits.

With ``data.heldout_fraction > 0`` a third split, ``heldout`` (for choosing settings apart from the reported
validation split), is carved from the *training* documents by a second, independent hash of the same key:
``sha256("privlm-heldout:" + key)`` below ``heldout_fraction`` of the range. Validation is decided first and
never looks at the held-out hash, so the validation split is the same with or without a held-out split, and
train ∩ heldout = ∅. With ``heldout_fraction = 0`` (the default) nothing is carved and the corpus, its
fingerprint and every cache key are those of a build without the field.

Each split carries a SHA-256 over the (UTF-8 byte length, SHA-256) of its documents in order, which
fingerprints the built corpus for the token cache and the run's data manifest. File documents are not held
in memory: each pass re-reads them and checks their hash, so a file edited mid-build is an error, never a
silent mismatch between the manifest and the tokens.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from privlm.data.filters import MAX_FILE_BYTES, SKIP_REASONS, code_filter_reason
from privlm.errors import DataError
from privlm.validate import parse_json

TEXT_SUFFIXES = (".py", ".txt")
ROW_SUFFIXES = (".jsonl", ".parquet")
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
_ROW_BATCH = 1000
_MAX_LISTED_SKIPS = 50  # per reason, in the manifest
SPLIT_NAMES = ("train", "valid", "heldout")


@dataclass
class Split:
    """One built split: a re-iterable stream of accepted documents plus its fingerprint."""

    name: str
    texts: Callable[[], Iterator[str]]  # each call restarts the stream, always in the same order
    n_docs: int
    n_bytes: int  # UTF-8 bytes of the accepted documents
    sha256: str
    files: Optional[list[dict]] = None  # [{"path", "bytes"}] for file sources; None for dataset rows

    def manifest(self) -> dict:
        out = {"documents": self.n_docs, "bytes": self.n_bytes, "sha256": self.sha256}
        if self.files is not None:
            out["files"] = self.files
        return out


@dataclass
class Corpus:
    train: Split
    valid: Split
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # how it was built (for the manifest)
    heldout: Optional[Split] = None  # only with data.heldout_fraction > 0

    @property
    def splits(self) -> dict[str, Split]:
        """{name: Split} of the splits built: train, valid and (if asked for) heldout."""
        out = {"train": self.train, "valid": self.valid}
        if self.heldout is not None:
            out["heldout"] = self.heldout
        return out

    @property
    def fingerprint(self) -> str:
        key = f"{self.train.sha256}:{self.valid.sha256}"
        if self.heldout is not None:  # without a held-out split: the fingerprint of earlier builds
            key += f":heldout:{self.heldout.sha256}"
        return hashlib.sha256(key.encode()).hexdigest()

    def manifest(self) -> dict:
        return {"source": self.source, "fingerprint": self.fingerprint,
                "splits": {name: split.manifest() for name, split in self.splits.items()},
                "skipped": dict(self.skipped), "skipped_examples": self.skipped_examples}


class _SplitHasher:
    """SHA-256 over each document's (byte length, SHA-256), so document order and boundaries are hashed."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.n_docs = 0
        self.n_bytes = 0

    def add(self, digest: bytes, n_bytes: int) -> None:
        self._h.update(n_bytes.to_bytes(8, "little"))
        self._h.update(digest)
        self.n_docs += 1
        self.n_bytes += n_bytes

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _in_hash_split(salt: bytes, key: bytes, fraction: float) -> bool:
    """Stable hash split: sha256(salt + key), read as a 64-bit integer, falls in the lowest `fraction`."""
    if fraction <= 0.0:
        return False
    bucket = int.from_bytes(hashlib.sha256(salt + key).digest()[:8], "big")
    return bucket < int(fraction * 2**64)


def in_valid_split(key: bytes, fraction: float) -> bool:
    """Whether the document keyed `key` belongs to the hash-split validation set."""
    return _in_hash_split(b"privlm-split:", key, fraction)


def in_heldout_split(key: bytes, fraction: float) -> bool:
    """Whether a training-side document keyed `key` is carved into the held-out split (independent hash)."""
    return _in_hash_split(b"privlm-heldout:", key, fraction)


class _Gate:
    """Decides whether a document is kept; counts every rejection by reason (see filters.SKIP_REASONS)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.exclude: set[bytes] = set()  # digests of the separate validation set (never trained on)
        self.skipped = {r: 0 for r in SKIP_REASONS}
        self.examples: dict[str, list[str]] = {}

    def reject(self, reason: str, name: Optional[str]) -> None:
        self.skipped[reason] += 1
        if name is not None:
            lst = self.examples.setdefault(reason, [])
            if len(lst) < _MAX_LISTED_SKIPS:
                lst.append(name)

    def admit(self, raw: bytes | str, code: bool, name: Optional[str] = None) -> Optional[tuple[str, bytes, int]]:
        """Return (text, sha256 digest of its UTF-8 bytes, byte count) if kept, else None (reason counted)."""
        if isinstance(raw, str):  # dataset rows: a lone surrogate has no UTF-8 form (and breaks tokenizers)
            text = raw
            try:
                data = raw.encode("utf-8")
            except UnicodeEncodeError:
                self.reject("invalid_utf8", name)
                return None
        else:
            data = raw
        if code and len(data) > MAX_FILE_BYTES:  # checked before decoding: a 1 MB file is never decoded
            self.reject("too_large", name)
            return None
        if isinstance(raw, bytes):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.reject("invalid_utf8", name)
                return None
        if not text.strip():
            self.reject("empty", name)
            return None
        if code:
            reason = code_filter_reason(text)
            if reason is not None:
                self.reject(reason, name)
                return None
        digest = hashlib.sha256(data).digest()
        if digest in self.seen:
            self.reject("duplicate", name)
            return None
        self.seen.add(digest)
        if digest in self.exclude:
            self.reject("in_valid", name)
            return None
        return text, digest, len(data)


# ---------------------------------------------------------------------------------------------------
# In-memory documents (files on disk, streamed datasets)

@dataclass
class _Doc:
    key: bytes  # what the hash split looks at
    text: Optional[str]  # None for files: re-read from `file` on every pass
    digest: bytes  # sha256 of the UTF-8 bytes
    n_bytes: int
    path: Optional[str] = None  # relative path, for the manifest
    file: Optional[Path] = None


def _doc_text(d: _Doc) -> str:
    if d.text is not None:
        return d.text
    try:
        data = d.file.read_bytes()
    except OSError as exc:
        raise DataError(f"corpus file '{d.file}' became unreadable during the build: {exc.strerror}") from None
    if hashlib.sha256(data).digest() != d.digest:
        raise DataError(f"corpus file '{d.file}' changed during the build; run again")
    return data.decode("utf-8")


class _RowSplit:
    """Accepted rows of one Arrow dataset: a boolean mask (the texts stay memory-mapped on disk) and the
    (sha256, byte count) of every kept row, in row order."""

    def __init__(self, ds, text_field: str):
        self.ds, self.text_field = ds, text_field
        self.mask = np.zeros(len(ds), dtype=bool)
        self.entries: list[tuple[bytes, int]] = []

    def add(self, row: int, digest: bytes, n_bytes: int) -> None:
        self.mask[row] = True
        self.entries.append((digest, n_bytes))

    def __len__(self) -> int:
        return len(self.entries)

    def keep(self, selected: np.ndarray) -> "_RowSplit":
        """Keep only the accepted rows at positions `selected` (sorted) among the accepted rows."""
        rows = np.flatnonzero(self.mask)
        self.mask[:] = False
        self.mask[rows[selected]] = True
        self.entries = [self.entries[i] for i in selected]
        return self

    def texts(self) -> Iterator[str]:
        for i, value in enumerate(_iter_rows(self.ds, self.text_field)):
            if self.mask[i]:
                yield _row_text(value, self.text_field)


# A split is assembled from parts: in-memory/file documents (lists of _Doc) and dataset rows (_RowSplit).
def _entries(part) -> list[tuple[bytes, int]]:
    return part.entries if isinstance(part, _RowSplit) else [(d.digest, d.n_bytes) for d in part]


def _part_texts(part) -> Iterator[str]:
    return part.texts() if isinstance(part, _RowSplit) else (_doc_text(d) for d in part)


def _limit(parts: list, max_docs: Optional[int], seed: int, how: str) -> list:
    """Keep `max_docs` accepted documents of a split: the first ones ('first': a dataset already shuffled,
    as the paper's select(range(n))) or a seeded random subset kept in walk order ('sample')."""
    total = sum(len(p) for p in parts)
    if max_docs is None or total <= max_docs:
        return parts
    chosen = np.arange(max_docs) if how == "first" else np.sort(np.random.default_rng(seed).permutation(total)[:max_docs])
    out, offset = [], 0
    for p in parts:
        sel = chosen[(chosen >= offset) & (chosen < offset + len(p))] - offset
        out.append(p.keep(sel) if isinstance(p, _RowSplit) else [p[i] for i in sel])
        offset += len(p)
    return out


def _make_split(name: str, parts: list) -> Split:
    h = _SplitHasher()
    for part in parts:
        for digest, n_bytes in _entries(part):
            h.add(digest, n_bytes)
    docs = [d for p in parts if not isinstance(p, _RowSplit) for d in p]
    with_paths = all(not isinstance(p, _RowSplit) for p in parts) and all(d.path for d in docs)
    files = [{"path": d.path, "bytes": d.n_bytes} for d in docs] if with_paths else None
    return Split(name, lambda: itertools.chain.from_iterable(_part_texts(p) for p in parts),
                 h.n_docs, h.n_bytes, h.hexdigest(), files)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def walk_python_files(root: Path) -> list[Path]:
    """Every ``*.py`` under `root` in sorted order, skipping site-packages and __pycache__."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return out


def _glob_base(pattern: str) -> Path:
    """The directory part of `pattern` before its first wildcard: relative paths are taken from here."""
    parts = Path(pattern).parts
    base = []
    for part in parts:
        if glob.has_magic(part):
            break
        base.append(part)
    else:  # no wildcard: a single file (or a directory given literally)
        p = Path(pattern)
        return p if p.is_dir() else p.parent
    return Path(*base) if base else Path(".")


def expand_glob(pattern: str) -> tuple[Path, list[Path]]:
    """(base directory, sorted matching files) for a `files:` pattern; a directory means all files in it."""
    p = Path(pattern).expanduser()
    if p.is_dir():
        pattern = str(p / "**" / "*")
    pattern = str(Path(pattern).expanduser())
    matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not matches:
        if not glob.has_magic(pattern):
            raise DataError(f"data file '{pattern}' does not exist")
        raise DataError(f"data.source glob '{pattern}' matches no files")
    return _glob_base(pattern), matches


def _read_text_files(paths: Iterable[Path], base: Path, gate: _Gate, code_for: Callable[[Path], bool],
                     errors: list[str]) -> list[_Doc]:
    docs = []
    for path in paths:
        rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
        try:
            raw = path.read_bytes()
        except OSError as exc:  # unreadable file: counted like a bad file, reported by name
            errors.append(f"{rel}: {exc.strerror}")
            continue
        got = gate.admit(raw, code_for(path), rel)
        if got is not None:
            docs.append(_Doc(rel.encode(), None, got[1], got[2], rel, path))
    return docs


# ---------------------------------------------------------------------------------------------------
# HF datasets rows

def _check_jsonl(files: list[str]) -> None:
    """DataError naming the first file and line that is not one JSON object."""
    for name in files:
        try:
            with open(name, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = parse_json(line, f"'{name}' line {lineno}", DataError)  # depth bounded
                    if not isinstance(row, dict):
                        raise DataError(f"'{name}' line {lineno} is a JSON {type(row).__name__}, not an object "
                                        f"with a text field")
        except UnicodeDecodeError as exc:
            raise DataError(f"'{name}' is not UTF-8 text (byte offset {exc.start})") from None

def _column_check(ds, text_field: str, where: str) -> None:
    cols = list(getattr(ds, "column_names", None) or [])
    if cols and text_field not in cols:
        raise DataError(f"{where} has no column '{text_field}' (data.text_field); columns: {', '.join(cols)}")


def _iter_rows(ds, text_field: str) -> Iterator[str]:
    """Texts of column `text_field`; Arrow datasets are read in batches (memory-mapped, not loaded)."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        for batch in ds.select_columns([text_field]).iter(batch_size=_ROW_BATCH):
            yield from batch[text_field]
    else:
        for row in ds:
            if text_field not in row:
                raise DataError(f"dataset row has no field '{text_field}' (data.text_field); "
                                f"fields: {', '.join(row)}")
            yield row[text_field]


def _row_text(value, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"column '{text_field}' (data.text_field) holds {type(value).__name__}, not text")
    return value


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (seconds, instead of minutes of HTTP retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hf_offline(offline: bool):
    """Hub calls answered from the local cache only (no retries against an unreachable network)."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs its own multi-line errors and draws progress bars; privlm reports one line instead,
    and draws no bars off a terminal."""
    import datasets

    level = datasets.logging.get_verbosity()
    bars = datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def load_hf(spec: str, split: str, streaming: bool):
    """`datasets.load_dataset(id, config, split=split, streaming=streaming)` for ``id[:config]``, or
    `load_from_disk` for a directory written by `save_to_disk`."""
    import datasets

    name = None
    if ":" in spec and not Path(spec).expanduser().exists():  # e.g. wikitext:wikitext-103-raw-v1
        spec, name = spec.rsplit(":", 1)
    path = Path(spec).expanduser()
    if spec.startswith(("/", "./", "../", "~")) and not path.exists():
        raise DataError(f"dataset path '{spec}' does not exist")
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset '{spec}' has no split '{split}'; splits: {', '.join(ds)}")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        if path.exists():
            with _quiet_datasets():
                return datasets.load_dataset(str(path), name, split=split, streaming=streaming)
        offline = (datasets.config.HF_HUB_OFFLINE or not hub_reachable()
                   or os.environ.get("HF_HUB_OFFLINE", "").upper() in datasets.config.ENV_VARS_TRUE_VALUES)
        with _quiet_datasets(), _hf_offline(offline):
            try:
                return datasets.load_dataset(spec, name, split=split, streaming=streaming)
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001
                if offline:
                    raise DataError(f"cannot load dataset '{spec}' split '{split}': the Hugging Face Hub is not "
                                    f"reachable (no network, or HF_HUB_OFFLINE set) and the dataset is not in "
                                    f"the local cache ({datasets.config.HF_DATASETS_CACHE})") from None
                raise
    except DataError:
        raise
    except Exception as exc:  # hub/network/format errors from datasets are multi-line; keep the first
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load dataset '{spec}' split '{split}': {first}") from None


def _select(ds, max_docs: Optional[int], seed: int, streaming: bool):
    """The paper's `shuffle(seed=0).select(range(n))` (a buffered shuffle + take when streaming)."""
    if max_docs is None:
        return ds
    if streaming:
        return ds.shuffle(seed=seed, buffer_size=10_000).take(max_docs)
    return ds.shuffle(seed=seed).select(range(min(max_docs, len(ds))))


# ---------------------------------------------------------------------------------------------------

class _Builder:
    """Shared state of one corpus build: the gate (dedup across both splits) and the config."""

    def __init__(self, dcfg) -> None:
        self.cfg = dcfg
        self.gate = _Gate()
        self.read_errors: list[str] = []

    def code(self, default: bool) -> bool:
        mode = getattr(self.cfg, "filters", "auto")
        return default if mode == "auto" else mode == "codeparrot"

    # -- local files ---------------------------------------------------------------------------------
    def file_docs(self, source: str) -> tuple[list[_Doc], list[tuple], dict]:
        """(text-file documents, [(row dataset, description)], info) of a stdlib or files: source."""
        if source == "stdlib":
            root = stdlib_root()
            paths = walk_python_files(root)
            docs = _read_text_files(paths, root, self.gate, lambda p: self.code(True), self.read_errors)
            return docs, [], {"kind": "stdlib", "root": str(root), "files_seen": len(paths)}
        pattern = source[len("files:"):]
        base, paths = expand_glob(pattern)
        bad = sorted({p.suffix or p.name for p in paths if p.suffix not in TEXT_SUFFIXES + ROW_SUFFIXES})
        if bad:
            raise DataError(f"data.source '{source}' matches files of unsupported type {', '.join(bad)}; "
                            f"supported: {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)}")
        text_paths = [p for p in paths if p.suffix in TEXT_SUFFIXES]
        docs = _read_text_files(text_paths, base, self.gate, lambda p: self.code(p.suffix == ".py"),
                                self.read_errors)
        row_sets = []
        for suffix, builder in ((".jsonl", "json"), (".parquet", "parquet")):
            row_files = [str(p) for p in paths if p.suffix == suffix]
            if row_files:
                row_sets.append((self._row_dataset(builder, row_files, base), f"{builder} files under '{base}'"))
        return docs, row_sets, {"kind": "files", "pattern": pattern, "base": str(base), "files_seen": len(paths)}

    def _row_dataset(self, builder: str, files: list[str], base: Path):
        import datasets

        try:
            with _quiet_datasets():
                return datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as exc:
            if builder == "json":
                _check_jsonl(files)  # names the file and line datasets' error does not
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read {builder} files under '{base}': {first}") from None

    # -- HF datasets -----------------------------------------------------------------------------------
    def hf_dataset(self, source: str, split: str, max_docs: Optional[int]):
        c = self.cfg
        spec = source[len("hf:"):]
        if not spec:
            raise DataError("data.source 'hf:' needs a dataset id, e.g. hf:huggingface-course/codeparrot-ds-train")
        if c.streaming and max_docs is None:
            raise DataError(f"data.streaming=true needs a document budget for '{source}' "
                            f"(set data.max_train_docs / data.max_valid_docs)")
        ds = _select(load_hf(spec, split, c.streaming), max_docs, c.shuffle_seed, c.streaming)
        return ds, {"kind": "hf", "dataset": spec, "split": split, "streaming": c.streaming,
                    "max_docs": max_docs, "shuffle_seed": c.shuffle_seed}

    def rows(self, ds, assign: Callable[[bytes], str], where: str) -> dict:
        """Run the gate over dataset rows; `assign(content digest)` names the split of each kept row.
        Arrow datasets give `_RowSplit`s; streamed ones (bounded by max_docs) lists of in-memory documents."""
        import datasets

        field_ = self.cfg.text_field
        _column_check(ds, field_, where)
        arrow = isinstance(ds, datasets.Dataset)
        out: dict = {n: _RowSplit(ds, field_) if arrow else [] for n in SPLIT_NAMES}
        for i, value in enumerate(_iter_rows(ds, field_)):
            got = self.gate.admit(_row_text(value, field_), self.code(False))
            if got is None:
                continue
            text, digest, n_bytes = got
            part = out[assign(digest)]
            if arrow:
                part.add(i, digest, n_bytes)
            else:
                part.append(_Doc(digest, text, digest, n_bytes))
        return out

    def parts(self, source: str, assign: Callable[[bytes], str], hf_split: str,
              hf_max: Optional[int]) -> tuple[dict[str, list], dict]:
        """{"train": [parts], "valid": [parts], "heldout": [parts]} of one source; files are keyed by path,
        rows by content."""
        out: dict[str, list] = {n: [] for n in SPLIT_NAMES}
        if source.startswith("hf:"):
            ds, info = self.hf_dataset(source, hf_split, hf_max)
            row_sets = [(ds, f"dataset '{source}'")]
        else:
            docs, row_sets, info = self.file_docs(source)
            for name in out:
                out[name].append([d for d in docs if assign(d.key) == name])
        for ds, where in row_sets:
            for name, part in self.rows(ds, assign, where).items():
                out[name].append(part)
        return out, info


def build_corpus(dcfg) -> Corpus:
    """Build the train/valid document splits described by `dcfg` (a DataConfig)."""
    b = _Builder(dcfg)
    frac, seed = dcfg.valid_fraction, dcfg.shuffle_seed
    hfrac = getattr(dcfg, "heldout_fraction", 0.0)

    def carve(k: bytes) -> str:  # a training-side document: held out, or trained on
        return "heldout" if in_heldout_split(k, hfrac) else "train"
    source, valid_source = dcfg.source, dcfg.valid_source
    _check_scheme(source, "data.source")
    if valid_source is not None:
        _check_scheme(valid_source, "data.valid_source")
    vsrc = valid_source or source

    info: dict = {}
    if valid_source is not None or (source.startswith("hf:") and dcfg.valid_split != dcfg.train_split):
        # Separate validation documents: built first, so training drops any exact copy of them.
        vparts, info["valid"] = b.parts(vsrc, lambda k: "valid", dcfg.valid_split, dcfg.max_valid_docs)
        b.gate.exclude, b.gate.seen = b.gate.seen, set()  # dedup within train; copies of valid -> in_valid
        tparts, info["train"] = b.parts(source, carve, dcfg.train_split, dcfg.max_train_docs)
        train_parts, valid_parts, heldout_parts = tparts["train"], vparts["valid"], tparts["heldout"]
        info["split"] = {"kind": "separate"}
    else:
        parts, info["train"] = b.parts(source, lambda k: "valid" if in_valid_split(k, frac) else carve(k),
                                       dcfg.train_split, dcfg.max_train_docs)
        train_parts, valid_parts, heldout_parts = parts["train"], parts["valid"], parts["heldout"]
        info["split"] = {"kind": "hash", "key": "relative path (dataset rows: content sha256)",
                         "valid_fraction": frac}
    # HF sources were already cut to max_docs at load time (shuffle(seed).select(range(n)), as the paper);
    # a hash-split validation part is cut to its first max_valid_docs rows of that shuffled order.
    if not source.startswith("hf:"):
        train_parts = _limit(train_parts, dcfg.max_train_docs, seed, "sample")
    valid_parts = _limit(valid_parts, dcfg.max_valid_docs, seed + 1, "first" if vsrc.startswith("hf:") else "sample")
    train, valid = _make_split("train", train_parts), _make_split("valid", valid_parts)
    heldout = None
    if hfrac > 0:
        info["heldout"] = {"kind": "hash", "key": "as the validation split", "salt": "privlm-heldout:",
                           "heldout_fraction": hfrac, "carved_from": "train"}
        heldout = _make_split("heldout", heldout_parts)

    skipped_examples = dict(b.gate.examples)
    if b.read_errors:
        skipped_examples["unreadable"] = b.read_errors[:_MAX_LISTED_SKIPS]
    if train.n_docs == 0:
        counts = ", ".join(f"{k}={v}" for k, v in b.gate.skipped.items() if v)
        unreadable = f"; unreadable={len(b.read_errors)}" if b.read_errors else ""
        raise DataError(f"training corpus from '{source}' is empty after filtering "
                        f"({counts or 'no documents'}{unreadable})")
    return Corpus(train, valid, b.gate.skipped, skipped_examples, info, heldout)


def _check_scheme(source: str, key: str) -> None:
    if source != "stdlib" and not source.startswith(("hf:", "files:")):
        raise DataError(f"{key}='{source}' has an unknown scheme; use stdlib, hf:<dataset id> or files:<glob>")
