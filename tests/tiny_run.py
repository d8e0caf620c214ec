"""The tiny run directory the 2PC tests share: config.yaml, model.safetensors and a word-level tokenizer.json
(docs/CONTRACTS.md layout), small enough for an SPU run in seconds."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_model

from privlm.config import load_config, to_yaml
from privlm.model import GPT

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.vocab_size=64", "model.block_size=16",
        "data.seq_len=16", "model.init_std=0.2"]
PROMPT = "w1 w5 w9 w3 w22 w7 w8 w40"


def word_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + [f"w{i}" for i in range(1, 64)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def write_tiny_run(out: Path) -> Path:
    """An SM+LN+G run directory of random weights (seed 0) in ``out``."""
    cfg = load_config("SM+LN+G", TINY)
    torch.manual_seed(0)
    (out / "config.yaml").write_text(to_yaml(cfg))
    save_model(GPT(cfg.model), str(out / "model.safetensors"))
    word_tokenizer(out / "tokenizer.json")
    return out
