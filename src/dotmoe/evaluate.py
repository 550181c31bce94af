"""`dotmoe eval`: perplexity, per-layer FFN reconstruction error, router statistics and lm-eval tasks.

Protocol (documented in docs/real-checkpoints.md, "Evaluation"):
- Perplexity: strided windows (seq_len 256, stride 128) over the first `tokens` tokens of held-out text (default:
  the bundled *test* split, disjoint from the calibration/training sample and from the validation text that
  conversion reports).
- Reconstruction: the dense model's FFN inputs X_l and outputs Y_l on `recon_tokens` held-out tokens are fed
  to the candidate's layer-l FFN (MoE block or pruned MLP); relative MSE ||Y_hat - Y||^2 / ||Y||^2 per layer.
- Router statistics on the same tokens, from every stock router module (`*TopKRouter`): load fraction per
  expert, coefficient of variation of the load, dead experts (load 0), normalised routing entropy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dotmoe.atomic import atomic_write
from dotmoe.errors import DotMoeError
from dotmoe.guards import check_report_destination
from dotmoe.perplexity import MIN_EVAL_TOKENS


@dataclass
class EvalConfig:
    """Options of `dotmoe eval` (validated at construction)."""

    model: str
    dense: str = ""
    data: list[str] = field(default_factory=list)
    tokens: int = 65_536
    seq_len: int = 256
    stride: int = 128
    recon_tokens: int = 4096
    tasks: list[str] = field(default_factory=list)
    task_dir: str = ""
    limit: int | None = None
    batch_size: int = 8
    trust_remote_code: bool = False
    out: str = ""
    dense_ppl: float | None = None  # known dense perplexity on the same tokens (skips recomputing it)

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.seq_len:
            raise DotMoeError(f"need 0 < stride <= seq_len, got stride {self.stride}, seq_len {self.seq_len}")
        for name in ("tokens", "recon_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise DotMoeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tokens < MIN_EVAL_TOKENS:
            raise DotMoeError(f"tokens must be >= {MIN_EVAL_TOKENS} (a perplexity on fewer tokens means nothing), "
                              f"got {self.tokens}")
        if self.recon_tokens < self.seq_len:
            raise DotMoeError(f"recon_tokens must be >= seq_len {self.seq_len}, got {self.recon_tokens}")
        if self.limit is not None and self.limit < 1:
            raise DotMoeError(f"limit must be >= 1, got {self.limit}")


def _load(path: str, trust_remote_code: bool):
    from dotmoe.architecture import load_causal_lm
    from dotmoe.gguf_input import resolve_model

    path = resolve_model(path)
    cfg_file = path / "config.json"
    if cfg_file.is_file() and "auto_map" in json.loads(cfg_file.read_text()) and not trust_remote_code:
        raise DotMoeError(f"{path} needs its own code (custom DotMoeForCausalLM); pass --trust-remote-code")
    model, tok = load_causal_lm(path, trust_remote_code=trust_remote_code)
    return model.eval(), tok


def ffn_modules(model: nn.Module) -> list[nn.Module]:
    """The feed-forward block of every decoder layer (dense MLP, Mixtral `block_sparse_moe` or MoE `mlp`)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise DotMoeError(f"{type(model).__name__} has no decoder `layers`")
    found = [getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None) for layer in layers]
    if any(m is None for m in found):
        raise DotMoeError(f"{type(model).__name__}: a decoder layer has no `mlp` block")
    return found


def _batches(ids: torch.Tensor, seq_len: int, tokens: int) -> torch.Tensor:
    n = min(tokens, len(ids)) // seq_len
    if n == 0:
        raise DotMoeError(f"need at least {seq_len} evaluation tokens, got {len(ids)}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def reconstruction_errors(dense: nn.Module, candidate: nn.Module, batches: torch.Tensor) -> list[float]:
    """Relative MSE of each candidate FFN on the dense model's own FFN inputs (same tokens)."""
    dense_ffn, cand_ffn = ffn_modules(dense), ffn_modules(candidate)
    if len(dense_ffn) != len(cand_ffn):
        raise DotMoeError(f"dense model has {len(dense_ffn)} layers, candidate {len(cand_ffn)}")
    err = torch.zeros(len(dense_ffn), dtype=torch.float64)
    ref = torch.zeros(len(dense_ffn), dtype=torch.float64)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i):
        return lambda mod, args, output: captured.__setitem__(i, (args[0], output))

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(dense_ffn)]
    try:
        for batch in batches.split(4):
            dense(input_ids=batch)
            for i, (x, y) in captured.items():
                y_hat = cand_ffn[i](x)
                y_hat = y_hat[0] if isinstance(y_hat, tuple) else y_hat
                err[i] += (y_hat.double() - y.double()).pow(2).sum()
                ref[i] += y.double().pow(2).sum()
    finally:
        for h in handles:
            h.remove()
    return (err / ref).tolist()


