"""The `dotmoe` command line's arguments: one parser, a sub-command each (`dotmoe.cli` runs them)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """`convert`: the model, data, output, config, method and mode."""
    p.add_argument("--model", help="dense HF model directory (default: bundled reference model)")
    p.add_argument("--data", nargs="+", help="local .txt/.jsonl/.parquet files (default: bundled train sample)")
    p.add_argument("--eval-data", nargs="+", help="held-out text for perplexity (default: bundled validation)")
    p.add_argument("--out", help="output directory (default: out/dotmoe)")
    p.add_argument("--config", help="YAML config; CLI flags override it")
    p.add_argument("--method", help="dotmoe | random | sequential | weight-kmeans | activation | "
                   "hidden-kmeans-router | prune")
    p.add_argument("--mode", help="joint (default: end-to-end KL) | layerwise (one layer at a time, low memory)")
    p.add_argument("--layer-steps", type=int, help="layerwise: optimizer steps per layer (default 100)")
    p.add_argument("--global-tokens", type=int, help="layerwise: then train end to end (KL) on this many tokens, "
                   "starting from the layer-wise result (loads the whole model; default 0 = no global phase)")
    p.add_argument("--init-from", help="start from an earlier conversion's partition and routers (a `dotmoe "
                   "convert` output, e.g. a layer-wise one) instead of the initialisation")


def _add_structure_args(p: argparse.ArgumentParser) -> None:
    """`convert`: the MoE's shape: experts, top-k, the shared and dropped neurons, its initialisation."""
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--shared", type=int, help="always-on shared expert size in neurons (0 = none)")
    p.add_argument("--shared-fraction", type=float, help="share of the active budget (k/E of the neurons) spent on "
                   "an always-on shared expert, the least useful neurons dropped to hold the budget (default: 0.25 at "
                   "k/E <= 1/4, rising to 0.75 at k/E >= 1/2; 0 = a plain MoE); --shared/--drop set neuron counts")
    p.add_argument("--drop", type=int, help="neurons removed entirely (needs --shared; with the shared expert it "
                   "keeps the active budget: drop = shared * (E / k - 1))")
    p.add_argument("--init-affinity", help="dotmoe's starting partition: coactivation | weight-kmeans | random")
    p.add_argument("--init-router", help="lstsq | lstsq-topk | random")
    p.add_argument("--capacities", type=int, nargs="+", help="explicit routed expert sizes (sum = N - shared)")
    p.add_argument("--gating", help="mask | softmax")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """`convert`: training: tokens, batches, what trains, calibration, precision."""
    p.add_argument("--tokens", type=int, help="training tokens (default 262144, every weight distilled from the "
                   "dense model; 0 = training-free; --mode layerwise trains --layer-steps per layer unless --tokens 0)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--trainable", help="auto (default: full when training, i.e. with --tokens > 0 in the joint "
                   "mode) | router+assignment | experts | full")
    p.add_argument("--eval-tokens", type=int, help="tokens of --eval-data scored for perplexity (default 32768)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens for the initial partition and router "
                   "(default 65536; 16384 with --mode layerwise)")
    p.add_argument("--calibrate-on", help="dense (default: each layer's partition and router from the dense "
                   "model's FFN inputs) | converted (from the inputs the converted layers below give it, during the "
                   "refit; training-free)")
    p.add_argument("--precision", help="auto (default: bf16 where a probe matmul shows the hardware runs it fast, "
                   "i.e. AMX / AVX512-BF16 CPUs and bf16 GPUs, else fp32; the choice and its reason are printed) | "
                   "fp32 | bf16 (joint mode and prune; bf16 trains only router+assignment)")
    p.add_argument("--mixed-precision", help="autocast while training: auto (default: bf16 when the weights train "
                   "on hardware with fast bf16, else no) | no (fp32) | bf16 | fp16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in the backward: less memory, one more student forward per "
                   "step (default: only when training without it might not fit in memory)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """`convert`: refits, evaluation, checkpoints, resume, export."""
    p.add_argument("--refit-down", action=argparse.BooleanOptionalAction, default=None,
                   help="after the conversion, refit the FFN down projections by least squares on the calibration "
                   "tokens so the sparse FFNs reproduce the dense ones (default on; joint mode with frozen FFN "
                   "weights, and --method prune)")
    p.add_argument("--refit-before-training", action=argparse.BooleanOptionalAction, default=None,
                   help="with --refit-down and --tokens > 0: refit before training as well, so the router and "
                   "assignment train against the refitted FFNs (default on; not under FSDP)")
    p.add_argument("--refit-after-training", action=argparse.BooleanOptionalAction, default=None,
                   help="with --refit-before-training: refit once more after training the router and assignment "
                   "(default off: it undid most of what training gained on SmolLM2)")
    p.add_argument("--refit-stream", type=float, help="refit target: also pull the residual stream back to the "
                   "dense model's, with this weight in [0, 1] (default 0; Llama-shaped layers only)")
    p.add_argument("--eval-every", type=int, help="evaluate validation perplexity (on --val-tokens) at the start "
                   "of training and every N steps (default: a quarter of the steps; 0 = end only)")
    p.add_argument("--val-tokens", type=int, help="tokens of --eval-data scored at those evaluations (default 8192)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=None,
                   help="with --eval-every: end with the trainable state of the best validation perplexity, the "
                   "start included (default on)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="write OUT/checkpoint.pt every N steps (default 50)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from --out/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace what --out holds (a finished conversion, or an interrupted run's checkpoint); "
                   "only what dotmoe wrote: a directory that holds anything else is refused. The previous result "
                   "is deleted only once the new one is complete")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--export-format", help="auto | mixtral | qwen3_moe | qwen2_moe | dotmoe | none "
                   "(MoE checkpoint written to OUT/model; default auto)")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """Every `dotmoe convert` flag (each overrides the --config YAML value of the same name)."""
    for add in (_add_input_args, _add_structure_args, _add_training_args, _add_run_args):
        add(p)


def _add_model_commands(sub, handlers: dict[str, Callable]) -> None:
    """convert, export, eval and bench speed."""
    p = sub.add_parser("convert", help="train the OT neuron assignment + router and write the MoE")
    add_convert_args(p)
    p.set_defaults(func=handlers["convert"])
    p = sub.add_parser("export", help="write a convert output as a standard MoE checkpoint")
    p.add_argument("--from", dest="source", required=True, help="a `dotmoe convert` output directory")
    p.add_argument("--out", required=True, help="directory for the MoE checkpoint (written atomically)")
    p.add_argument("--format", default="auto", help="auto | mixtral | qwen3_moe | qwen2_moe | dotmoe")
    p.add_argument("--dtype", default="auto", help="auto (the dense model's) | float32 | bfloat16 | float16")
    p.add_argument("--check-tokens", type=int, default=256,
                   help="compare reloaded logits with the training-time model on N validation tokens (0 = skip)")
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dotmoe export in --out (a "
                   "directory that holds anything else is refused)")
    p.set_defaults(func=handlers["export"])
    p = sub.add_parser("eval", help="perplexity, FFN reconstruction error, router stats and lm-eval tasks")
    p.add_argument("--model", required=True, help="HF model directory (exported MoE, pruned or dense)")
    p.add_argument("--dense", help="the dense model, for retention and per-layer reconstruction error")
    p.add_argument("--data", nargs="+", help="held-out text files (default: bundled test split)")
    p.add_argument("--tokens", type=int, default=65_536, help="perplexity tokens (strided windows 256/128)")
    p.add_argument("--recon-tokens", type=int, default=4096)
    p.add_argument("--tasks", nargs="+", help="lm-eval tasks: bundled `pydoc_cloze`, or names in --task-dir")
    p.add_argument("--task-dir", help="directory of lm-eval task YAMLs that read local data files")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--trust-remote-code", action="store_true", help="needed for the custom dotmoe class")
    p.add_argument("--out", help="report JSON (default MODEL/eval.json); PNG plots are written beside it")
    p.set_defaults(func=handlers["eval"])
    p = sub.add_parser("bench", help="benchmarks: `dotmoe bench speed`")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("speed", help="prefill/decode tokens/s of dense vs exported MoE")
    p.add_argument("--dense", required=True)
    p.add_argument("--moe", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--onednn", default="on", choices=["on", "off"], help="PyTorch's oneDNN matmuls for both "
                   "models (off: native kernels; on CPU often faster for bf16 batch-1 decoding)")
    p.add_argument("--trust-remote-code", action="store_true", help="for the custom dotmoe class")
    p.set_defaults(func=handlers["bench_speed"])


def _add_helper_commands(sub, handlers: dict[str, Callable]) -> None:
    """demo, sample-data and info."""
    p = sub.add_parser("demo", help="DOT-MoE vs random split on the bundled reference model")
    p.add_argument("--out", default="out/demo")
    # 64 steps of 8 x 256 with every weight training: about 6 minutes a method on 2 cores (500k took ~20)
    p.add_argument("--tokens", type=int, default=131_072, help="training tokens per method (default 131072)")
    p.add_argument("--eval-tokens", type=int, help="tokens of --eval-data scored for perplexity (default 32768)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens for the initial partition and router "
                   "(default 65536; 16384 with --mode layerwise)")
    p.add_argument("--eval-every", type=int, default=16, help="validation PPL every N steps")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out "
                   "(only what dotmoe wrote: a directory holding anything else is refused)")
    p.set_defaults(func=handlers["demo"])
    p = sub.add_parser("sample-data", help="data-free: write text sampled from the dense model (for --data)")
    p.add_argument("--model", required=True, help="dense HF model directory or .gguf file")
    p.add_argument("--out", required=True, help="the .txt file to write")
    p.add_argument("--tokens", type=int, default=65_536, help="tokens to sample (default 65536)")
    p.add_argument("--length", type=int, default=256, help="new tokens per sample")
    p.add_argument("--batch", type=int, default=16, help="samples generated at once")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=handlers["sample_data"])
    p = sub.add_parser("info", help="paths and numbers of the bundled reference model and data")
    p.set_defaults(func=handlers["info"])


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a bad flag is one stderr line naming the problem and where the options are listed (not the
    whole usage block), exit code 2 as for every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")

    def parse_args(self, args=None, namespace=None):
        """Also: a path option given as an empty string is an error, never read as "the default" or ".". """
        parsed = super().parse_args(args, namespace)
        for dest in PATH_OPTIONS:
            value = getattr(parsed, dest, None)
            if value == "" or isinstance(value, list) and "" in value:
                self.error(f"argument --{'from' if dest == 'source' else dest.replace('_', '-')}: an empty path")
        return parsed


PATH_OPTIONS = ("model", "data", "eval_data", "out", "config", "init_from", "source", "dense", "moe", "task_dir")


def build_parser(handlers: dict[str, Callable]) -> argparse.ArgumentParser:
    """The `dotmoe` parser; `handlers` maps each command (`bench_speed` for `bench speed`, `sample_data`, ...)
    to the function that runs it (`args.func`)."""
    parser = OneLineErrors(prog="dotmoe", description="Dense LLM -> Mixture-of-Experts (DOT-MoE).")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub, handlers)
    _add_helper_commands(sub, handlers)
    return parser
