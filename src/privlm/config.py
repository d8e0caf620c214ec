"""Typed configuration: dataclasses per section, YAML files and hydra-style ``key=value`` overrides.

Resolution order (later wins): dataclass defaults -> preset (``model.preset``) -> YAML file -> overrides.
Every error is a :class:`ConfigError` whose message is one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from privlm.errors import ConfigError
from privlm.presets import preset_fields


# Allowed values of the string-valued fields; checked in `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm": ("layernorm", "none"),
    "model.activation": ("gelu", "gelu_erf", "relu", "leaky_relu", "identity"),
    "model.leaky_slope_learnable": ("none", "layer", "global"),
    "model.ffn": ("standard", "fused"),
    "model.weight_norm": ("none", "qk", "ffn", "qk+ffn", "qkv+ffn", "qkvo+ffn"),
    "model.spectral_norm": ("none", "qk", "ffn", "qk+ffn", "qkv+ffn", "qkvo+ffn"),
    "model.temperature_param": ("offset", "log", "direct"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.dtype": ("auto", "float32", "bfloat16", "float16"),
    "reg.reduction": ("paper", "released_code"),
    "data.chunking": ("concat", "document"),
    "data.filters": ("auto", "codeparrot", "none"),
}


@dataclass
class ModelConfig:
    """GPT-2 style decoder. Defaults are GPT-2 small with the paper's baseline block (SM+LN+G)."""

    preset: str = "SM+LN+G"  # paper name; its fields are applied before the YAML and overrides
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # size of the learned position table (largest usable T)
    ffn_hidden: Optional[int] = None  # hidden width of the two-matrix FFN; None = 4 * n_embd
    # --- what the preset names change -------------------------------------------------
    norm: str = "layernorm"  # LN1/LN2 of every block ("none" = identity, as in the LN-free variants)
    ln_f: bool = True  # final LayerNorm before the LM head (docs/DECISIONS.md#final-layernorm-ln_f)
    activation: str = "gelu"  # "gelu" is GPT-2's tanh approximation (HF "gelu_new")
    leaky_slope: float = 0.01  # negative slope of leaky ReLU (initial value when learnable)
    leaky_slope_learnable: str = "none"  # ReLU's Revival: one slope per layer or one global slope
    ffn: str = "standard"  # "standard" d->h->d, or "fused" single d x d linear (Eq. 8 models)
    ffn_scaling: bool = False  # Eq. 8: learnable beta (FFN skip) and 1/alpha (FFN output) per layer
    alpha_init: float = 1.0
    beta_init: float = 1.0
    ffn_prune_deepest: int = 0  # AERO's ^iK: drop the FFN of the K deepest blocks
    ffn_keep_layers: Optional[list[int]] = None  # explicit list of blocks that keep their FFN (wins)
    weight_norm: str = "none"  # placement of torch weight_norm (Salimans & Kingma)
    spectral_norm: str = "none"  # placement of torch spectral_norm (Miyato et al.)
    attn_temperature: bool = False  # SM(t): learnable t in R^{H x T} per layer dividing the logits
    temperature_param: str = "offset"  # t = 1 + p | t = exp(p) | t = p  (see docs/ARCHITECTURE.md)
    temperature_init: float = 1e-2  # initial value of p (so t = 1.01 with the default "offset")
    temperature_min: float = 1e-3  # t is clamped below at this value ("offset" and "direct")
    # --- generic GPT-2 knobs ------------------------------------------------------------
    bias: bool = True
    init_std: float = 0.02
    residual_scaling: bool = False  # GPT-2's 1/sqrt(2L) init of the residual projections
    layer_norm_eps: float = 1e-5
    embd_dropout: float = 0.0
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.n_embd

    def ffn_layers(self) -> list[int]:
        """Indices of the blocks that keep an FFN (AERO pruning removes the deeper ones)."""
        if self.ffn_keep_layers is not None:
            return sorted(self.ffn_keep_layers)
        return list(range(self.n_layer - self.ffn_prune_deepest))


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" | "hf:<dataset id>" | "files:<glob>"
    valid_source: Optional[str] = None  # separate validation source (e.g. hf:...-valid); None = split by file hash
    text_field: str = "content"
    train_split: str = "train"
    valid_split: str = "train"
    streaming: bool = False
    shuffle_seed: int = 0
    max_train_docs: Optional[int] = None
    max_valid_docs: Optional[int] = None
    valid_fraction: float = 0.05
    # Held-out split for choosing settings (lambda, gamma, theta init...) apart from the reported validation
    # split: a file goes there iff sha256("privlm-heldout:" + key) falls below this fraction; it is carved
    # from the training documents only (valid unchanged, train and heldout disjoint). 0 = no held-out split,
    # and then the corpus, tokenizer and tokens are exactly those built without this field.
    heldout_fraction: float = 0.0
    tokenizer: str = "bpe"  # "bpe" = train a byte-level BPE on the train split; else tokenizer.json or hub name
    vocab_size: int = 8192
    seq_len: int = 128  # T: training chunk length
    chunking: str = "concat"  # "concat": EOS-joined stream cut into T chunks; "document": per file (paper run_clm)
    filters: str = "auto"  # codeparrot-clean filters: "auto" = stdlib and .py files only; "codeparrot"; "none"
    cache_dir: Optional[str] = None  # None = $PRIVLM_CACHE or ~/.cache/privlm


