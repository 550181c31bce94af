"""The MoE-ified MLP: dense parity with the mask off, and the sparse forward against a per-expert reference."""

import torch
from transformers import AutoModelForCausalLM

from dotmoe.moe_mlp import install_moe, moe_disabled, recorded_routing
from dotmoe.partitions import random_partition
from dotmoe.rounding import one_hot_assignment
from dotmoe.router import TopKRouter
from dotmoe.sinkhorn import capacities


def test_mask_off_equals_dense_bit_for_bit(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        install_moe(model, num_experts=4, top_k=2, gating="softmax", shared=False)
        with moe_disabled(model):
            off = model(input_ids=ids).logits
    assert torch.equal(dense, off)


def _expert_reference(mlp, x, partition, gates):
    """Explicit MoE: each expert is the FFN restricted to its neurons, weighted by its gate, summed."""
    out = torch.zeros_like(x)
    for e in range(gates.shape[-1]):
        idx = (partition == e).nonzero().squeeze(1)
        h = mlp.act_fn(x @ mlp.gate_proj.weight[idx].t()) * (x @ mlp.up_proj.weight[idx].t())
        out += gates[..., e : e + 1] * (h @ mlp.down_proj.weight[:, idx].t())
    return out


def test_sparse_forward_matches_per_expert_reference(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for gating in ("softmax", "mask"):
        for shared in (0, 8):
            moe = install_moe(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 4, 2, gating, shared > 0)[0]
            n = moe.dense.gate_proj.out_features
            caps = torch.tensor(capacities(n - shared, 4) + ([shared] if shared else []))
            part = random_partition(caps, torch.Generator().manual_seed(1))
            moe.assignment = one_hot_assignment(part, len(caps))
            x = torch.randn(3, 5, 32)
            with torch.no_grad():
                y = moe(x)
                gates = moe.router(x).gates
                if shared:
                    gates = torch.cat([gates, torch.ones_like(gates[..., :1])], -1)
                ref = _expert_reference(moe.dense, x, part, gates)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    del model


def test_recorded_routing_gives_each_layers_router_output_of_the_block_only(tiny_llama_dir):
    """The recorder returns, per MoE layer, the router's output on that layer's own input (checked against the
    router applied to the input captured by an independent hook), None for layers that did not route (the dense
    teacher), and leaves no hook behind."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    moes = install_moe(model, 4, 2, "softmax", shared=False)
    n = moes[0].dense.gate_proj.out_features
    for m in moes:
        m.assignment = one_hot_assignment(random_partition(torch.tensor(capacities(n, 4)),
                                                           torch.Generator().manual_seed(2)), 4)
    inputs = []
    grab = moes[1].register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        with recorded_routing(moes) as routed:
            model(ids)
        grab.remove()
        assert len(routed) == len(moes) and all(r is not None for r in routed)
        torch.testing.assert_close(routed[1].logits, moes[1].router(inputs[0]).logits, rtol=0, atol=0)
        assert routed[0].gates.shape == (2, 7, 4)
        assert all(not m.router._forward_hooks for m in moes)
        with recorded_routing(moes) as routed, moe_disabled(model):
            model(ids)
    assert routed == [None] * len(moes)


def test_router_gating_semantics():
    torch.manual_seed(0)
    x = torch.randn(10, 16)
    soft = TopKRouter(16, 8, 3, "softmax")
    out = soft(x)
    assert torch.equal((out.gates > 0).float(), out.topk_mask)
    torch.testing.assert_close(out.gates.sum(-1), torch.full((10,), 3.0))
    hard = TopKRouter(16, 8, 3, "mask")
    hard.weight.data.copy_(soft.weight.data)
    out_m = hard(x)
    assert torch.equal(out_m.gates.detach(), out_m.topk_mask)  # forward: weight exactly 1
    out_m.gates[:, 0].sum().backward()  # backward: through the softmax probabilities
    assert hard.weight.grad.abs().sum() > 0
