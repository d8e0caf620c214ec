"""A small real corpus for training tests: the first N stdlib modules, a private token cache warmed once."""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from privlm.config import load_config
from privlm.data import prepare_data


def stdlib_corpus_overrides(tmp: Path, n_files: int) -> list[str]:
    """Overrides for a tiny L2/d64 model on `n_files` stdlib modules copied under `tmp`; the data is built
    here so the runs of a test only read the cache."""
    src = tmp / "corpus"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(p.name for p in stdlib.glob("*.py"))[:n_files]:
        shutil.copy(stdlib / name, src / name)
    over = [f"data.source=files:{src}/*.py", f"data.cache_dir={tmp / 'cache'}", "data.vocab_size=512",
            "data.seq_len=64", "data.valid_fraction=0.1", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
            "model.block_size=64", "train.device=cpu"]
    prepare_data(load_config("SM+LN+G", over).data)
    return over