@dataclass
class TrainConfig:
    """AdamW + warmup/decay schedule (docs/DECISIONS.md#training-recipe). Global batch = processes x batch_size x grad_accum sequences."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # end of the linear / cosine decay
    weight_decay: float = 0.1  # matrices only (GPT.optimizer_groups)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 = none (Languini)
    warmup_frac: float = 0.05  # linear warmup over this fraction of max_steps
    schedule: str = "linear"
    eval_every: int = 200  # steps between validation PPL evaluations (also at the end)
    eval_max_batches: Optional[int] = None  # None = whole validation split
    # batches of the evaluations before the last step and of the checkpoints' validation loss: the first N of
    # the split, a fixed slice (None = eval_max_batches); the last step's evaluation uses eval_max_batches
    eval_curve_batches: Optional[int] = None
    # observer cadences: together well under 2 % of a step (docs/DECISIONS.md#observer-cadences)
    log_every: int = 10  # steps per metrics.jsonl "train" record (loss averaged over the interval)
    entropy_every: int = 50  # steps between forward passes with in-attention entropy telemetry
    save_every: int = 200  # steps between checkpoints (and at the end)
    flight_steps: int = 64  # divergence flight recorder: recorded steps kept in memory (0 = off)
    flight_every: int = 16  # record every N-th step (and the first); flight_steps x this = the window in steps
    seed: int = 1337  # init, data order and dropout
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on CUDA (fp16 if unsupported), fp32 on CPU
    compile: bool = False  # torch.compile the model
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU (bit-exact resume)


@dataclass
class RegConfig:
    """Entropy regularizer (Algorithm 1)."""

    enabled: bool = False
    lambda_: float = 1e-5  # CodeParrot value; with reduction=released_code it multiplies a sum over B*T
    gamma: float = 0.2  # tolerance margin = gamma * log T (the paper's adopted value)
    reduction: str = "paper"  # paper: penalize the batch head entropy | released_code: per query, summed
    # Initial theta (threshold = theta * log T). The paper does not give it (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1). 0.5 puts the
    # initial band at [0.3, 0.7] * log T for gamma=0.2: it excludes near-uniform heads (uniform causal
    # attention is 0.80 log T at T=128, 0.84 at T=512: entropic overload) and near-zero heads (collapse),
    # and it sits at the top of the learned range 0.20-0.52 of Fig. 6a (theta only moves while a head is
    # outside its band, toward that head's entropy, so the init decides where the bands start).
    theta_init: float = 0.5
    start_frac: float = 0.0  # regularizer on for start_frac <= step/max_steps < stop_frac
    stop_frac: float = 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reg: RegConfig = field(default_factory=RegConfig)


# ----------------------------------------------------------------------------------------
def _check_keys(raw: dict, cls, prefix: str = "") -> None:
    """Reject unknown keys with the list of known ones (OmegaConf's own message is multi-line)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{dotted}'; known keys under '{prefix or '<root>'}': "
                              f"{', '.join(sorted(known))}")
        sub = known[key].type
        sub_cls = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "TrainConfig": TrainConfig,
                   "RegConfig": RegConfig}.get(sub if isinstance(sub, str) else getattr(sub, "__name__", ""))
        if sub_cls is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; set its fields as {dotted}.<field>=...")
            _check_keys(value, sub_cls, dotted + ".")


