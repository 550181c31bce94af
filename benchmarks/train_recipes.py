"""Training recipes on a real model: does joint training beat its own training-free start, and which recipe does?

    python benchmarks/train_recipes.py --model smollm2-135m-instruct --recipes router-assignment full-low-lr --jobs 2
    python benchmarks/train_recipes.py --model smollm2-135m-instruct --report          # rebuild the table and plot only

One training-free conversion (`start`) is made first; every recipe then trains from it (`--init-from`: the same
partition, routers and refitted down projections, so each curve starts at exactly the training-free model), on the
bundled Wikipedia train split, with the validation perplexity (Wikipedia validation split) measured at the start and
every `--eval-every` steps; the run keeps its best validation state (`keep_best`). Afterwards each run is scored on
held-out test text it never saw in any choice: the first 8,192 tokens of the Wikipedia test split and 4,096 of the
Python-docs test split. Runs go to `--runs` (`<recipe>`, `<recipe>__t<tokens>` for other than 32,768 tokens,
`__seed<N>` for other seeds); a finished run is not redone, and one stopped with a checkpoint (every
`--checkpoint-every` steps; e.g. a session's end) is resumed exactly by the next invocation. `--jobs 2` runs two
recipes at once with one thread each (quality only: their tokens/s are then per core, and the two share memory
bandwidth). The baselines train the same way: `prune-distill` prunes to the same active budget (its own
training-free prune) and distils every weight; `random` trains from its own training-free random split.

Results: `benchmarks/results/train_recipes_<model>_c<calib tokens>.md` (+ `.json`, + `_val_curve.png`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from dotmoe.artifacts import read_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> ConvertConfig overrides (a YAML config of `dotmoe convert`); warmup 2 of the 16 steps of a 32k-token run
RECIPES = {
    # `dotmoe convert --tokens N` with nothing else at the time (fp32, below): every weight trains (trainable auto),
    # lr 3e-4 (router 1e-4, affinity 1e-3), warmup an eighth of the steps, cosine decay, best validation state kept
    "defaults": {},
    # the same with the weights at 1e-4 (the default before the lr3e-4 / lr1e-3 runs below)
    "lr1e-4": {"lr_weights": 1.0e-4},
    # the defaults of `--tokens N` until now: router and assignment train, frozen FFN weights, refit after training
    "router-assignment": {"trainable": "router+assignment", "refit_after_training": True, "warmup_steps": 2},
    # every weight trains (distillation from the dense teacher); router and assignment at 30x / 50x lower rates
    "full-low-lr": {"trainable": "full", "lr_weights": 3.0e-5, "lr_router": 1.0e-4, "lr_affinity": 1.0e-3,
                    "warmup_steps": 2},
    # the same, weights at 1e-4
    "full-lr1e-4": {"trainable": "full", "lr_weights": 1.0e-4, "lr_router": 1.0e-4, "lr_affinity": 1.0e-3,
                    "warmup_steps": 2},
    # the weights at 3x (the 32k-token curve at 1e-4 was still falling; now the default)
    "lr3e-4": {"lr_weights": 3.0e-4},
    # and at 10x
    "lr1e-3": {"lr_weights": 1.0e-3},
    # the paper's ablation: full-low-lr with the starting partition frozen
    "full-low-lr-frozen": {"trainable": "full", "lr_weights": 3.0e-5, "lr_router": 1.0e-4, "lr_affinity": 0.0,
                           "warmup_steps": 2},
    # full-low-lr with the assignment learning fast enough to move neurons (at 1e-3 it moves none in 16 steps: the
    # one-hot affinity's margin is 1.0 and AdamW moves each entry by about the learning rate per step)
    "full-learned-assignment": {"trainable": "full", "lr_weights": 3.0e-5, "lr_router": 1.0e-4, "lr_affinity": 0.05,
                                "warmup_steps": 2},
    # full-low-lr with the router and assignment at the old rates (3e-3 / 0.05)
    "full-high-router-lr": {"trainable": "full", "lr_weights": 3.0e-5, "warmup_steps": 2},
    # the paper's ablation at the defaults: the starting partition frozen (router + every weight train)
    "frozen-assignment": {"lr_affinity": 0.0},
    # the defaults with an assignment that can move within the run: a one-hot affinity of margin 0.25 (not 1.0) at
    # rate 0.05, so an entry's lead can be overtaken in ~5 AdamW steps (at the defaults no neuron moves in 16)
    "moving-assignment": {"lr_affinity": 0.05, "init_scale": 0.25},
    # baselines trained the same way (defaults): pruning to the same active budget + the same distillation (its
    # own training-free prune, then `--tokens`), and the random split (from its own training-free start)
    "prune-distill": {"method": "prune"},
    "random": {"method": "random"},
    # the clustering baseline (k-means of the hidden states as the router, its own training-free start)
    "hidden-kmeans-router": {"method": "hidden-kmeans-router"},
    # the defaults computed in bf16 (autocast, fp32 master weights and optimizer; evaluations stay fp32) without
    # activation checkpointing: on an AMX CPU bf16 matmuls run ~6x faster than fp32 (now what `dotmoe convert` does
    # there by default)
    "bf16": {"mixed_precision": "bf16", "gradient_checkpointing": False},
    # the strong baseline trained the same way as `bf16`: pruning to the same active budget + distillation in bf16
    "prune-distill-bf16": {"method": "prune", "mixed_precision": "bf16", "gradient_checkpointing": False},
    # the other baselines trained the same way as `bf16`, each from its own training-free start
    "random-bf16": {"method": "random", "mixed_precision": "bf16", "gradient_checkpointing": False},
    "hidden-kmeans-router-bf16": {"method": "hidden-kmeans-router", "mixed_precision": "bf16",
                                  "gradient_checkpointing": False},
    # the paper's ablation in bf16: the starting partition frozen, and an assignment that can move (as
    # `moving-assignment`)
    "frozen-assignment-bf16": {"lr_affinity": 0.0, "mixed_precision": "bf16", "gradient_checkpointing": False},
    "moving-assignment-bf16": {"lr_affinity": 0.05, "init_scale": 0.25, "mixed_precision": "bf16",
                               "gradient_checkpointing": False},
    # `bf16` with the weights' learning rate doubled (6e-4) and without the load-balance term: two candidates for the
    # 50% target (1M tokens reached 1.59 at the defaults; the validation curve was still falling)
    "lr6e-4-bf16": {"lr_weights": 6.0e-4, "mixed_precision": "bf16", "gradient_checkpointing": False},
    "no-balance-bf16": {"lb_weight": 0.0, "mixed_precision": "bf16", "gradient_checkpointing": False},
    # `bf16` plus intermediate-layer distillation (every decoder layer's output matched to the dense model's,
    # relative squared error, `hidden_weight`): more signal per training token than the final KL alone
    "hidden-bf16": {"hidden_weight": 1.0, "mixed_precision": "bf16", "gradient_checkpointing": False},
    # the same at 10x: at weight 1 the layer term is ~0.04 beside a KL of ~0.86 (SmolLM2 at 50%, first steps)
    "hidden10-bf16": {"hidden_weight": 10.0, "mixed_precision": "bf16", "gradient_checkpointing": False},
    # `bf16` on another structure: every neuron routed (no shared expert, none dropped; at 50% active the default
    # drops as many neurons as it shares), from its own training-free start: neurons the training-free choice drops
    # can never come back in training, the routed ones can
    "all-routed-bf16": {"shared_fraction": 0.0, "mixed_precision": "bf16", "gradient_checkpointing": False},
    # `bf16` on more distinct text: the Wikipedia train split plus Jane Austen's novels (bundled splits, named here
    # and resolved to their files; 437,736 + 907,727 SmolLM2 tokens, so a 1M-token run sees no sequence twice)
    "more-text-bf16": {"data": ["wiki_train", "austen_train"], "mixed_precision": "bf16",
                       "gradient_checkpointing": False},
    # `bf16` on the other exact 50% structure of E=8 that drops nothing: k=2 of 8 experts of 128 neurons beside an
    # always-on 512 (512 + 2 x 128 = 768 of SmolLM2's 1,536 neurons active; the default k=4 structure keeps 576 +
    # 8 x 48 and drops 576). Run it in the 50% group (--top-k 4): its own top_k overrides the group's
    "k2-shared512-bf16": {"top_k": 2, "shared": 512, "drop": 0, "mixed_precision": "bf16",
                          "gradient_checkpointing": False},
    # finer experts beside the same always-on 512: k=4 of 16 experts of 64 (512 + 4 x 64 = 768 active, nothing
    # dropped; the oracle bound falls with E: 5.92 at E=8, 4.46 at E=32 at 25%). Run it in the 50% group (--top-k 4)
    "e16-k4-shared512-bf16": {"experts": 16, "top_k": 4, "shared": 512, "drop": 0, "mixed_precision": "bf16",
                              "gradient_checkpointing": False},
    # finer still: k=8 of 32 experts of 32 neurons beside the same always-on 512 (512 + 8 x 32 = 768 of 1,536 active,
    # 50%; nothing dropped). Run it in the 50% group (--top-k 4)
    "e32-k8-shared512-bf16": {"experts": 32, "top_k": 8, "shared": 512, "drop": 0, "mixed_precision": "bf16",
                              "gradient_checkpointing": False},
    # the k=2 + 512 idea one step further: k=1 of 8 experts of 110 neurons beside an always-on 656 (766 of 1,536 active,
    # 49.9%; nothing dropped). Run it in the 50% group (--top-k 4)
    "k1-shared656-bf16": {"top_k": 1, "shared": 656, "drop": 0, "mixed_precision": "bf16",
                          "gradient_checkpointing": False},
    # the no-drop idea at 25%: k=1 of 8 experts of 165 neurons beside an always-on 216 (381 of 1,536 active, 24.8%;
    # the default k=2 structure keeps 96 + 2 of 8 x 144 and drops 288). Run it in the 25% group (--top-k 2)
    "k1-shared216-bf16": {"top_k": 1, "shared": 216, "drop": 0, "mixed_precision": "bf16",
                          "gradient_checkpointing": False},
}


# the recipes above without `bf16` in their name ran when training was fp32 with activation checkpointing by
# default; they keep meaning what they measured (the defaults are now bf16 autocast where the CPU has AMX, and no
# checkpointing when memory allows: what the `bf16` recipes set)
for _name, _recipe in RECIPES.items():
    if "bf16" not in _name:
        _recipe.update({"mixed_precision": "no", "gradient_checkpointing": True})


def resolved(recipe: dict) -> dict:
    """A recipe's ConvertConfig overrides with its `data` (bundled split names) as the files they name."""
    from dotmoe.paths import reference_data_file

    return {**recipe, **({"data": [str(reference_data_file(s)) for s in recipe["data"]]} if "data" in recipe else {})}


