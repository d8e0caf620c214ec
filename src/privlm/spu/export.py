"""Export a model for the 2PC program: its traced op graph and the server's tensors (`privlm.trace`).

``save_traced(model, dir, T)`` writes, for a privlm `GPT` or a supported Hugging Face causal LM at prompt length T:

``program.json``        the op graph (architecture and shapes only): both parties
``public.safetensors``  constants derived from the architecture (causal masks, rotary tables): both parties
``server.safetensors``  every learned value (weights, biases, norm gains, WN/SN materialized, Eq. 8's alpha and
                        beta folded into the linear weights by `privlm.model.fold`, SM(t) temperatures, leaky
                        slopes): the server only
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_model(run_dir: Path):
    """(Config, GPT in eval mode, tokenizer or None) of a run directory (docs/CONTRACTS.md layout)."""
    from privlm.run import load_run  # torch side: the one run loader (CheckpointError on missing/corrupt files)

    run = load_run(Path(run_dir))
    return run.cfg, run.model.eval(), run.tokenizer


def load_any(spec: str):
    """(model in eval mode, tokenizer or None, vocabulary size, positions, is_hf) of a privlm run directory, a
    Hugging Face ``save_pretrained`` directory or ``hf:<id>`` (local cache; safetensors only, no remote code)."""
    from privlm.hfmodel import is_hf_spec, load_model as load_hf, shape_of

    if is_hf_spec(spec):
        hm = load_hf(spec)
        tok = None
        if (hm.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(hm.path / "tokenizer.json"))
        shape = shape_of(hm.model.config)
        return hm.model, tok, shape["vocab_size"], shape["max_positions"], True
    cfg, model, tok = load_model(Path(spec))
    return model, tok, cfg.model.vocab_size, cfg.model.block_size, False


def save_traced(model, out_dir: Path, T: int) -> tuple[Path, Path]:
    """The traced program of ``model`` at T (`privlm.trace`): (program.json, server.safetensors) in ``out_dir``,
    the public constants beside them."""
    from privlm.opschema import SERVER_FILE, TRACE_FILE
    from privlm.trace import save_trace, trace_model

    out_dir = Path(out_dir)
    save_trace(trace_model(model, T), out_dir)
    return out_dir / TRACE_FILE, out_dir / SERVER_FILE


@torch.no_grad()
def plain_logits(model, ids) -> np.ndarray:
    """Plaintext logits [N, T, V] of a privlm GPT or an HF causal LM for token ids [N, T]."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    out = model(input_ids=ids) if hasattr(model.config, "model_type") else model(ids)
    return out.logits.float().numpy()