def _parse_overrides(overrides: list[str]) -> dict:
    dotlist = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.max_steps=50)")
        dotlist.append(item)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(exc).splitlines()[0]}") from None


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    from privlm.validate import check_yaml
    check_yaml(path)  # size, nesting and alias expansion bounded before OmegaConf builds anything
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml errors are not OmegaConf errors
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must contain a mapping of sections (model/data/train/reg)")
    return loaded


def _merge(base, raw: dict, origin: str):
    try:
        return OmegaConf.merge(base, raw)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: bad value for '{key}': {msg}") from None


def looks_like_config_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.path.sep in spec and Path(spec).suffix in (".yaml", ".yml")


def is_override(arg: str) -> bool:
    """Whether a command-line word is a ``key=value`` override. An existing path wins: the sweep's own run
    directories are called e.g. ``...-lr=0.001``, and a config file may have ``=`` in its name."""
    key = arg.split("=", 1)[0]
    return ("=" in arg and not arg.startswith("-") and "/" not in key and not looks_like_config_file(arg)
            and not Path(arg).expanduser().exists())


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line words -> (presets / config files / run directories, ``key=value`` overrides), in order."""
    return [a for a in args if not is_override(a)], [a for a in args if is_override(a)]


def split_spec(spec: Optional[str], overrides: list[str]) -> tuple[Optional[str], list[str]]:
    """`privlm CMD [SPEC] [key=value ...]` -> (spec or None for the default preset, overrides): the one
    positional SPEC may itself be an override (then the default preset is meant)."""
    if spec and is_override(spec):
        return None, [spec] + list(overrides)
    return spec, list(overrides)


def load_config(spec: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML path plus ``key=value`` overrides."""
    overrides = list(overrides or [])
    file_raw: dict = {}
    preset_name: Optional[str] = None
    if spec:
        if looks_like_config_file(spec):
            file_raw = _load_yaml(Path(spec))
        elif os.path.sep in spec:  # a path, not a preset name
            raise ConfigError(f"'{spec}' does not exist (expected a preset name, a .yaml config or a run directory)")
        else:
            preset_name = spec
    over_raw = _parse_overrides(overrides)
    _check_keys(file_raw, Config)
    _check_keys(over_raw, Config)

    for raw in (file_raw, over_raw):  # the most specific mention of the preset wins
        name = raw.get("model", {}).get("preset") if isinstance(raw.get("model"), dict) else None
        if name is not None:
            preset_name = name
    preset_name = preset_name or ModelConfig.preset
    model_fields, extra = preset_fields(preset_name)

    base = OmegaConf.structured(Config)
    base = _merge(base, {"model": {**model_fields, "preset": preset_name}, **extra}, f"preset '{preset_name}'")
    if file_raw:
        base = _merge(base, file_raw, f"config file '{spec}'")
    if over_raw:
        base = _merge(base, over_raw, "override")
    cfg: Config = OmegaConf.to_object(base)
    cfg.model.preset = preset_name
    validate(cfg)
    return cfg


# What `privlm train --resume RUN key=value` may change: the optimizer's hyperparameters, the schedule, the
# cadences and the device. Anything else (model, data, batch shape, seed, regularizer set-up) would make the
# continued run a different run than its checkpoint and data order describe.
RESUME_OVERRIDABLE = frozenset({
    "train.max_steps", "train.lr", "train.min_lr", "train.weight_decay", "train.beta1", "train.beta2",
    "train.eps", "train.grad_clip", "train.warmup_frac", "train.schedule", "train.eval_every",
    "train.eval_max_batches", "train.log_every", "train.entropy_every", "train.save_every", "train.device",
    "train.dtype", "train.compile", "reg.lambda_", "reg.gamma", "reg.start_frac", "reg.stop_frac"})


def config_changes(old: Config, new: Config) -> dict[str, list]:
    """{dotted key: [old value, new value]} for every field that differs."""
    a, b = to_dict(old), to_dict(new)
    return {f"{sec}.{key}": [a[sec][key], b[sec][key]] for sec in a for key in a[sec] if a[sec][key] != b[sec][key]}