# recipe key -> (start-name tag, `dotmoe convert` flag); "sf" is listed before "s" so that it is matched first
STRUCTURE = {"experts": ("e", "--experts"), "shared_fraction": ("sf", "--shared-fraction"), "top_k": ("k", "--top-k"),
             "shared": ("s", "--shared"), "drop": ("d", "--drop")}


def _structure_flag(part: str) -> list[str]:
    """A start name's `-<tag><number>` part as its convert options (e.g. `s512` -> --shared 512), else []."""
    for tag, flag in STRUCTURE.values():
        if part.startswith(tag) and part[len(tag):].replace(".", "").isdigit():
            return [flag, part[len(tag):]]
    return []


def start_name(recipe: str) -> str | None:
    """The training-free run a recipe trains from (--init-from): `start` for DOT-MoE, `start-<method>` for another
    MoE method, then `-sf<fraction>` / `-k<k>` / `-s<shared>` / `-d<drop>` for a structure of its own (e.g.
    `start-sf0`, `start-k2-s512-d0`), None for prune (its run prunes, then distils)."""
    method = RECIPES[recipe].get("method", "dotmoe")
    if method == "prune":
        return None
    name = "start" if method == "dotmoe" else f"start-{method}"
    return name + "".join(f"-{tag}{RECIPES[recipe][key]:g}" for key, (tag, _) in STRUCTURE.items()
                          if key in RECIPES[recipe])


