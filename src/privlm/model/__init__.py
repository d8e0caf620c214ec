"""privlm.model: the GPT-2 style decoder and every paper variant (see presets.py)."""
from privlm.model.attention import (
    CausalSelfAttention,
    attention_logits,
    attention_path,
    causal_softmax,
    row_entropy,
    scaled_queries,
)
from privlm.model.entropy_attention import attention_with_entropy, fused_entropy_supported
from privlm.model.gpt import GPT, Block, ModelOutput, scaled_ffn_residual
from privlm.model.hooks import ActivationCache, HookPoint, capture

__all__ = ["GPT", "Block", "ModelOutput", "CausalSelfAttention", "ActivationCache", "HookPoint", "capture", "attention_logits",
           "attention_path", "attention_with_entropy", "causal_softmax", "fused_entropy_supported", "row_entropy",
           "scaled_queries", "scaled_ffn_residual", "build_model"]


def build_model(cfg):
    """Build the model for a ModelConfig (or a full Config)."""
    return GPT(getattr(cfg, "model", cfg))
