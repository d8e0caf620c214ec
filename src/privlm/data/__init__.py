"""Data pipeline: corpus (stdlib / local files / HF datasets) -> tokenizer -> cached T-token chunks.

Entry point: `prepare_data(cfg.data, out_dir=None) -> TokenData` (see docs/CONTRACTS.md). The names below are
imported on first use (`privlm data --help` imports no numpy).
"""
from typing import TYPE_CHECKING

from privlm.errors import DataError
from privlm.lazy import lazy_exports

if TYPE_CHECKING:
    from privlm.data.corpus import Corpus, Split, build_corpus, in_valid_split
    from privlm.data.pipeline import TokenData, prepare_data
    from privlm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe

__all__ = ["prepare_data", "TokenData", "DataError", "build_corpus", "Corpus", "Split", "in_valid_split",
           "train_bpe", "load_tokenizer", "EOS_TOKEN"]
lazy_exports(__name__, {
    **dict.fromkeys(["Corpus", "Split", "build_corpus", "in_valid_split"], "privlm.data.corpus"),
    **dict.fromkeys(["TokenData", "prepare_data"], "privlm.data.pipeline"),
    **dict.fromkeys(["EOS_TOKEN", "load_tokenizer", "train_bpe"], "privlm.data.tokenizer"),
})