def structure_args(recipe: str) -> list[str]:
    """The `dotmoe convert` options of a recipe's own structure (its `experts`, `top_k`, `shared`, ... keys): given
    after the group's `--experts 8 --top-k K`, they override them, as in its start (start_args)."""
    return [a for key, (_, flag) in STRUCTURE.items() if key in RECIPES[recipe]
            for a in (flag, f"{RECIPES[recipe][key]:g}")]


def start_args(name: str) -> list[str]:
    """The `dotmoe convert` options of the training-free start `name` (start_name)."""
    parts = name.split("-")[1:]
    method = [p for p in parts if not _structure_flag(p)]  # e.g. hidden-kmeans-router
    return (["--method", "-".join(method)] if method else []) + [a for p in parts for a in _structure_flag(p)]


def run_name(recipe: str, tokens: int, seed: int) -> str:
    """A run's directory name: the recipe, then `__t<tokens>` off the 32,768-token default, `__seed<N>` off seed 0."""
    return recipe + (f"__t{tokens}" if tokens != 32768 else "") + (f"__seed{seed}" if seed else "")


def convert_cmd(model: Path, out: Path, tokens: int, calib: int, eval_tokens: int, top_k: int,
                extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "dotmoe.cli", "convert", "--model", str(model), "--experts", "8", "--top-k", str(top_k),
            "--tokens", str(tokens), "--calib-tokens", str(calib), "--eval-tokens", str(eval_tokens),
            "--export-format", "none", "--out", str(out), *extra]


