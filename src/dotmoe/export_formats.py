"""Which stock MoE architecture a dense model maps to, its config, and its checkpoint key names.

    llama / mistral -> MixtralForCausalLM      (no shared expert)
    qwen3           -> Qwen3MoeForCausalLM     (norm_topk_prob, no shared expert)
    qwen2           -> Qwen2MoeForCausalLM     (shared expert, or size 0 with a zero gate)
    llama / mistral with a shared expert -> Qwen2MoeForCausalLM with qkv_bias=False (same math)
    gemma3_text     -> DotMoeForCausalLM: stock Gemma3ForCausalLM with stock Qwen2-MoE sparse blocks as MLPs
                       (custom class, always: no stock class computes Gemma-3 with routed experts)

`mask` gating with k > 1 has no stock equivalent: it is exported exactly as `dotmoe`, a thin subclass of the
stock class above shipped with the checkpoint (trust_remote_code), or approximately in the stock format.
Weights are written in the per-expert layout (`experts.{j}.w1` / `experts.{j}.gate_proj`) that vLLM,
llama.cpp's converter and transformers (which fuses it on load) all read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dotmoe.errors import DotMoeError

# dense config keys that mean nothing (or something else) in the MoE config
_DROP_KEYS = ("architectures", "model_type", "intermediate_size", "mlp_bias", "pretraining_tp", "auto_map",
              "transformers_version", "_name_or_path")


def _mixtral_keys(cfg: dict, dense: dict, experts: int, top_k: int, expert_size: int, shared: int) -> None:
    cfg.update(num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=expert_size,
               router_jitter_noise=0.0, output_router_logits=False)
    cfg.setdefault("sliding_window", None)


def _qwen3_moe_keys(cfg: dict, dense: dict, experts: int, top_k: int, expert_size: int, shared: int) -> None:
    cfg.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
               intermediate_size=expert_size, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               output_router_logits=False)


def _qwen2_moe_keys(cfg: dict, dense: dict, experts: int, top_k: int, expert_size: int, shared: int) -> None:
    _qwen3_moe_keys(cfg, dense, experts, top_k, expert_size, shared)
    cfg.update(shared_expert_intermediate_size=shared, qkv_bias=dense.get("model_type") == "qwen2",
               use_sliding_window=dense.get("use_sliding_window", False))
    cfg.pop("head_dim", None)
    cfg.pop("attention_bias", None)


def _gemma3_moe_keys(cfg: dict, dense: dict, experts: int, top_k: int, expert_size: int, shared: int) -> None:
    cfg.update(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_size,
               intermediate_size=expert_size, shared_expert_intermediate_size=shared, norm_topk_prob=True,
               hidden_act=dense.get("hidden_activation", "gelu_pytorch_tanh"), output_router_logits=False)


@dataclass(frozen=True)
class ExportTarget:
    """One MoE architecture a conversion is written as (a row of `TARGETS`, like mergekit's output architectures):
    its stock class, whether its blocks hold a shared expert, the keys its config adds, its weight names."""

    name: str
    stock_class: str | None  # None: no stock class computes it (always written as the custom class)
    class_prefix: str | None  # of the stock classes the custom class's template subclasses (None: own files)
    shared_expert: bool  # its MoE block has a (possibly size-0) sigmoid-gated shared expert
    add_config_keys: Callable[..., None]  # (cfg, dense, experts, top_k, expert_size, shared): the MoE keys
    block: str | None = None  # the MoE block's module name beside the MLP's (None: the MLP module itself)
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # a tied LM head is written as its own tensor (tie_word_embeddings false): llama.cpp's qwen2moe loader requires
    # output.weight (vendor/llama.cpp/src/models/qwen2moe.cpp in llama-cpp-python 0.3.36), unlike its llama,
    # qwen2 and qwen3moe loaders, which fall back to the token embedding
    unties_lm_head: bool = False

    def _root(self, prefix: str) -> str:
        return prefix if self.block is None else f"{prefix.rsplit('.', 1)[0]}.{self.block}"

    def expert_keys(self, prefix: str, expert: int) -> tuple[str, str, str]:
        """Checkpoint names of (gate, up, down) of routed expert `expert` under the MLP module `prefix`."""
        root = self._root(prefix)
        return tuple(f"{root}.experts.{expert}.{w}.weight" for w in self.expert_weights)

    def router_key(self, prefix: str) -> str:
        return f"{self._root(prefix)}.gate.weight"


TARGETS = {t.name: t for t in (
    ExportTarget("mixtral", "MixtralForCausalLM", "Mixtral", False, _mixtral_keys, block="block_sparse_moe",
                 expert_weights=("w1", "w3", "w2")),
    ExportTarget("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3Moe", False, _qwen3_moe_keys),
    ExportTarget("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2Moe", True, _qwen2_moe_keys, unties_lm_head=True),
    ExportTarget("gemma3_moe", None, None, True, _gemma3_moe_keys),
)}
FORMATS = ("auto", *(name for name, t in TARGETS.items() if t.stock_class), "dotmoe")


@dataclass(frozen=True)
class ExportPlan:
    """What will be written: the target architecture, whether the custom class wraps it, and why."""

    base: str  # a TARGETS name
    custom: bool  # write the exact `dotmoe` class (mask gating, k > 1)
    exact: bool  # the written model computes exactly the training-time sparse forward
    note: str = ""

    @property
    def target(self) -> ExportTarget:
        return TARGETS[self.base]

    @property
    def architecture(self) -> str:
        return "DotMoeForCausalLM" if self.custom else self.target.stock_class


GEMMA3_NO_STOCK = ("no stock transformers class computes Gemma-3 with routed experts: exact custom class "
                   "(stock Gemma3ForCausalLM + stock Qwen2-MoE sparse blocks, trust_remote_code)")


def _base_for(dense: dict, shared: int) -> str:
    model_type = dense.get("model_type")
    if model_type == "gemma3_text":
        if dense.get("final_logit_softcapping") is not None:
            raise DotMoeError("Gemma-3 with final_logit_softcapping is not supported (the training loss computes "
                              "logits without it)")
        return "gemma3_moe"
    if model_type in ("llama", "mistral"):
        if dense.get("attention_bias") or dense.get("mlp_bias"):
            raise DotMoeError(f"{model_type} with attention_bias/mlp_bias has no stock MoE equivalent "
                              "(Mixtral has no biases)")
        if shared:
            if dense.get("sliding_window") is not None and model_type == "mistral":
                raise DotMoeError("a shared expert needs the Qwen2-MoE format, which cannot express Mistral's "
                                  "sliding window on every layer; convert without --shared")
            head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
            if head_dim * dense["num_attention_heads"] != dense["hidden_size"]:
                raise DotMoeError("a shared expert needs the Qwen2-MoE format, which requires head_dim = "
                                  "hidden_size / num_attention_heads; convert without --shared")
            return "qwen2_moe"
        return "mixtral"
    if model_type == "qwen3":
        if shared:
            raise DotMoeError("Qwen3-MoE has no shared expert; convert a Qwen3 model without --shared")
        return "qwen3_moe"
    if model_type == "qwen2":
        return "qwen2_moe"
    raise DotMoeError(f"no MoE export for model_type {model_type!r} (supported: llama, mistral, qwen2, qwen3, "
                      "gemma3_text)")


def plan_export(dense: dict, fmt: str, shared: int, gating: str, top_k: int) -> ExportPlan:
    """Pick the target of `dotmoe export --format fmt` for a dense config and a conversion's routing."""
    if fmt not in FORMATS:
        raise DotMoeError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    base = _base_for(dense, shared)
    if base == "gemma3_moe":
        if fmt not in ("auto", "dotmoe"):
            raise DotMoeError(f"a Gemma-3 model exports only as 'dotmoe' (custom class), not {fmt!r}: "
                              f"{GEMMA3_NO_STOCK}")
        return ExportPlan(base, True, True, GEMMA3_NO_STOCK)
    stock_exact = gating == "softmax" or top_k == 1
    if fmt in ("auto", "dotmoe"):
        custom = fmt == "dotmoe" or not stock_exact
        note = "mask gating with k>1 has no stock equivalent: exact custom class (trust_remote_code)" \
            if custom and not stock_exact else ""
        return ExportPlan(base, custom, True, note)
    if fmt != base:
        raise DotMoeError(f"a {dense.get('model_type')} model{' with a shared expert' if shared else ''} "
                          f"exports to {base!r}, not {fmt!r}")
    note = "" if stock_exact else ("APPROXIMATION: mask gating (weight 1 per selected expert) written as stock "
                                   "renormalised top-k weights times k")
    return ExportPlan(base, False, stock_exact, note)


def moe_config(dense: dict, plan: ExportPlan, *, experts: int, top_k: int, expert_size: int, shared: int,
               gating: str, dtype: str) -> dict:
    """config.json of the exported model (dense settings carried over, the target's MoE keys added)."""
    cfg = {k: v for k, v in dense.items() if k not in _DROP_KEYS}
    plan.target.add_config_keys(cfg, dense, experts, top_k, expert_size, shared)
    cfg["dtype"] = dtype
    if plan.custom:
        cfg.update(model_type=f"dotmoe_{plan.base}", dotmoe_gating=gating,
                   auto_map={"AutoConfig": "configuration_dotmoe.DotMoeConfig",
                             "AutoModelForCausalLM": "modeling_dotmoe.DotMoeForCausalLM"})
    else:
        cfg["model_type"] = plan.base
    cfg["architectures"] = [plan.architecture]
    return cfg