@torch.no_grad()
def router_statistics(model: nn.Module, batches: torch.Tensor) -> dict | None:
    """Per-layer expert load, load CV, dead experts and normalised routing entropy (None for dense models)."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not routers:
        return None
    counts: list[torch.Tensor] = [torch.zeros(0)] * len(routers)
    entropy = torch.zeros(len(routers), dtype=torch.float64)
    tokens = 0

    def hook(i):
        def fn(mod, args, output):
            logits, _, indices = output
            e = logits.shape[-1]
            c = torch.bincount(indices.flatten(), minlength=e).double()
            counts[i] = c if counts[i].numel() == 0 else counts[i] + c
            p = logits.float().softmax(-1)
            entropy[i] += -(p * p.clamp_min(1e-12).log()).sum(-1).double().sum() / math.log(e)
        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        for batch in batches.split(4):
            model(input_ids=batch)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    load = torch.stack([c / c.sum() for c in counts])  # [L, E]
    cv = load.std(-1, unbiased=False) / load.mean(-1)
    return {"load": load.tolist(), "load_cv": cv.tolist(), "mean_load_cv": float(cv.mean()),
            "dead_experts": int((load == 0).sum()), "routing_entropy": (entropy / tokens).tolist(),
            "mean_routing_entropy": float((entropy / tokens).mean())}


def bundled_task_configs() -> dict[str, dict]:
    """The task YAMLs shipped in dotmoe/assets/tasks, with data paths made absolute for lm-eval."""
    import yaml

    from dotmoe.paths import tasks_dir

    configs = {}
    for path in sorted(tasks_dir().glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        cfg["dataset_kwargs"]["data_files"] = {k: str(path.parent / v) for k, v in files.items()}
        configs[cfg["task"]] = cfg
    return configs


def task_dir_names(task_dir: str) -> dict[str, Path]:
    """Task name -> YAML file of every task YAML in `task_dir`; a one-line error for a missing directory or a
    YAML that does not parse (lm-eval would only report the task as unknown)."""
    import yaml

    class _AnyTag(yaml.SafeLoader):  # lm-eval YAMLs use tags such as !function; their values do not matter here
        pass

    _AnyTag.add_multi_constructor("", lambda loader, suffix, node: None)
    root = Path(task_dir)
    if not root.is_dir():
        raise DotMoeError(f"--task-dir {task_dir} " + ("is not a directory" if root.exists() else "does not exist"))
    names = {}
    for f in sorted(list(root.rglob("*.yaml")) + list(root.rglob("*.yml"))):
        try:
            doc = yaml.load(f.read_text(), Loader=_AnyTag)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DotMoeError(f"task YAML {f} is malformed: {' '.join(str(exc).split())[:200]}") from exc
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            names[doc["task"]] = f
    return names


def resolve_tasks(tasks: list[str], task_dir: str = ""):
    """(lm-eval task specs, TaskManager) for `tasks`: bundled tasks by name, others from `task_dir`; one-line
    errors for a missing or malformed --task-dir, a name both bundled and in --task-dir, an unknown task."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DotMoeError("lm-eval is not installed: pip install 'dotmoe[eval]'") from exc
    bundled = bundled_task_configs()
    mine = task_dir_names(task_dir) if task_dir else {}
    clash = sorted(set(mine) & set(bundled) & set(tasks))
    if clash:
        raise DotMoeError(f"task {clash[0]!r} is both a bundled task and defined in --task-dir {task_dir} "
                          f"({mine[clash[0]].name}); rename the task in your YAML")
    specs = [bundled.get(t, t) for t in tasks]
    # lm-eval's own task index is not loaded: its tasks download from the hub; local copies go in task_dir
    manager = TaskManager(include_path=task_dir or None, include_defaults=False)
    unknown = [t for t in specs if isinstance(t, str) and t not in manager.all_tasks]
    if unknown:
        where = (f"--task-dir {task_dir} defines {sorted(mine) or 'no task'}" if task_dir else
                 "put other task YAMLs (with local data_files) in a directory and pass --task-dir")
        raise DotMoeError(f"unknown task(s) {unknown}: bundled tasks are {sorted(bundled)}; {where}")
    return specs, manager


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], task_dir: str = "", limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval tasks in process; bundled tasks by name, others from YAMLs in `task_dir`."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise DotMoeError("lm-eval is not installed: pip install 'dotmoe[eval]'") from exc
    specs, manager = resolve_tasks(tasks, task_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0)["results"]
    except (IndexError, KeyError, TypeError) as exc:  # the task's own data: e.g. a label beyond its choices
        where = f" (from --task-dir {task_dir})" if task_dir else ""
        raise DotMoeError(f"lm-eval could not score task(s) {', '.join(tasks)}{where}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no message'}; check that each document's "
                          "doc_to_target is a valid index into its doc_to_choice") from exc
    return {name: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, float)} for name, r in results.items()}


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run every evaluation that applies and return (and optionally write) a JSON-able report."""
    from dotmoe.data import TextFiles, tokenize_stream
    from dotmoe.paths import default_data_file
    from dotmoe.perplexity import perplexity

    for path in (cfg.model, cfg.dense):
        if path:
            check_model_of_conversion(Path(path))
    if cfg.out:  # checked before the (long) evaluation, so a bad --out fails at once and writes nothing
        check_report_destination(cfg.out, plot_paths(cfg.out))
    if cfg.tasks or cfg.task_dir:  # so are the tasks
        resolve_tasks(cfg.tasks, cfg.task_dir)
    model, tok = _load(cfg.model, cfg.trust_remote_code)
    if cfg.dense:  # loaded (and its weights checked) before the evaluation, not after it
        dense, dense_tok = _load(cfg.dense, False)
        if len(dense_tok) != len(tok):
            raise DotMoeError(f"dense tokenizer has {len(dense_tok)} tokens, the model's {len(tok)}")
    base = cfg.dense or getattr(model.config, "dotmoe", {}).get("base_model") or cfg.model
    texts = TextFiles(cfg.data or [str(default_data_file("test", base))])
    ids = tokenize_stream(tok, texts, max_tokens=cfg.tokens)
    if len(ids) < MIN_EVAL_TOKENS:
        raise DotMoeError(f"evaluation data {', '.join(cfg.data) or 'the bundled test text'} has {len(ids)} tokens; "
                          f"at least {MIN_EVAL_TOKENS} are needed")
    report: dict = {"model": cfg.model, "config": asdict(cfg), "architecture": type(model).__name__,
                    "params": sum(p.numel() for p in model.parameters()), "ppl_tokens": len(ids)}
    from dotmoe.gguf_input import resolve_model

    model_cfg = json.loads((resolve_model(cfg.model) / "config.json").read_text())
    active = model_cfg.get("dotmoe", {}).get("active_params") if isinstance(model_cfg.get("dotmoe"), dict) else None
    if isinstance(active, int) and not isinstance(active, bool):
        report["active_params"] = active
    report["ppl"] = perplexity(model, ids, cfg.seq_len, cfg.stride, batch_size=cfg.batch_size, progress=progress)
    recon_batches = _batches(ids, cfg.seq_len, cfg.recon_tokens)
    if cfg.dense:
        report["dense_params"] = sum(p.numel() for p in dense.parameters())
        report["dense_ppl"] = cfg.dense_ppl or perplexity(dense, ids, cfg.seq_len, cfg.stride,
                                                          batch_size=cfg.batch_size, progress=progress)
        report["ppl_ratio"] = report["ppl"] / report["dense_ppl"]
        report["retention"] = report["dense_ppl"] / report["ppl"]
        errors = reconstruction_errors(dense, model, recon_batches)
        report["recon_error"] = errors
        report["mean_recon_error"] = sum(errors) / len(errors)
    stats = router_statistics(model, recon_batches)
    if stats is not None:
        report["router"] = stats
    if cfg.tasks:
        report["tasks"] = run_tasks(model, tok, cfg.tasks, cfg.task_dir, cfg.limit, cfg.batch_size)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)), record="eval report")
    return report


def plot_paths(out: str | Path) -> tuple[Path, Path]:
    """The expert-load heatmap and per-layer reconstruction plot written beside a report."""
    out = Path(out)
    return out.with_name(out.stem + "_expert_load.png"), out.with_name(out.stem + "_recon.png")


def check_model_of_conversion(path: Path) -> None:
    """A conversion output is not a model, and a conversion's `model/` is evaluated only once it is finished."""
    from dotmoe.artifacts import META_FILE, read_record
    from dotmoe.resume_guards import output_state

    if (path / META_FILE).is_file() and not (path / "config.json").is_file():
        raise DotMoeError(f"{path} is a dotmoe convert output, not a model; evaluate its export {path / 'model'}")
    if path.name == "model" and output_state(path.parent) in ("complete", "resumable", "unfinished"):
        read_record(path.parent)  # refuses an unfinished (or corrupt) conversion


def format_report(report: dict) -> str:
    """A short printed table of an evaluation report."""
    rows = [("model", report["model"]), ("architecture", report["architecture"]),
            ("params (total)", f"{report['params']:,}")]
    if "active_params" in report:
        rows.append(("params (active)", f"{report['active_params']:,}"))
    rows.append((f"PPL ({report['ppl_tokens']} tokens)", f"{report['ppl']:.3f}"))
    if "dense_ppl" in report:
        rows += [("dense PPL", f"{report['dense_ppl']:.3f}"), ("PPL ratio", f"{report['ppl_ratio']:.3f}"),
                 ("retention (dense/model PPL)", f"{report['retention']:.3f}"),
                 ("FFN recon error (mean rel. MSE)", f"{report['mean_recon_error']:.4f}"),
                 ("  per layer", " ".join(f"{e:.3f}" for e in report["recon_error"]))]
    if "router" in report:
        r = report["router"]
        rows += [("expert load CV (mean)", f"{r['mean_load_cv']:.3f}"), ("dead experts", str(r["dead_experts"])),
                 ("routing entropy (norm.)", f"{r['mean_routing_entropy']:.3f}")]
    for task, metrics in report.get("tasks", {}).items():
        rows.append((f"{task}", " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
