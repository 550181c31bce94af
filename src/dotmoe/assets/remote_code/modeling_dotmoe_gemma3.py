"""DOT-MoE Gemma-3 model (written by `dotmoe export`): stock Gemma3ForCausalLM whose MLPs are MoE blocks.

Everything but the feed-forward is the stock Gemma-3 (GeGLU tanh, (1 + w) sandwich RMSNorms, sqrt(d) embedding
scale, alternating sliding-window / global attention). Each decoder layer's `mlp` is transformers' stock
Qwen2-MoE sparse block run with Gemma's activation: softmax top-k router, experts, an always-on shared expert
behind a sigmoid gate (a zero gate, so 1/2, with the factor 2 folded into its down projection; size 0 when
there is none). It sits between Gemma's `pre_feedforward_layernorm` and `post_feedforward_layernorm`, where the
dense MLP was. With `dotmoe_gating = "mask"` each selected expert gets weight exactly 1.
No stock transformers class computes this function (see the dotmoe README, Export).
"""

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.gemma3 import modeling_gemma3 as gemma3
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe

from .configuration_dotmoe import DotMoeConfig

# per-expert checkpoint layout, fused on load exactly as for stock Qwen2-MoE
register_checkpoint_conversion_mapping(DotMoeConfig.model_type, get_checkpoint_conversion_mapping("qwen2_moe"),
                                       overwrite=True)


class DotMoeMaskTopKRouter(qwen2_moe.Qwen2MoeTopKRouter):
    """Stock top-k selection; every selected expert gets gate 1."""

    def forward(self, hidden_states):
        logits, scores, indices = super().forward(hidden_states)
        return logits, torch.ones_like(scores), indices


class DotMoeGemma3TextModel(gemma3.Gemma3TextModel):
    """Stock Gemma-3 decoder whose MLPs are stock Qwen2-MoE sparse blocks."""

    config_class = DotMoeConfig

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # the experts are stock transformers modules (decorated with @use_experts_implementation), but transformers
        # decides this by reading the source file of the model class, i.e. this one
        return True

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.mlp = qwen2_moe.Qwen2MoeSparseMoeBlock(config)
            if getattr(config, "dotmoe_gating", "softmax") == "mask":
                layer.mlp.gate = DotMoeMaskTopKRouter(config)
        self.post_init()


class DotMoeForCausalLM(gemma3.Gemma3ForCausalLM):
    config_class = DotMoeConfig
    _can_set_experts_implementation = DotMoeGemma3TextModel._can_set_experts_implementation

    def __init__(self, config):
        # Gemma3ForCausalLM.__init__ with the MoE decoder (the stock one builds a Gemma3TextModel, which refuses the
        # experts implementation the config carries)
        gemma3.Gemma3PreTrainedModel.__init__(self, config)
        self.model = DotMoeGemma3TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
