"""Weight interop with Hugging Face `transformers.GPT2LMHeadModel` (baseline SM+LN+G only).

HF GPT-2 stores its projections as Conv1D with weight [in, out] and a fused c_attn (q|k|v);
privlm uses nn.Linear ([out, in]) and separate q/k/v projections.
"""
from __future__ import annotations

import torch

from privlm.config import ModelConfig
from privlm.model.gpt import GPT


def config_from_hf(hf_config) -> ModelConfig:
    """ModelConfig equivalent to an HF GPT2Config (activation gelu_new, all biases, ln_f)."""
    if getattr(hf_config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"HF activation '{hf_config.activation_function}' has no privlm equivalent; "
                         f"privlm's 'gelu' is the tanh approximation (gelu_new)")
    return ModelConfig(preset="SM+LN+G", vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer,
                       n_head=hf_config.n_head, n_embd=hf_config.n_embd, block_size=hf_config.n_positions,
                       ffn_hidden=hf_config.n_inner, layer_norm_eps=hf_config.layer_norm_epsilon,
                       init_std=hf_config.initializer_range, bias=True, ln_f=True)


def check_baseline(cfg: ModelConfig) -> None:
    if not (cfg.norm == "layernorm" and cfg.ln_f and cfg.activation == "gelu" and cfg.ffn == "standard"
            and not cfg.ffn_scaling and not cfg.attn_temperature and cfg.bias and cfg.tie_embeddings
            and cfg.weight_norm == cfg.spectral_norm == "none" and set(cfg.ffn_layers()) == set(range(cfg.n_layer))):
        raise ValueError(f"only the GPT-2 baseline (SM+LN+G with biases, tied head) maps onto GPT2LMHeadModel; "
                         f"got preset '{cfg.preset}'")


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> GPT:
    """Build a privlm GPT carrying the weights of an HF GPT2LMHeadModel state dict."""
    check_baseline(cfg)
    model = GPT(cfg)
    d = cfg.n_embd
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    ours: dict[str, torch.Tensor] = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
                                     "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[f"{b}attn.{name}.weight"] = w_qkv[j * d:(j + 1) * d]
            ours[f"{b}attn.{name}.bias"] = b_qkv[j * d:(j + 1) * d]
        pairs = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "ffn.fc_in",
                 "mlp.c_proj": "ffn.fc_out"}
        for theirs, mine in pairs.items():
            w = sd[h + theirs + ".weight"]
            ours[b + mine + ".weight"] = w if theirs.startswith("ln") else w.t()
            ours[b + mine + ".bias"] = sd[h + theirs + ".bias"]
    ours["lm_head.weight"] = ours["wte.weight"]
    model.load_state_dict({k: v.contiguous() for k, v in ours.items()}, strict=True)
    return model


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The HF GPT2LMHeadModel state dict carrying this baseline model's weights."""
    cfg = model.config
    check_baseline(cfg)
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"],
           "lm_head.weight": sd["wte.weight"]}
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        out[h + "attn.c_attn.weight"] = torch.cat(
            [sd[f"{b}attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{b}attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")])
        pairs = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "ffn.fc_in",
                 "mlp.c_proj": "ffn.fc_out"}
        for theirs, mine in pairs.items():
            w = sd[b + mine + ".weight"]
            out[h + theirs + ".weight"] = w if theirs.startswith("ln") else w.t()
            out[h + theirs + ".bias"] = sd[b + mine + ".bias"]
    return {k: v.contiguous() for k, v in out.items()}