def run(cmd: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}); see {log}")
    return round(time.time() - t0, 1)


def score(out: Path) -> dict:
    """Test scores of a finished run, remembered beside it (`<run>.scores.json`, keyed by its record's sha256):
    a report rescoring every run took ~3 minutes per run on 2 cores."""
    from dotmoe_dev.bench import score as score_run

    from dotmoe.run_dir import file_sha256

    meta_file = out / "dotmoe_meta.json"
    key, cached = file_sha256(meta_file), out.parent / f"{out.name}.scores.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        if saved.get("meta_sha256") == key:
            return saved["scores"]
    method = read_record(out).method
    scores = score_run(out, "prune" if method == "prune" else "dotmoe", 8192, cloze=False)
    cached.write_text(json.dumps({"meta_sha256": key, "scores": scores}))
    return scores


def record(name: str, out: Path, wall: float | None) -> dict:
    meta = read_record(out).to_dict()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()] \
        if (out / "train_log.jsonl").is_file() else []
    curve = [(r["tokens"], r["val_ppl"]) for r in log if "val_ppl" in r]
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return {"recipe": name, "config": RECIPES.get(name.split("__")[0], {}), "train_tokens": meta["train_tokens"],
            "seed": meta["config"]["seed"],
            "val_curve": curve, "best_step": meta.get("best_step"), "final_val_ppl": meta["val_ppl"],
            "dense_val_ppl": meta["dense_val_ppl"], "tokens_per_s": speeds[-1] if speeds else None, "wall_s": wall,
            "peak_rss_mb": max(meta["peak_rss_mb"].values()) if isinstance(meta.get("peak_rss_mb"), dict) else None,
            **score(out)}


