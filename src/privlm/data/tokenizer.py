"""Tokenizers: train a GPT-2 style byte-level BPE on the training split, or load an existing one.

``data.tokenizer`` is ``bpe`` (train, ``data.vocab_size`` entries including the special token), a path to a
``tokenizer.json`` file (or a directory containing one), or an ``AutoTokenizer`` name / local directory
(e.g. the paper's ``huggingface-course/code-search-net-tokenizer`` when online); a transformers tokenizer
must be a fast one, whose ``backend_tokenizer`` is the HF ``tokenizers.Tokenizer`` used everywhere here.

Documents are separated by ``<|endoftext|>`` (GPT-2's EOS). Loaded tokenizers that lack it get it appended
as an added special token (recorded in the manifest), so every tokenizer can serve as a separator source.
When corpus text is encoded, special-token matching is switched off (`encode_special_tokens`), so a file
that happens to contain the literal string ``<|endoftext|>`` cannot forge a document boundary.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from privlm.errors import DataError

EOS_TOKEN = "<|endoftext|>"
BPE_MIN_FREQUENCY = 2  # as tokenizers' ByteLevelBPETokenizer.train; a pair seen once is not a merge
BPE_RECIPE = "bytelevel-bpe-v1"  # bump when train_bpe changes, so cached tokenizers are not reused


def train_bpe(texts: Iterable[str], vocab_size: int, length: Optional[int] = None) -> Tokenizer:
    """GPT-2 style byte-level BPE: 256 byte symbols + EOS + merges, up to `vocab_size` entries in all."""
    if vocab_size < 257:
        raise DataError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE "
                        f"(256 byte symbols + {EOS_TOKEN}); use at least 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(spec: str) -> tuple[Tokenizer, str, Optional[str]]:
    """(tokenizer, kind, eos token or None) for a tokenizer.json path, a directory holding one, or an
    AutoTokenizer name (whose own ``eos_token`` is then used as the document separator)."""
    path = Path(spec).expanduser()
    # A transformers directory (tokenizer_config.json) goes through AutoTokenizer, which knows its eos_token;
    # a bare directory with tokenizer.json is read as that file.
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file() or path.is_dir():
        from privlm.validate import check_tokenizer_files
        check_tokenizer_files(path, DataError)  # sizes and nesting bounded before the tokenizer library reads
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), "file", None
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"data.tokenizer '{spec}' is not a valid tokenizer.json: {first}") from None
    if spec.endswith(".json"):
        raise DataError(f"data.tokenizer file '{spec}' does not exist")
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(spec, use_fast=True)
    except Exception as exc:  # offline / unknown name / not a tokenizer: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load tokenizer '{spec}' (data.tokenizer: bpe, a tokenizer.json path or an "
                        f"AutoTokenizer name): {first}") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer '{spec}' has no fast (tokenizers) backend; privlm needs a tokenizer.json")
    return Tokenizer.from_str(backend.to_str()), "pretrained", getattr(hf_tok, "eos_token", None)


def ensure_eos(tok: Tokenizer, preferred: Optional[str] = None) -> tuple[str, int, bool]:
    """(separator token, its id, whether it had to be added): `preferred` (a pretrained tokenizer's own
    eos_token) if the vocabulary has it, else <|endoftext|>, added as a special token if missing."""
    for name in (preferred, EOS_TOKEN):
        if name is not None and tok.token_to_id(name) is not None:
            return name, tok.token_to_id(name), False
    tok.add_special_tokens([EOS_TOKEN])
    return EOS_TOKEN, tok.token_to_id(EOS_TOKEN), True


def tokenizer_sha256(tok: Tokenizer) -> str:
    """Content hash of the serialized tokenizer (vocab and merges are written in id order: deterministic)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def corpus_encoder(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that encodes special-token strings found in text as ordinary text."""
    enc = Tokenizer.from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc
