"""Hugging Face causal LMs as inputs to privlm's diagnostics: `privlm entropy`, `privlm cost`, `privlm inspect`.

A model is named by a local directory written by ``save_pretrained`` or by ``hf:<hub id>`` (resolved in the
local Hugging Face cache first, downloaded only when the hub is reachable and not switched off with
``HF_HUB_OFFLINE=1``). Weights load through ``AutoModelForCausalLM`` from safetensors only (no pickle), never
with ``trust_remote_code``, and with eager attention so the attention probabilities exist for the entropy.

Supported families (``FAMILIES``, keyed by ``config.model_type``) are the ones whose module tree the census
knows: GPT-2, GPT-NeoX (Pythia) and LLaMA, including Qwen2 and Mistral, whose blocks are LLaMA's (RMSNorm,
SwiGLU, rotary embeddings, grouped-query attention). Everything else is a one-line error naming them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from privlm.errors import CheckpointError

HUB_SCHEME = "hf:"
# What a hub snapshot needs for config, weights and tokenizer (no pickled *.bin weights, no remote code).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "tokenizer.model"]


@dataclass(frozen=True)
class HFFamily:
    """Where a family keeps its blocks and their sub-layers (module names relative to the CausalLM)."""

    name: str
    blocks: str  # the ModuleList of decoder blocks
    attn: str  # attention sub-module of a block
    mlp: str  # MLP sub-module of a block


_LLAMA = HFFamily("LLaMA", "model.layers", "self_attn", "mlp")
FAMILIES: dict[str, HFFamily] = {
    "gpt2": HFFamily("GPT-2", "transformer.h", "attn", "mlp"),
    "gpt_neox": HFFamily("GPT-NeoX", "gpt_neox.layers", "attention", "mlp"),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
}


def supported_list() -> str:
    return ", ".join(f"{t} ({f.name})" for t, f in FAMILIES.items())


def is_hf_spec(spec: str) -> bool:
    """``hf:<id>``, or a directory holding a transformers ``config.json`` (and no privlm ``config.yaml``)."""
    if spec.startswith(HUB_SCHEME):
        return True
    path = Path(spec)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def check_model_dir(spec: str) -> None:
    """A directory given where a model is expected must be a privlm run or a Hugging Face model."""
    path = Path(spec)
    from privlm.fileio import check_accessible
    check_accessible(path / "config.json")  # unreadable is "Permission denied: PATH", never "missing"
    if path.is_dir() and not (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(f"'{spec}' is neither a privlm run directory (no config.yaml) nor a Hugging Face "
                              f"model directory (no config.json)")


def _offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def resolve_dir(spec: str, weights: bool = True) -> Path:
    """Local directory of a model spec: the directory itself, or the snapshot of ``hf:<id>`` in the local
    cache (downloaded when missing and the hub is reachable: config and tokenizer, plus the safetensors
    weights when ``weights``; the census and `privlm inspect` need only config.json)."""
    if not spec.startswith(HUB_SCHEME):
        path = Path(spec).expanduser()
        from privlm.fileio import check_accessible
        check_accessible(path / "config.json")
        if not path.is_dir():
            raise CheckpointError(f"'{spec}' is neither a directory nor hf:<hub id>")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"'{spec}' is not a Hugging Face model directory (no config.json) "
                                  f"nor a privlm run (no config.yaml)")
        return path
    repo = spec[len(HUB_SCHEME):]
    if not repo:
        raise CheckpointError("hf: needs a hub id, e.g. hf:EleutherAI/pythia-70m")
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES if weights else [f for f in HUB_FILES if "safetensors" not in f]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached (or a bad id): try the hub below
        cached_error = _first_line(exc)
    if _offline():
        raise CheckpointError(f"Hugging Face model '{repo}' is not in the local cache and HF_HUB_OFFLINE is set "
                              f"({cached_error})")
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo: one line
        raise CheckpointError(f"Hugging Face model '{repo}' is not in the local cache and could not be "
                              f"downloaded: {_first_line(exc)}") from None


def family_of(config) -> HFFamily:
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise CheckpointError(f"unsupported architecture '{getattr(config, 'model_type', '?')}' "
                              f"({', '.join(getattr(config, 'architectures', None) or [])}); "
                              f"supported: {supported_list()}")
    return family


def load_config(spec: str, weights: bool = False):
    """(transformers config, local directory, family) of a model spec; one-line CheckpointError otherwise.
    ``weights``: also fetch the weights of an ``hf:`` model that is not cached yet."""
    path = resolve_dir(spec, weights)
    from privlm.validate import read_json

    raw = read_json(path / "config.json", {})
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise CheckpointError(f"'{path / 'config.json'}' is not a transformers config (no model_type)")
    if raw["model_type"] == "privlm":
        raise CheckpointError(f"'{spec}' is a privlm model exported with export-hf; diagnose and cost its run "
                              f"directory instead")
    if raw["model_type"] not in FAMILIES:
        archs = ", ".join(raw.get("architectures") or [])
        raise CheckpointError(f"unsupported architecture '{raw['model_type']}'{f' ({archs})' if archs else ''}; "
                              f"supported: {supported_list()}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read the config of '{spec}': {_first_line(exc)}") from None
    family = family_of(config)
    check_shape(config, path / "config.json", raw)
    return config, path, family


# The sizes of a transformers config, under shape_of's names, checked against privlm's own bounds.
_SHAPE_KEYS = {"n_layer": "model.n_layer", "n_head": "model.n_head", "n_embd": "model.n_embd",
               "vocab_size": "model.vocab_size", "max_positions": "model.block_size", "ffn_hidden": "model.ffn_hidden"}
_HF_NAMES = {"n_layer": ("num_hidden_layers", "n_layer"), "n_head": ("num_attention_heads", "n_head"),
             "n_embd": ("hidden_size", "n_embd"), "vocab_size": ("vocab_size",),
             "max_positions": ("max_position_embeddings", "n_positions"),
             "ffn_hidden": ("intermediate_size", "n_inner"),
             "n_kv_head": ("num_key_value_heads",), "head_dim": ("head_dim",)}


def check_shape(config, where: Path, raw: Optional[dict] = None) -> None:
    """Every size of the config a positive integer within privlm's bounds (config.UPPER), heads dividing the
    width: a config.json with ``n_head: 0`` or 10^9 layers is one line, not a ZeroDivisionError or a model
    build that never returns."""
    from privlm.config import UPPER

    values = {}
    for short, names in _HF_NAMES.items():
        name = next((n for n in names if (raw or {}).get(n) is not None), None) \
            or next((n for n in names if getattr(config, n, None) is not None), None)
        if name is None:
            continue
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"'{where}' field '{name}' = {value!r} must be a positive integer")
        hi = UPPER.get(_SHAPE_KEYS.get(short, ""), UPPER["model.n_embd"])
        if value > hi:
            raise CheckpointError(f"'{where}' field '{name}' = {value:,} is too large (at most {hi:,})")
        values[short] = (name, value)
    for short in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if short not in values:
            raise CheckpointError(f"'{where}' lacks the model's {short} ({' or '.join(_HF_NAMES[short])})")
    (hn, h), (dn, d) = values["n_head"], values["n_embd"]
    if "head_dim" not in values and d % h:
        raise CheckpointError(f"'{where}' field '{dn}' = {d} is not divisible by '{hn}' = {h}")
    if "n_kv_head" in values and h % values["n_kv_head"][1]:
        raise CheckpointError(f"'{where}' field '{hn}' = {h} is not divisible by 'num_key_value_heads' = "
                              f"{values['n_kv_head'][1]}")


def hf_param_count(config) -> int:
    """A lower estimate of the parameters of a supported config from its sizes alone (attention, a two-matrix
    FFN, the embeddings; gated FFNs and biases make the real count larger)."""
    s = shape_of(config)
    d, L, V = s["n_embd"], s["n_layer"], s["vocab_size"]
    kv = s["n_kv_head"] * s["head_dim"]
    return L * (2 * d * s["n_head"] * s["head_dim"] + 2 * d * kv + 2 * d * s["ffn_hidden"]) \
        + V * d * (1 if s["tied"] else 2)


def build_model(config, device: str | torch.device = "meta"):
    """An (untrained) model of this config with eager attention; on the meta device it allocates nothing,
    which is all the census and `privlm inspect` need."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", trust_remote_code=False)
    return model.eval()


