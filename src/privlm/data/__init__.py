"""Data pipeline: corpus (stdlib / local files / HF datasets) -> tokenizer -> cached T-token chunks.

Entry point: `prepare_data(cfg.data, out_dir=None) -> TokenData` (see docs/CONTRACTS.md).
"""
from privlm.data.corpus import Corpus, Split, build_corpus, in_valid_split
from privlm.data.pipeline import TokenData, prepare_data
from privlm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe
from privlm.errors import DataError

__all__ = ["prepare_data", "TokenData", "DataError", "build_corpus", "Corpus", "Split", "in_valid_split",
           "train_bpe", "load_tokenizer", "EOS_TOKEN"]
