"""Load a run directory written by `privlm train` (layout in docs/CONTRACTS.md)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch

from privlm.config import Config, ConfigError, from_dict
from privlm.errors import CheckpointError
from privlm.fileio import check_accessible
from privlm.model import GPT
from privlm.validate import (check_finite, check_model_fits, check_tokenizer_files, read_run_config_dict,
                             safetensors_header)


class Run(NamedTuple):
    cfg: Config
    model: GPT
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    path: Path

    def theta(self) -> Optional[torch.Tensor]:
        """The entropy regularizer's learned thresholds [L, H], when the run used it."""
        f = self.path / "entropy_reg.safetensors"
        if not f.is_file():
            return None
        from safetensors.torch import load_file
        header = safetensors_header(f)
        if "theta" not in header:
            raise CheckpointError(f"'{f}' is malformed: it lacks the tensor 'theta'")
        theta = load_file(str(f))["theta"]
        check_finite([("theta", theta)], f"'{f}'")
        return theta


def load_run_config(run_dir: Path | str) -> Config:
    """The resolved config a run was trained with (CheckpointError if RUN_DIR is not a run directory)."""
    path = Path(run_dir)
    check_accessible(path / "config.yaml")  # unreadable is "Permission denied: PATH", never "does not exist"
    if not path.is_dir():
        raise CheckpointError(f"run directory '{path}' does not exist")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{path}' is not a privlm run directory (no config.yaml)")
    raw = read_run_config_dict(cfg_file)
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"'{cfg_file}' is not a valid privlm config: {str(exc).splitlines()[0]}") from None


def load_run(run_dir: Path | str, device: str | torch.device = "cpu") -> Run:
    """Config, model (weights of the latest good checkpoint, eval mode) and tokenizer of a run."""
    path = Path(run_dir)
    cfg = load_run_config(path)
    for name in ("model.safetensors", "tokenizer.json"):
        check_accessible(path / name)
        if not (path / name).is_file():
            raise CheckpointError(f"'{path}' is not a complete run: missing {name}")
    from safetensors.torch import load_model
    from tokenizers import Tokenizer
    weights, tok_file = path / "model.safetensors", path / "tokenizer.json"
    safetensors_header(weights)  # lengths bounded by the file before the library reads them
    check_tokenizer_files(tok_file)
    check_model_fits(cfg.model, device=device)
    model = GPT(cfg.model)
    try:
        load_model(model, str(weights), strict=True)
    except Exception as exc:  # noqa: BLE001 - header/shape/truncation problems all mean a bad checkpoint
        raise CheckpointError(f"cannot load '{weights}': {str(exc).splitlines()[0]}") from None
    check_finite(model.state_dict().items(), f"'{weights}'")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load '{tok_file}': {str(exc).splitlines()[0]}") from None
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise CheckpointError(f"'{tok_file}' has {tokenizer.get_vocab_size():,} tokens but the model's vocabulary "
                              f"is {cfg.model.vocab_size:,} (model.vocab_size): its ids would be out of range")
    model.to(device).eval()
    return Run(cfg, model, tokenizer, path)