class HFModel(NamedTuple):
    model: Any  # transformers PreTrainedModel (eval mode, eager attention)
    family: HFFamily
    path: Path
    spec: str


def load_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HFModel:
    """Weights of a supported model, in eval mode with eager attention. Missing, mismatched or corrupt weights
    are a CheckpointError: transformers would otherwise initialise them at random with only a warning."""
    config, path, family = load_config(spec, weights=True)
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"'{path}' has no *.safetensors weights (pickled *.bin files are not read: loading "
                              f"them can run code); convert them with save_pretrained(safe_serialization=True)")
    from privlm.validate import check_finite, check_fits, safetensors_header
    check_fits(hf_param_count(config) * torch.finfo(dtype).bits // 8, f"model '{spec}' "
               f"({hf_param_count(config):,}+ parameters)", device)
    for f in sorted(path.glob("*.safetensors")):
        safetensors_header(f)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report below says the same in one line
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, attn_implementation="eager", use_safetensors=True,
            trust_remote_code=False, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - truncated header, bad shapes, unreadable file: one line
        raise CheckpointError(f"cannot load the weights of '{spec}': {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(v) for k in ("missing_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}"
                         for k, v in bad.items())
        raise CheckpointError(f"the weights of '{spec}' do not match its config ({what})")
    check_finite(model.named_parameters(), f"'{spec}'")
    return HFModel(model.to(device=device, dtype=dtype).eval(), family, path, spec)


