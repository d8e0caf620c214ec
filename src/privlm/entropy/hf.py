"""Entropy regularization for any Hugging Face causal LM: ``EntropyRegularizedTrainer``.

    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    trainer = EntropyRegularizedTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                                        reg_cfg=RegConfig(enabled=True, lambda_=1e-5, gamma=0.2))
    trainer.train()

Differences from the official ``usage_example.py`` (SPEC §3.2):
  * one threshold vector per layer: theta in R^{L x H} (the example reuses layer 0's thresholds for every
    layer). theta lives in ``model.entropy_regularizer`` so the Trainer puts it in the optimizer (with no
    weight decay), moves it to the device, wraps it in DDP with the model and saves/resumes it with the
    checkpoints; ``save_pretrained`` therefore also writes the key
    ``entropy_regularizer.reg_threshold_weights`` (ignored, with a warning, by a plain ``from_pretrained``).
  * the models must use ``attn_implementation="eager"``: in transformers 5.x the SDPA/flash paths return no
    attention weights with ``output_attentions=True``; that is an error here, not a silent no-op.
  * the regularizer's share is divided by the gradient-accumulation steps whenever the Trainer does not do
    so itself (it does not when the CE is already normalized by ``num_items_in_batch``).

Caveats shared with the official code: HF returns the attention weights *after* attention dropout, so set
``attn_pdrop=0`` for the entropy of the actual softmax (a warning says so); padded query positions are
included in the head entropies (pack sequences instead of padding). E_max = log T with T the key length of
the batch unless ``context_size`` is given.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import Trainer

from privlm.config import RegConfig
from privlm.entropy.measure import head_entropy
from privlm.entropy.regularizer import EntropyRegularizer
from privlm.errors import PrivlmError
from privlm.model.attention import row_entropy

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


@torch.no_grad()
def hf_entropy(model, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-query entropy [L, B, H, T], NaN entries of each layer's attention [L]) of a Hugging Face causal
    LM on token ids ``idx`` [B, T], for `privlm.entropy.measure.measure_model`.

    The model must run eager attention (``privlm.hfmodel.load_model`` loads it so): the probabilities come
    from ``output_attentions`` and their row entropies from the same ``row_entropy`` privlm's attention uses.
    A fused entropy attention registered with transformers' attention interface replaces this body (and
    the L x [B, H, T, T] tensors it holds) without changing callers."""
    out = model(input_ids=idx, output_attentions=True, use_cache=False)
    entropy = attentions_to_entropy(out.attentions)
    nans = torch.stack([torch.isnan(a).sum() for a in out.attentions])
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
    """

    def __init__(self, *args, reg_cfg: Optional[RegConfig] = None, context_size: Optional[int] = None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise PrivlmError("EntropyRegularizedTrainer needs a model")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "eager"):
            raise AttentionsUnavailableError(
                f"model uses attn_implementation='{impl}', which returns no attention weights in transformers "
                f"5.x; load it with attn_implementation='eager' to train with the entropy regularizer")
        if getattr(model.config, "attn_pdrop", 0.0):
            logger.warning("attn_pdrop=%s: HF returns attention weights after dropout, so the regularized "
                           "entropies are those of the dropped-out weights (as in the official code); "
                           "set attn_pdrop=0 for the softmax's own entropy", model.config.attn_pdrop)
        self.reg_cfg = reg_cfg or RegConfig(enabled=True)
        self.context_size = context_size
        if not hasattr(model, REG_MODULE):
            n_layer, n_head = _model_shape(model)
            seq_len = context_size or int(getattr(model.config, "n_positions", 0) or 2)
            reg = EntropyRegularizer(n_layer, n_head, seq_len, self.reg_cfg)
            param = next(model.parameters())
            model.add_module(REG_MODULE, reg.to(device=param.device))
        self._entropy_logs: dict[str, list[float]] = defaultdict(list)
        super().__init__(*args, **kwargs)

    @property
    def regularizer(self) -> EntropyRegularizer:
        return getattr(self.accelerator.unwrap_model(self.model), REG_MODULE)

    def get_decay_parameter_names(self, model) -> list[str]:
        # thresholds are fractions of E_max, not weights to shrink toward zero (SPEC §3.3)
        return [n for n in super().get_decay_parameter_names(model) if REG_MODULE not in n]

    def _progress(self) -> float:
        return self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        if not model.training:  # evaluation: plain CE, no T x T attention tensors kept
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, {**inputs, "output_attentions": True}, True,
                                             num_items_in_batch)
        entropy = attentions_to_entropy(outputs.attentions)
        reg = self.regularizer
        T = self.context_size or entropy.shape[-1]
        if reg.active(self._progress()):
            l_ent, stats = reg(entropy, T)
            term = reg.lambda_ * l_ent
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                term = term / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + term
        else:
            stats = reg.stats(entropy, None, T)
            stats["l_ent"] = 0.0
            loss = loss + 0.0 * reg.theta.sum()  # keep theta in the graph: DDP errors on unused parameters
        for k, v in stats.items():
            self._entropy_logs[f"entropy/{k}"].append(v)
        for l, v in enumerate(head_entropy(entropy.detach()).mean(dim=1).tolist()):
            self._entropy_logs[f"entropy/layer_{l}"].append(v)
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
            for k, values in self._entropy_logs.items():
                finite = [v for v in values if not math.isnan(v)]
                logs[k] = sum(finite) / len(finite) if finite else float("nan")
            self._entropy_logs.clear()
        super().log(logs, start_time)