def apply_overrides(cfg: Config, overrides: list[str], origin: str = "override") -> Config:
    """A resolved Config (e.g. a run's saved one) with ``key=value`` overrides applied and re-validated;
    the preset is not re-applied."""
    if not overrides:
        return cfg
    raw = _parse_overrides(overrides)
    _check_keys(raw, Config)
    out: Config = OmegaConf.to_object(_merge(OmegaConf.structured(cfg), raw, origin))
    validate(out)
    return out


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# Upper bounds of the numeric fields: far above any model or run privlm can train or cost, low enough that a
# typo (model.n_layer=1000000000) fails here in one line instead of in a loop building modules, in the
# allocator or in an integer overflow. Memory is checked separately before allocation (privlm.validate).
UPPER: dict[str, int | float] = {
    "model.n_layer": 4096, "model.n_head": 4096, "model.n_embd": 2**17, "model.vocab_size": 2**22,
    "model.block_size": 2**20, "model.ffn_hidden": 2**20, "model.ffn_prune_deepest": 4096,
    "data.seq_len": 2**20, "data.vocab_size": 2**22, "data.shuffle_seed": 2**63 - 1,
    "data.max_train_docs": 2**62, "data.max_valid_docs": 2**62,
    "train.max_steps": 2**40, "train.batch_size": 2**16, "train.grad_accum": 2**16, "train.eval_every": 2**40,
    "train.eval_max_batches": 2**40, "train.log_every": 2**40, "train.entropy_every": 2**40,
    "train.save_every": 2**40, "train.flight_steps": 2**20, "train.flight_every": 2**40,
    "train.seed": 2**63 - 1, "model.init_std": 1e3, "model.alpha_init": 1e6, "model.beta_init": 1e6,
    "model.leaky_slope": 1e3, "model.temperature_init": 1e6, "model.temperature_min": 1e6, "train.lr": 1e9,
    "train.grad_clip": 1e9, "reg.lambda_": 1e9}
UPPER_WHY = {"model": "far beyond any model privlm can build", "data": "far beyond any data privlm can build",
             "train": "far beyond any run privlm can train", "reg": "far beyond any useful setting"}


