"""Attention entropy for any Hugging Face model on fused kernels, and entropy regularization of HF causal LMs.

**Entropy attention.** ``register_entropy_attention()`` adds the attention function ``"privlm_entropy"`` to
transformers' ``AttentionInterface`` (with SDPA's mask builder). Outside ``record_entropy`` it is plain SDPA;
inside, every attention call computes its output and the exact per-query entropy with
``privlm.model.entropy_attention.attention_with_entropy`` (no T x T tensor, differentiable):

    with record_entropy(model) as rec:          # switches the model to "privlm_entropy" for the block
        out = model(input_ids)
    rec.entropy                                 # [L, B, H, T] nats, float32, in the autograd graph

Any model whose attention goes through ``AttentionInterface`` works (GPT-2, LLaMA / Mistral / Qwen with grouped
KV heads repeated per query head, GPT-NeoX, ...). HF attention dropout, if the config has it, applies to the
output as in SDPA; the entropy is that of the softmax itself (before dropout).

**Trainer.** ``EntropyRegularizedTrainer`` trains with CE + lambda * L_ent (Algorithm 1):

    model = AutoModelForCausalLM.from_pretrained(path)      # sdpa by default: switched to privlm_entropy
    trainer = EntropyRegularizedTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                        reg_cfg=RegConfig(enabled=True, lambda_=1e-5, gamma=0.2))
    trainer.train()

A model loaded with ``attn_implementation="eager"`` keeps the official approach instead (``output_attentions``
and the entropy of the returned T x T weights, after attention dropout), for comparisons.

Differences from the official ``usage_example.py``:
  * one threshold vector per layer: theta in R^{L x H} (the example reuses layer 0's thresholds for every
    layer). theta lives in ``model.entropy_regularizer`` so the Trainer puts it in the optimizer (with no
    weight decay), moves it to the device, wraps it in DDP with the model and saves/resumes it with the
    checkpoints; ``save_pretrained`` therefore also writes the key
    ``entropy_regularizer.reg_threshold_weights`` (ignored, with a warning, by a plain ``from_pretrained``).
  * the entropy comes from the fused kernels (memory O(T) per head instead of the T x T weights of every layer).
  * the regularizer's share is divided by the gradient-accumulation steps whenever the Trainer does not do
    so itself (it does not when the CE is already normalized by ``num_items_in_batch``).

Padded query positions are included in the head entropies (a query that sees no key has entropy 0); pack
sequences instead of padding. E_max = log T with T the key length of the batch unless ``context_size`` is given.
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import Trainer

from privlm.config import RegConfig
from privlm.entropy.measure import head_entropy
from privlm.entropy.regularizer import EntropyRegularizer
from privlm.errors import PrivlmError
from privlm.model.attention import nan_count_from_entropy, row_entropy
from privlm.model.entropy_attention import attention_with_entropy

logger = logging.getLogger(__name__)

REG_MODULE = "entropy_regularizer"


class AttentionsUnavailableError(PrivlmError, RuntimeError):
    """The model returned no attention weights, so the entropy regularizer cannot be computed."""


def attentions_to_entropy(attentions) -> torch.Tensor:
    """HF ``outputs.attentions`` (L x [B, H, T, T]) -> per-query entropy [L, B, H, T] in float32."""
    if not attentions or any(a is None for a in attentions):
        raise AttentionsUnavailableError(
            "the model returned no attention weights with output_attentions=True (transformers 5.x does this "
            "for attn_implementation='sdpa'/'flash_attention_2'); load it with attn_implementation='eager'")
    return torch.stack([row_entropy(a.float()) for a in attentions])


ENTROPY_ATTENTION = "privlm_entropy"
_RECORDER: contextvars.ContextVar[Optional["EntropyRecord"]] = contextvars.ContextVar("privlm_entropy_record",
                                                                                      default=None)


class EntropyRecord:
    """Per-query entropies of the attention calls made inside ``record_entropy``, in layer order."""

    def __init__(self) -> None:
        self.by_layer: dict[int, torch.Tensor] = {}

    def add(self, module, entropy: torch.Tensor) -> None:
        layer = getattr(module, "layer_idx", None)
        self.by_layer[len(self.by_layer) if layer is None else int(layer)] = entropy

    @property
    def entropy(self) -> torch.Tensor:
        """[L, B, H, T] per-query entropy in nats (float32), layers in order."""
        if not self.by_layer:
            raise AttentionsUnavailableError("no attention call recorded an entropy: the model does not dispatch "
                                             f"its attention through transformers' AttentionInterface")
        return torch.stack([self.by_layer[l] for l in sorted(self.by_layer)]).float()


def entropy_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                              scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function ``"privlm_entropy"``: SDPA, plus the entropy inside ``record_entropy``.

    query [B, H, T_q, d], key/value [B, H_kv, T_k, d], attention_mask from SDPA's mask builder (boolean
    keep-mask [B, 1, T_q, T_k], or None for plain causal). Returns (output [B, T_q, H, d], None).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    record = _RECORDER.get()
    if record is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise AttentionsUnavailableError(f"{type(module).__name__}: the privlm entropy attention has no logit "
                                         f"soft-capping or position bias; use attn_implementation='eager'")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    T_q, T_k = query.size(-2), key.size(-2)
    mask = attention_mask
    if mask is None and is_causal and T_q != T_k:  # queries are the last T_q positions (a cache before them)
        mask = torch.arange(T_k, device=query.device) <= torch.arange(T_k - T_q, T_k, device=query.device)[:, None]
    causal = mask is None and is_causal
    q = query * scaling
    y, entropy = attention_with_entropy(q, key, value, attn_mask=mask, is_causal=causal)
    if dropout > 0.0 and module.training:  # the output with dropout; the entropy stays that of the softmax
        y = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                           scale=1.0)
    record.add(module, entropy)
    return y.transpose(1, 2).contiguous(), None


def register_entropy_attention() -> str:
    """Register ``"privlm_entropy"`` with transformers' attention and mask interfaces (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ENTROPY_ATTENTION, entropy_attention_forward)
    AttentionMaskInterface.register(ENTROPY_ATTENTION, sdpa_mask)
    return ENTROPY_ATTENTION


