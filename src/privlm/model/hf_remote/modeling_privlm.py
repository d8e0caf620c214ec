"""Hugging Face causal-LM wrapper around privlm's own ``GPT`` (written next to an exported checkpoint by
`privlm export-hf`; needs the ``privlm`` package installed).

The weights are privlm's state dict under the prefix ``gpt.``; logits are exactly privlm's. No padding:
an ``attention_mask`` with zeros is refused (privlm's attention is causal only).
"""
import torch
import transformers
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_privlm import PrivlmConfig


class PrivlmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PrivlmConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"

    def __init__(self, config: PrivlmConfig):
        super().__init__(config)
        from privlm.config import ModelConfig
        from privlm.model import GPT

        self.gpt = GPT(ModelConfig(**config.privlm))
        if config.tie_word_embeddings:  # privlm's GPT shares the tensor; transformers 5 wants target -> source
            tied = {"gpt.lm_head.weight": "gpt.wte.weight"}
            self._tied_weights_keys = tied if int(transformers.__version__.split(".")[0]) >= 5 else list(tied)
        self.post_init()

    def _init_weights(self, module):
        """privlm's GPT initialises its parameters itself and the checkpoint replaces them. The one state
        outside the checkpoint, a fixed leaky-ReLU slope (a non-persistent buffer), is set from the config
        here: transformers builds the model on the meta device, so it would otherwise be left empty."""
        from privlm.model.ffn import LeakyReLU

        if isinstance(module, LeakyReLU) and "slope" in module._non_persistent_buffers_set:
            device = module.slope.device if module.slope.device.type != "meta" else "cpu"
            module.slope = torch.tensor(float(self.config.privlm["leaky_slope"]), device=device)

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("privlm models attend causally to every position; padding masks are not supported")
        logits = self.gpt(input_ids).logits
        loss = None
        if labels is not None:  # HF convention: labels are the inputs; predict token t+1 from position t
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.max_position_embeddings:]}
