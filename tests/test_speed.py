"""The speed benchmark's bookkeeping (bytes bound) and a smoke run of `dotmoe bench speed`."""

import torch
from test_export import fake_conversion, save_tiny

from dotmoe.cli import main
from dotmoe.export import export
from dotmoe.speed import weight_bytes


def test_bytes_bound_counts_k_of_e_experts_and_the_cli_prints_a_table(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    dense = save_tiny("llama", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=1), tmp_path / "moe", check_tokens=0,
           progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32)
    size = {n: p.numel() * 4 for n, p in model.named_parameters()}  # saved in fp32, tied embedding once
    experts = sum(v for n, v in size.items() if ".experts." in n)
    total, active = weight_bytes(tmp_path / "moe")
    assert total == sum(size.values()) and active == total - experts + experts // 4
    assert weight_bytes(dense)[0] == weight_bytes(dense)[1]
    # timed in bf16, a float32 checkpoint reads 2 bytes per weight (the bound compares what both runs read)
    assert weight_bytes(tmp_path / "moe", 2) == (total // 2, active // 2)

    code = main(["bench", "speed", "--dense", str(dense), "--moe", str(tmp_path / "moe"), "--batch", "1,2",
                 "--prompt", "8", "--new-tokens", "2", "--runs", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and "decode x" in out and "bytes bound x" in out and "experts touched per layer" in out
    assert len([line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]) == 2

    from dotmoe.speed import Workload

    timed_with, time_once = [], Workload.time_once  # --onednn off: both models timed with oneDNN off, then restored
    monkeypatch.setattr(Workload, "time_once", lambda self, m: timed_with.append(torch.backends.mkldnn.enabled)
                        or time_once(self, m))
    assert main(["bench", "speed", "--dense", str(dense), "--moe", str(tmp_path / "moe"), "--batch", "1",
                 "--prompt", "8", "--new-tokens", "2", "--runs", "1", "--onednn", "off"]) == 0
    assert "oneDNN off" in capsys.readouterr().out and timed_with and not any(timed_with)
    assert torch.backends.mkldnn.enabled


def _check_kernel_against_stock(tmp_path, impl: str, shapes, prompt: torch.Tensor) -> None:
    """A qwen3 MoE export with uneven expert sizes (zero-padded blocks): `impl` gives stock grouped_mm's logits on
    random ids of each shape and the same greedy tokens from `prompt`."""
    from transformers import AutoModelForCausalLM

    import dotmoe.fast_experts  # noqa: F401  registers "dotmoe_gather" and "dotmoe_all"

    dense = save_tiny("qwen3", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=2, capacities=[10, 12, 13, 13]),
           tmp_path / "moe", check_tokens=0, progress=False)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32,
                                                experts_implementation=impl).eval()
    with torch.no_grad():
        for shape in shapes:
            ids = torch.randint(0, 8000, shape, generator=torch.Generator().manual_seed(0))
            assert (stock(input_ids=ids).logits - fast(input_ids=ids).logits).abs().max() < 1e-5
        assert torch.equal(stock.generate(prompt, max_new_tokens=6, do_sample=False),
                           fast.generate(prompt, max_new_tokens=6, do_sample=False))


def test_gather_experts_kernel_matches_stock_grouped_mm(tmp_path):
    # 14 pairs: the gather path; 240 pairs: falls back to grouped_mm
    _check_kernel_against_stock(tmp_path, "dotmoe_gather", ((1, 7), (3, 40)), torch.arange(5).unsqueeze(0))


def test_single_token_gather_in_bf16_matches_stock_and_restores_onednn(tmp_path):
    """Batch-1 decoding in bf16 on CPU: the gather kernel's pairs path (matrix-vector products with oneDNN bypassed,
    routing weights folded into addmm) gives stock grouped_mm's next-token logits to bf16 rounding, and leaves oneDNN
    enabled."""
    from transformers import AutoModelForCausalLM

    import dotmoe.fast_experts  # noqa: F401

    dense = save_tiny("qwen3", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=2, capacities=[10, 12, 13, 13]),
           tmp_path / "moe", check_tokens=0, progress=False)
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.bfloat16, experts_implementation=i)
              .eval() for i in ("grouped_mm", "dotmoe_gather")]
    ids = torch.randint(0, 8000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        steps = []
        for model in models:
            past = model(input_ids=ids[:, :5], use_cache=True).past_key_values
            steps.append(model(input_ids=ids[:, 5:], past_key_values=past, use_cache=True).logits.float())
    assert torch.backends.mkldnn.enabled
    stock, fast = steps
    assert (stock - fast).norm() / stock.norm() < 1e-2
    assert stock.argmax() == fast.argmax()


def test_all_experts_kernel_matches_stock_grouped_mm(tmp_path):
    """dotmoe_all (every expert in two batched matmuls, unchosen outputs weighted 0) computes what stock grouped_mm
    does and generates the same tokens."""
    # decode steps, a short prefill, 240 pairs (grouped_mm)
    _check_kernel_against_stock(tmp_path, "dotmoe_all", ((1, 1), (8, 1), (4, 7), (3, 40)), torch.arange(10).view(2, 5))


def test_experts_touched_by_a_batch_measured_and_expected():
    """Measured: batch 1 touches exactly its k experts, the whole text every expert it used. Expected: the closed
    form sum_e 1 - (1 - q_e)^B equals the mean distinct count over all ordered pairs of tokens (B = 2, drawn with
    replacement), enumerated."""
    from itertools import product

    from dotmoe.expert_coverage import expected_touched, measured_touched

    gen = torch.Generator().manual_seed(0)
    choices = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(40)])  # 40 tokens, k=2 of E=8
    choices[:20] = torch.tensor([0, 1])  # a skewed load
    assert measured_touched(choices, 8, 1) == 2.0
    assert measured_touched(choices, 8, len(choices)) == len(torch.unique(choices))
    pairs = [len(set(choices[i].tolist()) | set(choices[j].tolist())) for i, j in product(range(40), repeat=2)]
    assert abs(expected_touched(choices, 8, 2) - sum(pairs) / len(pairs)) < 1e-12
    assert abs(expected_touched(choices, 8, 1) - 2.0) < 1e-12
    assert 2.0 < measured_touched(choices, 8, 4) < 8 and expected_touched(choices, 8, 100) < 8 + 1e-9