def use_entropy_attention(model) -> None:
    """Switch an HF model to ``"privlm_entropy"`` attention (SDPA until ``record_entropy`` asks for entropy)."""
    register_entropy_attention()
    if model.config._attn_implementation == ENTROPY_ATTENTION:
        return
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        raise AttentionsUnavailableError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so "
            f"privlm's fused entropy attention cannot be attached; load it with attn_implementation='eager'")
    model.set_attn_implementation(ENTROPY_ATTENTION)


@contextmanager
def record_entropy(model) -> Iterator[EntropyRecord]:
    """Record the per-query attention entropy [L, B, H, T] of every forward pass in the block through the fused
    kernels (the model is switched to ``"privlm_entropy"`` attention for the block and switched back after)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and model.training and torch.is_grad_enabled():
        # the backward's recomputation runs outside this block: it would not see (or differentiate) the entropy
        raise AttentionsUnavailableError("gradient checkpointing is not supported with privlm's entropy attention "
                                         "(attention is recomputed outside record_entropy); disable it")
    previous = model.config._attn_implementation
    use_entropy_attention(model)
    record = EntropyRecord()
    token = _RECORDER.set(record)
    try:
        yield record
    finally:
        _RECORDER.reset(token)
        if previous != ENTROPY_ATTENTION:
            model.set_attn_implementation(previous)


@torch.no_grad()
def hf_entropy(model, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-query entropy [L, B, H, T], NaN entries of each layer's attention [L]) of a Hugging Face causal
    LM on token ids ``idx`` [B, T], for `privlm.entropy.measure.measure_model`.

    The entropy comes from privlm's fused entropy attention (``record_entropy``: no T x T tensor); the NaN
    count is that of the attention matrix the fused path never forms (T per NaN row, as for privlm models)."""
    with record_entropy(model) as rec:
        model(input_ids=idx, use_cache=False)
    entropy = rec.entropy
    nans = torch.stack([nan_count_from_entropy(layer) for layer in entropy])
    return entropy, nans


def _model_shape(model) -> tuple[int, int]:
    cfg = model.config
    n_layer = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    n_head = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_layer or not n_head:
        raise PrivlmError(f"cannot read the number of layers/heads from {type(cfg).__name__}")
    return int(n_layer), int(n_head)


