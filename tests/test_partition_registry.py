"""The starting partitions are one table: every method and affinity init has an entry, each gives a balanced
partition of the capacities, and an unknown name is refused."""

import pytest
import torch

from dotmoe.config_checks import AFFINITY_INITS, METHODS
from dotmoe.errors import DotMoeError
from dotmoe.layer_setup import PARTITION_KINDS, layer_partition, partition_kind_named
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP


def test_every_method_and_init_has_a_partition():
    named = {m for m in METHODS if m not in ("dotmoe", "prune")} | set(AFFINITY_INITS)
    assert named <= set(PARTITION_KINDS), named - set(PARTITION_KINDS)
    with pytest.raises(DotMoeError, match="unknown partition 'kmeans'; known: activation"):
        partition_kind_named("kmeans")


@pytest.mark.parametrize("kind", sorted(PARTITION_KINDS))
def test_each_kind_fills_the_capacities(kind):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2, hidden_act="silu"))
    x = torch.randn(256, 16)
    caps = torch.tensor([10, 10, 10, 10, 8])  # 4 routed experts + a shared column of 8
    part, router = layer_partition(kind, mlp, x, caps, 8, torch.Generator().manual_seed(0))
    assert torch.bincount(part, minlength=5).tolist() == caps.tolist()
    assert (router is not None) == PARTITION_KINDS[kind].gives_router
    if router is not None:
        assert router.shape == (4, 16)