def tokenizer_spec(path: Path) -> str:
    """What `privlm.data` should load as this model's own tokenizer (its directory)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"'{path}' has no tokenizer (tokenizer.json or tokenizer_config.json); entropy "
                              f"and 2PC accuracy are measured on text tokenized with the model's own tokenizer")
    return str(path)


def text_chunks(hf: "HFModel", T: int, data_source: Optional[str] = None):
    """(T-token chunks [N, T], what they are) of text tokenized with the model's own tokenizer: the validation
    split of a privlm run trained on the standard library, or every document of ``data_source``. Used by
    `privlm entropy` and `privlm pi eval` on Hugging Face models."""
    import numpy as np

    from privlm.config import DataConfig
    from privlm.data import prepare_data
    from privlm.errors import DataError

    if data_source is None:  # the validation split of a privlm run trained on stdlib (split by path hash,
        # so limiting the training part, which is not used, to one document leaves it unchanged)
        dcfg = DataConfig(tokenizer=tokenizer_spec(hf.path), seq_len=T, max_train_docs=1)
        data = prepare_data(dcfg, None)
        chunks, what = data.valid, dcfg.source + " (validation split)"
    else:  # every document of the source: all of it goes to the (unsplit) first part
        dcfg = DataConfig(source=data_source, valid_fraction=0.0, tokenizer=tokenizer_spec(hf.path), seq_len=T)
        data = prepare_data(dcfg, None)
        chunks, what = data.train, data_source
    tok_info = data.manifest["tokenizer"]
    if tok_info.get("eos_added"):  # the separator would be a token id the model never saw
        raise DataError(f"the tokenizer of '{hf.spec}' has no end-of-text token to separate documents (privlm "
                        f"would append {tok_info['eos_token']}); give the directory a tokenizer_config.json naming "
                        f"its eos_token")
    if len(chunks) == 0:
        raise DataError(f"no chunks of T={T} tokens in '{data_source or dcfg.source}'")
    vocab = shape_of(hf.model.config)["vocab_size"]
    if int(np.max(chunks)) >= vocab:  # e.g. a separator the tokenizer lacked and privlm.data appended
        raise DataError(f"token id {int(np.max(chunks))} from the tokenizer of '{hf.spec}' is outside the model's "
                        f"vocabulary of {vocab}")
    return chunks, what


def shape_of(config) -> dict[str, Optional[int]]:
    """Sizes of any supported config under one set of names."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    n_head = get("num_attention_heads", "n_head")
    n_embd = get("hidden_size", "n_embd")
    return {"n_layer": get("num_hidden_layers", "n_layer"), "n_head": n_head,
            "n_kv_head": get("num_key_value_heads") or n_head, "n_embd": n_embd,
            "head_dim": get("head_dim") or n_embd // n_head,
            "ffn_hidden": get("intermediate_size", "n_inner") or 4 * n_embd,
            "vocab_size": get("vocab_size"), "max_positions": get("max_position_embeddings", "n_positions"),
            "tied": bool(getattr(config, "tie_word_embeddings", True))}


def check_length(config, T: int) -> None:
    limit = shape_of(config)["max_positions"]
    if not isinstance(T, int) or T <= 0:
        raise CheckpointError(f"T={T} must be a positive integer")
    if limit is not None and T > limit:
        raise CheckpointError(f"T={T} is longer than the model's {limit} positions")