class EntropyRegularizedTrainer(Trainer):
    """``transformers.Trainer`` whose training loss is CE + lambda * L_entropy (Algorithm 1).

    Extra arguments: ``reg_cfg`` (privlm ``RegConfig``: lambda_, gamma, reduction, theta_init, start/stop
    fractions; ``enabled`` is ignored, using this class is the switch) and ``context_size`` (T of E_max; None =
    the key length of each batch, as the official code infers it). Evaluation uses the plain CE (no
    attentions requested). Training logs gain ``entropy/l_ent``, ``entropy/outside_share``,
    ``entropy/mean_abs_dev``, ``entropy/theta_mean``, ``entropy/theta_std`` and
    ``entropy/layer_{l}`` (mean head entropy per layer), averaged over the steps since the last log.
    The model's attention is switched to ``"privlm_entropy"`` (fused kernels) unless it was loaded with
    ``attn_implementation="eager"``, which keeps the official ``output_attentions`` approach.
    """

    def __init__(self, *args, reg_cfg: Optional[RegConfig] = None, context_size: Optional[int] = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise PrivlmError("EntropyRegularizedTrainer needs a model")
        # eager: the official approach (output_attentions); anything else: the fused entropy attention
        self.explicit_attentions = getattr(model.config, "_attn_implementation", None) == "eager"
        if self.explicit_attentions and getattr(model.config, "attn_pdrop", 0.0):
            logger.warning("attn_pdrop=%s: HF returns attention weights after dropout, so the regularized "
                           "entropies are those of the dropped-out weights (as in the official code); "
                           "set attn_pdrop=0, or use the default fused attention, for the softmax's own entropy",
                           model.config.attn_pdrop)
        if not self.explicit_attentions:
            use_entropy_attention(model)
        self.reg_cfg = reg_cfg or RegConfig(enabled=True)
        self.context_size = context_size
        if not hasattr(model, REG_MODULE):
            n_layer, n_head = _model_shape(model)
            seq_len = context_size or int(getattr(model.config, "n_positions", 0) or 2)
            reg = EntropyRegularizer(n_layer, n_head, seq_len, self.reg_cfg)
            param = next(model.parameters())
            model.add_module(REG_MODULE, reg.to(device=param.device))
        self._entropy_logs: list[torch.Tensor] = []  # per micro-batch: reg.STATS, then each layer's mean entropy
        super().__init__(*args, **kwargs)

    @property
    def regularizer(self) -> EntropyRegularizer:
        return getattr(self.accelerator.unwrap_model(self.model), REG_MODULE)

    def get_decay_parameter_names(self, model) -> list[str]:
        # thresholds are fractions of E_max, not weights to shrink toward zero (docs/DECISIONS.md#the-entropy-regularizer-algorithm-1)
        return [n for n in super().get_decay_parameter_names(model) if REG_MODULE not in n]

    def _progress(self) -> float:
        return self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        if not model.training:  # evaluation: plain CE, no T x T attention tensors kept
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.explicit_attentions:
            loss, outputs = super().compute_loss(model, {**inputs, "output_attentions": True}, True,
                                                 num_items_in_batch)
            entropy = attentions_to_entropy(outputs.attentions)
        else:
            with record_entropy(self.accelerator.unwrap_model(model)) as record:
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            entropy = record.entropy
        reg = self.regularizer
        T = self.context_size or entropy.shape[-1]
        # Algorithm 1's one implementation (privlm's trainer uses it too); theta stays in the graph when off
        term, l_ent = reg.term(entropy, self._progress(), T, keep_in_graph=True)
        if l_ent is not None and self._loss_is_scaled_for_ga(num_items_in_batch):
            term = term / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = loss + term
        # logged statistics stay on the device until the next training log (no host sync per step)
        stats = reg.stats_tensor(entropy, l_ent if l_ent is not None else torch.zeros((), device=entropy.device), T)
        self._entropy_logs.append(torch.cat([stats, head_entropy(entropy.detach()).mean(dim=1).float()]))
        if not return_outputs:
            outputs.attentions = None  # do not keep L x B x H x T x T alive longer than needed
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of Trainer.training_step: when True the Trainer will not divide the loss by the
        accumulation steps, so the regularizer's per-micro-batch term must be divided here."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._entropy_logs:  # a training log: attach the averages since the last one
            means = torch.stack(self._entropy_logs).nanmean(dim=0).tolist()
            n_stats = len(EntropyRegularizer.STATS)
            names = [*EntropyRegularizer.STATS, *(f"layer_{l}" for l in range(len(means) - n_stats))]
            logs.update({f"entropy/{k}": v for k, v in zip(names, means)})
            self._entropy_logs.clear()
        super().log(logs, start_time)
