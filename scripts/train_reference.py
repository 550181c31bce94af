"""Train the bundled reference model and write its report (seeded; CPU; ~35-45 min on 2 cores).

    python scripts/train_reference.py [--steps 1000]

Writes src/dotmoe/assets/reference/ (HF dir, bf16) and src/dotmoe/assets/data/{train_sample,validation,test}.txt,
then evaluates validation/test perplexity (strided windows 256/128), a unigram baseline and greedy samples
into src/dotmoe/assets/reference/training_report.json.
"""

import argparse
import json
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dotmoe_dev.corpus import read_info_nodes, split_corpus
from dotmoe.data import tokenize_stream
from dotmoe.paths import ASSETS, reference_data_file, reference_model_dir
from dotmoe.perplexity import perplexity
from dotmoe_dev.reference import ReferenceConfig, train_reference, unigram_perplexity

PROMPTS = ["The Python Tutorial", "A list comprehension", "def main():\n", "The garbage collector"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = replace(ReferenceConfig(), steps=args.steps, warmup=50)
    report = train_reference(reference_model_dir(), ASSETS / "data", cfg)

    model = AutoModelForCausalLM.from_pretrained(reference_model_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    train_texts = split_corpus(read_info_nodes())["train"]
    for split in ("validation", "test"):
        ids = tokenize_stream(tok, [reference_data_file(split).read_text()])
        report[f"{split}_tokens"] = len(ids)
        report[f"{split}_ppl"] = round(perplexity(model, ids, 256, 128, progress=True), 3)
        report[f"{split}_unigram_ppl"] = round(unigram_perplexity(tok, train_texts, ids), 1)
    samples = {}
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        samples[prompt] = tok.decode(out[0], skip_special_tokens=True)
    report["greedy_samples"] = samples
    (reference_model_dir() / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "loss_log"}, indent=2))


if __name__ == "__main__":
    main()
