"""Load a run directory written by `privlm train` (layout in docs/CONTRACTS.md)."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import torch
import yaml

from privlm.config import Config, ConfigError, from_dict
from privlm.errors import CheckpointError
from privlm.fileio import check_accessible
from privlm.model import GPT


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
        return load_file(str(f))["theta"]


def load_run_config(run_dir: Path | str) -> Config:
    """The resolved config a run was trained with (CheckpointError if RUN_DIR is not a run directory)."""
    path = Path(run_dir)
    check_accessible(path / "config.yaml")  # unreadable is "Permission denied: PATH", never "does not exist"
    if not path.is_dir():
        raise CheckpointError(f"run directory '{path}' does not exist")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{path}' is not a privlm run directory (no config.yaml)")
    try:
        return from_dict(yaml.safe_load(cfg_file.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
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
    model = GPT(cfg.model)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except Exception as exc:  # noqa: BLE001 - header/shape/truncation problems all mean a bad checkpoint
        raise CheckpointError(f"cannot load '{path / 'model.safetensors'}': {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load '{path / 'tokenizer.json'}': {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return Run(cfg, model, tokenizer, path)
