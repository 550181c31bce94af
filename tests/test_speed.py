"""The speed benchmark's bookkeeping (bytes bound) and a smoke run of `dotmoe bench speed`."""

import torch
from test_export import fake_conversion, save_tiny

from dotmoe.cli import main
from dotmoe.export import export
from dotmoe.speed import weight_bytes


def test_bytes_bound_counts_k_of_e_experts_and_the_cli_prints_a_table(tmp_path, capsys):
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

    code = main(["bench", "speed", "--dense", str(dense), "--moe", str(tmp_path / "moe"), "--batch", "1,2",
                 "--prompt", "8", "--new-tokens", "2", "--runs", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0 and "decode x" in out and "bytes bound x" in out
    assert len([line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]) == 2


def test_gather_experts_kernel_matches_stock_grouped_mm(tmp_path):
    from transformers import AutoModelForCausalLM

    import dotmoe.fast_experts  # noqa: F401  registers "dotmoe_gather"

    dense = save_tiny("qwen3", tmp_path / "dense")
    export(fake_conversion(dense, tmp_path / "conv", experts=4, top_k=2, capacities=[10, 12, 13, 13]),
           tmp_path / "moe", check_tokens=0, progress=False)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32,
                                                experts_implementation="dotmoe_gather").eval()
    with torch.no_grad():
        for shape in ((1, 7), (3, 40)):  # 14 pairs: the gather path; 240 pairs: falls back to grouped_mm
            ids = torch.randint(0, 8000, shape, generator=torch.Generator().manual_seed(0))
            assert (stock(input_ids=ids).logits - fast(input_ids=ids).logits).abs().max() < 1e-5
        prompt = torch.arange(5).unsqueeze(0)
        assert torch.equal(stock.generate(prompt, max_new_tokens=6, do_sample=False),
                           fast.generate(prompt, max_new_tokens=6, do_sample=False))
