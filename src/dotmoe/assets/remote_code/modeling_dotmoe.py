"""DOT-MoE model (written by `dotmoe export`): stock __BASE_CLASS__ with the paper's `mask` gating.

Each of the k experts a token selects contributes with weight exactly 1 (an unweighted sum), instead of the
stock renormalised softmax weights. Everything else, weights layout included, is the stock model.
"""

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.__BASE__ import modeling___BASE__ as stock

from .configuration_dotmoe import DotMoeConfig

# the checkpoint uses the stock per-expert layout; load it with the stock key conversion
register_checkpoint_conversion_mapping(DotMoeConfig.model_type, get_checkpoint_conversion_mapping("__BASE__"),
                                       overwrite=True)


class DotMoeMaskRouter(stock.__BASE_CLASS__TopKRouter):
    """Stock top-k selection; every selected expert gets gate 1."""

    def forward(self, hidden_states):
        logits, scores, indices = super().forward(hidden_states)
        if getattr(self, "dotmoe_gating", "mask") == "mask":
            scores = torch.ones_like(scores)
        return logits, scores, indices


class DotMoeForCausalLM(stock.__BASE_CLASS__ForCausalLM):
    config_class = DotMoeConfig

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # the experts are stock transformers modules (decorated with @use_experts_implementation), but transformers
        # decides this by reading the source file of the model class, i.e. this one
        return True

    def __init__(self, config):
        super().__init__(config)
        for name, module in list(self.named_modules()):
            if type(module) is stock.__BASE_CLASS__TopKRouter:
                router = DotMoeMaskRouter(config)
                router.dotmoe_gating = getattr(config, "dotmoe_gating", "mask")
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent), child, router)
        self.post_init()
