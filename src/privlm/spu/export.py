"""Export a privlm model for the JAX/SPU forward: plain weight matrices plus a public architecture file.

What the PyTorch model computes through parametrizations or extra parameters becomes plain weights here:
WN/SN are materialized (W = g·V/||V||, W/sigma with the stored power-iteration vectors, as torch computes
them in eval mode), Eq. 8's 1/alpha is folded into the FFN output projection, and the weights are stored
as [in, out] matrices for ``x @ W``. Two files, so the client can be given the first without the second:

``public.json``         architecture and the public scalars (beta, temperatures, leaky slopes): both parties
``weights.safetensors`` every secret tensor: the server only
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privlm.opschema import EXPORT_FORMAT

PUBLIC_FILE = "public.json"
WEIGHTS_FILE = "weights.safetensors"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


@torch.no_grad()
def export_model(model) -> tuple[dict, dict[str, np.ndarray]]:
    """(public meta, secret weights) of a `privlm.model.GPT`, ready for `privlm.spu.program`."""
    from privlm.model.ffn import FFN, FusedFFN, LeakyReLU

    was_training = model.training
    model.eval()  # spectral_norm runs a power iteration on every weight access in train mode
    try:
        cfg = model.config
        w: dict[str, np.ndarray] = {"wte": _np(model.wte.weight), "wpe": _np(model.wpe.weight)}
        ffn_kinds, betas, slopes, temps = [], [], [], []
        for i, block in enumerate(model.blocks):
            p = f"h{i}."
            for ln, key in ((block.ln_1, "ln1"), (block.ln_2, "ln2")):
                if isinstance(ln, nn.LayerNorm):
                    w[p + key + ".g"] = _np(ln.weight)
                    if ln.bias is not None:
                        w[p + key + ".b"] = _np(ln.bias)
            a = block.attn
            w[p + "wqkv"] = _np(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).t())
            if a.q_proj.bias is not None:
                w[p + "bqkv"] = _np(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            w[p + "wo"] = _np(a.o_proj.weight.t())
            if a.o_proj.bias is not None:
                w[p + "bo"] = _np(a.o_proj.bias)
            t = a.temperatures()
            temps.append(None if t is None else _np(t).tolist())
            inv_alpha = 1.0 if block.alpha is None else 1.0 / float(block.alpha)
            betas.append(None if block.beta is None else float(block.beta))
            slope = None
            if block.ffn is None:
                ffn_kinds.append(None)
            elif isinstance(block.ffn, FusedFFN):
                ffn_kinds.append("fused")
                w[p + "wf"] = _np(block.ffn.fc.weight.t() * inv_alpha)
                if block.ffn.fc.bias is not None:
                    w[p + "bf"] = _np(block.ffn.fc.bias * inv_alpha)
            elif isinstance(block.ffn, FFN):
                ffn_kinds.append("standard")
                f = block.ffn
                w[p + "w1"] = _np(f.fc_in.weight.t())
                if f.fc_in.bias is not None:
                    w[p + "b1"] = _np(f.fc_in.bias)
                w[p + "w2"] = _np(f.fc_out.weight.t() * inv_alpha)
                if f.fc_out.bias is not None:
                    w[p + "b2"] = _np(f.fc_out.bias * inv_alpha)
                if isinstance(f.act, LeakyReLU):
                    slope = float(f.act.slope)
            else:
                raise TypeError(f"export: unknown FFN module {type(block.ffn).__name__}")
            slopes.append(slope)
        if isinstance(model.ln_f, nn.LayerNorm):
            w["lnf.g"] = _np(model.ln_f.weight)
            if model.ln_f.bias is not None:
                w["lnf.b"] = _np(model.ln_f.bias)
        if model.lm_head.weight is not model.wte.weight:
            w["head"] = _np(model.lm_head.weight)
        meta = {
            "format": EXPORT_FORMAT, "preset": cfg.preset, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
            "ffn_width": cfg.ffn_width, "layer_norm_eps": cfg.layer_norm_eps, "norm": cfg.norm,
            "ln_f": isinstance(model.ln_f, nn.LayerNorm), "activation": cfg.activation, "ffn": ffn_kinds,
            "beta": betas if any(b is not None for b in betas) else None,
            "leaky_slope": slopes,
            "temperature": temps if any(t is not None for t in temps) else None,
            "weights": {k: list(w[k].shape) for k in sorted(w)},  # names and shapes are public
        }
        return meta, w
    finally:
        model.train(was_training)


def save_export(model, out_dir: Path) -> tuple[Path, Path]:
    """Write public.json and weights.safetensors into ``out_dir``; returns their paths."""
    from safetensors.numpy import save_file

    meta, weights = export_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pub, wts = out_dir / PUBLIC_FILE, out_dir / WEIGHTS_FILE
    pub.write_text(json.dumps(meta))
    save_file(weights, str(wts))
    return pub, wts


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
