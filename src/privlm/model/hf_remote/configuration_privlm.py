"""Hugging Face config of a privlm model (written next to an exported checkpoint by `privlm export-hf`).

The privlm ``ModelConfig`` fields are kept whole under ``privlm``; the usual transformers names are set
from them so generation and tooling find the sizes. Loading needs ``trust_remote_code=True`` and the
``privlm`` package installed: the model class is privlm's own (one definition, no copy).
"""
from transformers import PretrainedConfig


class PrivlmConfig(PretrainedConfig):
    model_type = "privlm"

    def __init__(self, privlm=None, **kwargs):
        self.privlm = dict(privlm or {})
        for hf_name, ours in (("vocab_size", "vocab_size"), ("hidden_size", "n_embd"),
                              ("num_hidden_layers", "n_layer"), ("num_attention_heads", "n_head"),
                              ("max_position_embeddings", "block_size")):
            if ours in self.privlm:
                setattr(self, hf_name, self.privlm[ours])
        kwargs.setdefault("tie_word_embeddings", bool(self.privlm.get("tie_embeddings", True)))
        super().__init__(**kwargs)