def test_bytes_bound_of_a_batch_from_the_routing_of_real_text(tmp_path):
    """The exported MoE's routing of text: [T, k] distinct experts per token in every layer; at batch 1 the bound is
    weight_bytes' k-of-E bound, and it falls towards 1 as the batch touches more experts."""
    from transformers import AutoModelForCausalLM

    from dotmoe.expert_coverage import bytes_bound, coverage, routing_choices
    from dotmoe.speed import byte_counts

    dense = save_tiny("llama", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=1), tmp_path / "moe", check_tokens=0,
           progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ids = torch.randint(0, 8000, (256,), generator=torch.Generator().manual_seed(1))
    choices = routing_choices(model, ids, seq_len=64)
    assert len(choices) == model.config.num_hidden_layers and all(c.shape == (256, 1) for c in choices)
    assert all(((c >= 0) & (c < 4)).all() for c in choices)
    cov = coverage(choices, 4, [1, 2, 64])
    assert cov[0].measured == 1.0 and abs(cov[0].expected - 1.0) < 1e-12
    dense_bytes, (moe_total, expert) = weight_bytes(dense)[0], byte_counts(tmp_path / "moe")
    bounds = [bytes_bound(dense_bytes, moe_total, expert, 4, c.measured) for c in cov]
    assert abs(bounds[0] - dense_bytes / weight_bytes(tmp_path / "moe")[1]) < 1e-9
    assert bounds[0] > bounds[1] > bounds[2]
    assert bounds[2] >= dense_bytes / moe_total - 1e-9  # at most every expert of every layer is read


def test_auto_experts_kernel_matches_stock_and_picks_by_step_size(tmp_path, monkeypatch):
    """dotmoe_auto gives stock grouped_mm's logits (a token, two tokens, a short and a long prefill), and sends one
    token or at most PAIRS_PATH_MAX pairs to the pairs path, up to SMALL_STEP_PAIRS pairs to all, larger ones to stock
    grouped_mm."""
    import dotmoe.fast_experts as fe

    _check_kernel_against_stock(tmp_path, "dotmoe_auto", ((1, 1), (2, 1), (4, 7), (3, 40)),
                                torch.arange(5).unsqueeze(0))
    calls = []
    monkeypatch.setattr(fe, "pairs_forward", lambda self, h, i, w: calls.append("pairs"))
    monkeypatch.setattr(fe, "all_experts_forward", lambda self, h, i, w: calls.append("all"))

    class Experts:
        num_experts, has_bias, has_gate = 8, False, True

    for tokens, k in ((1, 2), (1, 4), (2, 2), (4, 2), (16, 4)):
        fe.auto_experts_forward(Experts(), torch.zeros(tokens, 4), torch.zeros(tokens, k, dtype=torch.long),
                                torch.zeros(tokens, k))
    assert calls == ["pairs", "pairs", "pairs", "all", "all"]


def test_an_untied_head_does_not_count_the_embedding_table_as_read(tmp_path):
    """A decode step reads one row of the token-embedding table: with a separate LM head (the Qwen2-MoE export of a
    tied model writes it out) the table is not counted, so the export's bound equals that of its tied twin."""
    from safetensors import safe_open

    from dotmoe.speed import byte_counts

    dense = save_tiny("llama", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=1, shared=8), tmp_path / "moe",
           check_tokens=0, progress=False)
    sizes = {}
    for f in (tmp_path / "moe").glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            sizes.update({k: fh.get_tensor(k).numel() * 4 for k in fh.keys()})
    assert "lm_head.weight" in sizes
    read, experts = byte_counts(tmp_path / "moe")
    assert read == sum(sizes.values()) - sizes["model.embed_tokens.weight"]
    assert experts == sum(v for k, v in sizes.items() if ".experts." in k)
    dense_sizes = {}
    for f in dense.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            dense_sizes.update({k: fh.get_tensor(k).numel() * 4 for k in fh.keys()})
    assert "lm_head.weight" not in dense_sizes  # tied: the table is the head, read whole
    assert byte_counts(dense)[0] == sum(dense_sizes.values())
