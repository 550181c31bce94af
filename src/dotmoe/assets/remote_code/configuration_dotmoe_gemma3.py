"""DOT-MoE Gemma-3 config (written by `dotmoe export`): the stock Gemma3TextConfig plus the MoE block's keys.

num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size, norm_topk_prob and
hidden_act (= hidden_activation) are read by the Qwen2-MoE sparse block that replaces each Gemma-3 MLP;
dotmoe_gating is `softmax` (stock renormalised top-k weights) or `mask` (each selected expert weight 1).
"""

from transformers import Gemma3TextConfig


class DotMoeConfig(Gemma3TextConfig):
    model_type = "dotmoe_gemma3_moe"