def earlier_records(results: Path, present: dict[str, dict]) -> list[dict]:
    """The rows of an earlier results file whose runs are not in this runs directory (a session's runs directory
    may not outlive it, its measured rows must): kept as they were. An earlier start that scores otherwise than
    this directory's (rebuilt by other code) stays too, as `start__earlier`: the kept runs trained from it."""
    if not results.is_file():
        return []
    earlier = json.loads(results.read_text())["runs"]
    kept = [r for r in earlier if r["recipe"] not in present and r["recipe"] != "start"]
    old = next((r for r in earlier if r["recipe"] == "start"), None)
    new = present.get("start")
    if old is not None and new is not None and old["wiki_test_ppl"] != new["wiki_test_ppl"] and \
            not any(r["recipe"] == "start__earlier" for r in kept):
        kept.append({**old, "recipe": "start__earlier"})
    return kept


def machine() -> str:
    """This machine in a few words: cores, CPU model and its native-bf16 flags (they decide the float types)."""
    from dotmoe.precision import cpu_bf16_flags

    cpu = "CPU"
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{os.cpu_count()} cores, {cpu} ({', '.join(cpu_bf16_flags()) or 'no amx_bf16 / avx512_bf16'})"


def render(model: str, records: list[dict], dense: dict, args) -> str:
    import torch

    lines = [f"# Training recipes on {model}: E=8 / k={args.top_k} ({args.top_k / 8:.0%} of the FFN active)", "",
             f"`python benchmarks/train_recipes.py --model {model} ...` (module docstring); machine: {machine()}, "
             f"torch {torch.__version__}. Start: a training-free conversion with "
             f"{args.calib_tokens:,} calibration tokens; every recipe trains the tokens of its row from it "
             f"(batch 8 x 256) and keeps its best validation state (validation: first {args.eval_tokens:,} tokens "
             "of the Wikipedia validation split, at the start and every "
             "`eval every` tokens). Test: first 8,192 tokens of the Wikipedia test split (dense PPL "
             f"{dense['wiki_test_ppl']}) and 4,096 of the Python-docs test split (dense {dense['pydocs_test_ppl']}). "
             "tok/s: training tokens over the training loop's time, validations included; wall: the whole run, "
             "start excluded; peak RSS: the run's largest stage peak.",
             "", "| recipe | tokens | seed | eval every | val PPL: start -> each evaluation | best step | wiki test PPL | "
             "ratio | pydocs test PPL | tok/s | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        curve = " -> ".join(f"{p:.1f}" for _, p in r["val_curve"]) or "-"
        every = f"{r['val_curve'][1][0]:,}" if len(r["val_curve"]) > 1 else "-"
        lines.append(f"| {r['recipe']} | {r['train_tokens']:,} | {r['seed']} | {every} | {curve} | {r['best_step']} | "
                     f"{r['wiki_test_ppl']:.2f} | {r['wiki_test_ppl'] / dense['wiki_test_ppl']:.2f} | "
                     f"{r['pydocs_test_ppl']:.2f} | {r['tokens_per_s'] or ''} | {r.get('wall_s') or ''} | "
                     f"{r.get('peak_rss_mb') or ''} |")
    lines += ["", "Recipes (ConvertConfig overrides; everything else at the defaults):", ""]
    lines += [f"- `{r}`: `{json.dumps(RECIPES[r])}`" for r in dict.fromkeys(x["recipe"].split("__")[0] for x in records)
              if not r.startswith("start")]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        if r["val_curve"]:
            ax.plot(*zip(*r["val_curve"]), marker="o", label=r["recipe"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation PPL (Wikipedia validation split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct | gemma-3-270m | a local HF model directory")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token of 8 (2: 25%% of the FFN active, "
                        "4: 50%%); runs and results of k other than 2 are named with _k<N>")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--runs", default="out/train_recipes")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every recipe run (data order; the "
                        "start is the same): a seed other than 0 writes its runs as <recipe>-seed<N>")
    parser.add_argument("--checkpoint-every", type=int, default=8, help="steps between checkpoints (a stopped "
                        "run is resumed by the next invocation)")
    parser.add_argument("--jobs", type=int, default=1, help="recipes run at once (threads: 2 // jobs each)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument("--results-tag", default="", help="appended to the results' file names (e.g. _xeon for "
                        "runs of another machine, so that tables of two machines are never merged)")
    args = parser.parse_args()

    from dotmoe_dev.bench import dense_scores, model_dir

    model = model_dir(args.model)
    suffix = f"_k{args.top_k}" if args.top_k != 2 else ""
    runs = Path(args.runs) / (Path(args.model).name + suffix)
    runs.mkdir(parents=True, exist_ok=True)
    start = runs / "start"
    starts = {start_name(r) for r in args.recipes} | {"start"}
    for name in sorted(starts - {None}):
        if not args.report and not (runs / name / "COMPLETE").is_file():
            run(convert_cmd(model, runs / name, 0, args.calib_tokens, 8192, args.top_k,  # a -k<k> tag overrides it
                            ["--overwrite", *start_args(name)]),
                runs / f"{name}.log", 2)

    def one(recipe: str) -> None:
        name = run_name(recipe, args.tokens, args.seed)
        out = runs / name
        if (out / "COMPLETE").is_file():
            return
        cfg = runs / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**resolved(RECIPES[recipe]), "seed": args.seed}))
        origin = ["--init-from", str(runs / start_name(recipe))] if start_name(recipe) else []
        # a run stopped with a checkpoint (e.g. at a session's end) continues exactly where it stopped
        again = "--resume" if (out / "checkpoint.pt").is_file() else "--overwrite"
        extra = [*origin, "--config", str(cfg), "--eval-every", str(args.eval_every), again,
                 "--checkpoint-every", str(args.checkpoint_every), *structure_args(recipe)]
        wall = run(convert_cmd(model, out, args.tokens, args.calib_tokens, args.eval_tokens, args.top_k, extra),
                   runs / f"{name}.log", max(1, 2 // args.jobs))
        (runs / f"{name}.wall_s").write_text(str(wall))  # beside the run: its directory holds only dotmoe's files

    if not args.report:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, args.recipes))
    from dotmoe.artifacts import base_fingerprint

    dense_file, key = runs / "dense.scores.json", base_fingerprint(model)
    saved = json.loads(dense_file.read_text()) if dense_file.is_file() else {}
    dense = saved["scores"] if saved.get("fingerprint") == key else dense_scores(model, 8192, cloze=False)
    dense_file.write_text(json.dumps({"fingerprint": key, "scores": dense}))
    records = [record("start", start, None)]  # and the other training-free starts (their recipes' first points)
    records += [record(p.name, p, None) for p in sorted(runs.glob("start-*")) if (p / "COMPLETE").is_file()]
    finished = sorted(p.name for p in runs.iterdir() if (p / "COMPLETE").is_file() and p.name.split("__")[0] in RECIPES)
    for name in sorted(finished, key=lambda n: (list(RECIPES).index(n.split("__")[0]), n)):
        out = runs / name
        walls = [p for p in (runs / f"{name}.wall_s", out / "wall_s.txt") if p.is_file()]
        wall = float(walls[0].read_text()) if walls else None
        records.append(record(name, out, wall))
    stem = RESULTS / f"train_recipes_{Path(args.model).name}_c{args.calib_tokens}{suffix}{args.results_tag}"
    records += earlier_records(stem.with_suffix(".json"), {r["recipe"]: r for r in records})
    records.sort(key=lambda r: (not r["recipe"].startswith("start"), list(RECIPES).index(r["recipe"].split("__")[0])
                                if not r["recipe"].startswith("start") else -1, r["recipe"]))
    stem.with_suffix(".json").write_text(json.dumps({"dense": dense, "runs": records}, indent=1))
    stem.with_suffix(".md").write_text(render(Path(args.model).name, records, dense, args))
    plot(records, stem.parent / f"{stem.name}_val_curve.png")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