def validate(cfg: Config) -> None:
    """Check choices and impossible combinations; raise ConfigError naming the first bad key."""
    _check_finite(cfg)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' is not allowed; choose one of: {', '.join(allowed)}")
    m, d, t, r = cfg.model, cfg.data, cfg.train, cfg.reg
    positive = {"model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
                "model.vocab_size": m.vocab_size, "model.block_size": m.block_size, "data.seq_len": d.seq_len,
                "data.vocab_size": d.vocab_size, "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum, "train.max_steps": t.max_steps}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer")
    for key, hi in UPPER.items():
        value = _get(cfg, key)
        if value is not None and value > hi:
            raise ConfigError(f"{key}={value} is too large (at most {hi:,}: {UPPER_WHY[key.split('.')[0]]})")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
                          f"allowed n_head values divide {m.n_embd}")
    if m.ffn_hidden is not None and m.ffn_hidden <= 0:
        raise ConfigError(f"model.ffn_hidden={m.ffn_hidden} must be positive (or null for 4*n_embd)")
    if d.seq_len > m.block_size:
        raise ConfigError(f"data.seq_len={d.seq_len} is larger than the position table "
                          f"model.block_size={m.block_size}; use data.seq_len<={m.block_size}")
    if m.activation != "leaky_relu" and m.leaky_slope_learnable != "none":
        raise ConfigError(f"model.leaky_slope_learnable='{m.leaky_slope_learnable}' needs "
                          f"model.activation=leaky_relu (got '{m.activation}')")
    if m.ffn == "fused" and m.activation != "identity":
        raise ConfigError(f"model.ffn=fused is a single linear map and needs model.activation=identity "
                          f"(got '{m.activation}')")
    if not (0 <= m.ffn_prune_deepest <= m.n_layer):
        raise ConfigError(f"model.ffn_prune_deepest={m.ffn_prune_deepest} must be in 0..model.n_layer={m.n_layer}")
    if m.ffn_keep_layers is not None:
        bad = [i for i in m.ffn_keep_layers if not 0 <= i < m.n_layer]
        if bad:
            raise ConfigError(f"model.ffn_keep_layers has layers {bad} outside 0..{m.n_layer - 1}")
    if m.weight_norm != "none" and m.spectral_norm != "none":
        raise ConfigError("model.weight_norm and model.spectral_norm are both set; choose one (the other = none)")
    if not m.attn_temperature and m.temperature_init != ModelConfig.temperature_init:
        raise ConfigError(f"model.temperature_init is set but preset '{m.preset}' has no attention temperature; "
                          f"use an SM(t) preset or model.attn_temperature=true")
    if m.temperature_param == "direct" and m.attn_temperature and m.temperature_init <= 0:
        raise ConfigError(f"model.temperature_init={m.temperature_init} must be > 0 with temperature_param=direct")
    if m.alpha_init == 0:
        raise ConfigError("model.alpha_init=0 would divide the FFN output by zero (Eq. 8 uses 1/alpha)")
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction={d.valid_fraction} must be in [0, 1)")
    if not 0.0 <= d.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={d.heldout_fraction} must be in [0, 1)")
    if not (d.source == "stdlib" or d.source.startswith(("hf:", "files:"))):
        raise ConfigError(f"data.source='{d.source}' is not allowed; use stdlib, hf:<dataset id> or files:<glob>")
    if d.valid_source is not None and not (d.valid_source == "stdlib" or d.valid_source.startswith(("hf:", "files:"))):
        raise ConfigError(f"data.valid_source='{d.valid_source}' is not allowed; use null, stdlib, hf:<dataset id> "
                          f"or files:<glob>")
    if d.tokenizer == "bpe" and d.vocab_size < 257:
        raise ConfigError(f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE (256 bytes + "
                          f"<|endoftext|>); use at least 257")
    for key, value in (("data.max_train_docs", d.max_train_docs), ("data.max_valid_docs", d.max_valid_docs)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer (or null for all documents)")
    if not 0.0 <= t.warmup_frac < 1.0:
        raise ConfigError(f"train.warmup_frac={t.warmup_frac} must be in [0, 1)")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if t.flight_steps < 0:
        raise ConfigError(f"train.flight_steps={t.flight_steps} must be >= 0 (0 turns the flight recorder off)")
    for key in ("eval_every", "log_every", "entropy_every", "save_every", "flight_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be a positive number of steps")
    if t.eval_max_batches is not None and t.eval_max_batches <= 0:
        raise ConfigError(f"train.eval_max_batches={t.eval_max_batches} must be positive (or null for the whole split)")
    if t.eval_curve_batches is not None and t.eval_curve_batches <= 0:
        raise ConfigError(f"train.eval_curve_batches={t.eval_curve_batches} must be positive (or null for "
                          f"train.eval_max_batches)")
    if not 0.0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.eps <= 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} and train.grad_clip={t.grad_clip} must be >= 0 "
                          f"and train.eps={t.eps} > 0")
    if not (0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0):
        raise ConfigError(f"train.beta1={t.beta1} and train.beta2={t.beta2} must be in [0, 1)")
    if r.gamma < 0 or r.lambda_ < 0:
        raise ConfigError(f"reg.gamma={r.gamma} and reg.lambda_={r.lambda_} must be >= 0")
    if t.seed < 0 or d.shuffle_seed < 0:
        raise ConfigError(f"train.seed={t.seed} and data.shuffle_seed={d.shuffle_seed} must be >= 0")
    if m.init_std < 0 or m.layer_norm_eps <= 0 or not 0.0 <= m.embd_dropout < 1.0:
        raise ConfigError(f"model.init_std={m.init_std} must be >= 0, model.layer_norm_eps={m.layer_norm_eps} "
                          f"> 0 and model.embd_dropout={m.embd_dropout} in [0, 1)")
    if m.temperature_min <= 0:
        raise ConfigError(f"model.temperature_min={m.temperature_min} must be > 0")
    if not 0.0 <= r.theta_init <= 1.0:
        raise ConfigError(f"reg.theta_init={r.theta_init} must be in [0, 1] (a fraction of E_max = log T)")
    if not 0.0 <= r.start_frac <= r.stop_frac <= 1.0:
        raise ConfigError(f"reg.start_frac={r.start_frac} and reg.stop_frac={r.stop_frac} must satisfy "
                          f"0 <= start_frac <= stop_frac <= 1")


def _check_finite(cfg: Config) -> None:
    """No numeric field may be NaN or infinite (a NaN passes every `<`/`>` test, so the range checks
    below would otherwise accept it or blame another key)."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}={value} must be a finite number")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict) -> Config:
    """Rebuild a Config saved by `to_yaml`/`to_dict` (preset already applied, so it is not re-applied)."""
    _check_keys(raw, Config)
    cfg: Config = OmegaConf.to_object(_merge(OmegaConf.structured(Config), raw, "saved config"))
    validate(cfg)
    return cfg
