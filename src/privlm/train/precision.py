"""Device and mixed-precision choice: bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 on CPU."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from privlm.config import ConfigError


@dataclass
class Precision:
    device: torch.device
    dtype: torch.dtype  # compute dtype inside autocast (float32 = no autocast)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device=mps but MPS is not available; use train.device=cpu")
    return torch.device(name)


def resolve_precision(device_name: str, dtype_name: str, local_rank: int = 0) -> Precision:
    device = resolve_device(device_name, local_rank)
    if dtype_name == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("train.dtype=float16 needs CUDA (GradScaler); use float32 or bfloat16 on CPU")
    return Precision(device, dtype)
