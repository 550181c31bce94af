"""`dotmoe` command line. Every user error is one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from dotmoe.errors import DotMoeError


def build_convert_config(args: argparse.Namespace):
    from dotmoe.config import ConvertConfig, load_yaml_config

    values = load_yaml_config(args.config) if args.config else {}
    names = {f.name for f in fields(ConvertConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    refits = [k for k in ("refit_down", "refit_before_training", "refit_after_training", "refit_stream") if values.get(k)]
    if values.get("mode") == "layerwise" and refits:  # the fields' defaults say nothing; a user's request must
        from dotmoe.errors import DotMoeError

        raise DotMoeError(f"--mode layerwise trains each layer's FFN itself and has no down-projection refit: "
                          f"{', '.join('--' + k.replace('_', '-') for k in refits)} apply to the joint mode only")
    return ConvertConfig(**values)


def cmd_convert(args: argparse.Namespace) -> None:
    from dotmoe.convert import convert
    from dotmoe.errors import Interrupted
    from dotmoe.resume_guards import convert_hint

    cfg = build_convert_config(args)
    if args.config:
        from dotmoe.guards import check_separate

        check_separate(cfg.out, {"--config file": [args.config]})
    try:
        result = convert(cfg)
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: say how to go on
        stop = exc if isinstance(exc, Interrupted) else Interrupted()
        stop.hint = convert_hint(cfg.out, ["convert", *args.argv[1:]])
        raise stop from None
    from dotmoe.run_dir import is_main_rank

    if not is_main_rank():  # distributed run: the main process reports
        return
    r = result.record
    if r.mode == "layerwise":
        errors = " ".join(f"{e['final_error']:.3f}" for e in r.layer_errors)
        print(f"{r.method} (layerwise): E={r.experts} k={r.top_k}; per-layer FFN relative error on the "
              f"calibration tokens: {errors} -> {result.out_dir}")
    else:
        print(f"{r.method}: E={r.experts} k={r.top_k} tokens={r.train_tokens} val PPL {r.val_ppl:.3f} "
              f"(dense {r.dense_val_ppl:.3f}, ratio {r.ppl_ratio:.3f}) -> {result.out_dir}")
    if r.export is not None:
        _print_export(r.export)


def _print_export(e: dict) -> None:
    parity = e.get("parity") or {}
    check = (f"; reloaded logits vs training-time sparse model: max abs diff {parity['max_abs_logit_diff']:.2e}, "
             f"top-1 agreement {parity['top1_agreement']:.4f} on {parity['tokens']} tokens") if parity else ""
    print(f"exported {e['architecture']} ({'exact' if e['exact'] else 'APPROXIMATE'}) -> {e['dir']}: "
          f"{e['active_params']:,} active / {e['total_params']:,} total params{check}")


def cmd_export(args: argparse.Namespace) -> None:
    import math

    from dotmoe.export import export

    if args.check_tokens < 0:
        raise DotMoeError(f"--check-tokens must be >= 0, got {args.check_tokens}")
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise DotMoeError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")

    r = export(args.source, args.out, fmt=args.format, dtype=args.dtype, overwrite=args.overwrite,
               check_tokens=args.check_tokens, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    if r.plan.note:
        print(f"note: {r.plan.note}")
    _print_export(r.summary())


def cmd_eval(args: argparse.Namespace) -> None:
    from dotmoe.evaluate import EvalConfig, evaluate, format_report, plot_paths
    from dotmoe.gguf_input import resolve_model

    out = Path(args.out) if args.out else resolve_model(args.model) / "eval.json"  # a .gguf: in its HF directory
    cfg = EvalConfig(model=args.model, dense=args.dense or "", data=args.data or [], tokens=args.tokens,
                     recon_tokens=args.recon_tokens, tasks=args.tasks or [], task_dir=args.task_dir or "",
                     limit=args.limit, trust_remote_code=args.trust_remote_code, out=str(out))
    from dotmoe.run_dir import destination_lock

    with destination_lock(out):  # one eval at a time writes this report and its plots
        report = evaluate(cfg)
        print(format_report(report))
        from dotmoe.errors import has_extra

        if has_extra("matplotlib"):
            from dotmoe.plots import load_heatmap, recon_per_layer

            if "router" in report:
                load_heatmap(report["router"]["load"], plot_paths(out)[0], f"expert load: {Path(args.model).name}")
            if "recon_error" in report:
                recon_per_layer({Path(args.model).name: report["recon_error"]}, plot_paths(out)[1])
        else:
            print("no PNG plots: they need the optional package 'matplotlib' (pip install 'dotmoe[plots]')")
        print(f"report: {out}")


def cmd_bench_speed(args: argparse.Namespace) -> None:
    import torch

    from dotmoe.guards import positive_ints
    from dotmoe.speed import bench_pair, check_pair, format_rows

    batches = positive_ints(args.batch, "--batch")
    for flag in ("prompt", "new_tokens", "runs", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DotMoeError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DotMoeError("--device cuda but no CUDA device is available")
    from dotmoe.gguf_input import resolve_model

    dense, moe = resolve_model(args.dense), resolve_model(args.moe)  # a .gguf: its dequantized HF directory
    check_pair(dense, moe, args.prompt, args.new_tokens, args.trust_remote_code)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_pair(dense, moe, batches, args.prompt, args.new_tokens, args.runs,
                      getattr(torch, args.dtype), args.device, trust_remote_code=args.trust_remote_code,
                      onednn=args.onednn == "on")
    print(f"{args.device}, {torch.get_num_threads()} threads, {args.dtype}, oneDNN {args.onednn}, prompt "
          f"{args.prompt}, {args.new_tokens} new tokens, median of {args.runs} runs")
    print(format_rows(rows))


def cmd_info(args: argparse.Namespace) -> None:
    from dotmoe.paths import reference_data_file, reference_model_dir

    info = {"reference_model": str(reference_model_dir()),
            **{f"data_{s}": str(reference_data_file(s)) for s in ("train_sample", "validation", "test")}}
    report = reference_model_dir() / "training_report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        info.update({k: rep.get(k) for k in ("parameters", "train_tokens", "validation_ppl", "test_ppl")})
    print(json.dumps(info, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    """DOT-MoE vs random split on the reference model, E=8 k=2, same router recipe and tokens."""
    import platform
    from dataclasses import replace

    import torch

    from dotmoe.atomic import atomic_write
    from dotmoe.config import ConvertConfig
    from dotmoe.convert import convert
    from dotmoe.guards import check_replaceable_file
    from dotmoe.resume_guards import check_convert_output

    given = {k: getattr(args, k) for k in ("eval_tokens", "calib_tokens") if getattr(args, k) is not None}
    base = ConvertConfig(tokens=args.tokens, eval_every=args.eval_every, overwrite=args.overwrite, **given)
    runs = [replace(base, method=m, out=str(Path(args.out) / m)) for m in ("dotmoe", "random")]
    for cfg in runs:  # both outputs before the first run: never refused after minutes of work
        check_convert_output(cfg)
    report = Path(args.out) / "demo.md"
    check_replaceable_file(report, "the report", "demo report")
    out_dirs = [convert(cfg).out_dir for cfg in runs]
    options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in given.items())
    header = (f"`dotmoe demo --tokens {args.tokens} --eval-every {args.eval_every}{options}` on {platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    text = demo_report(out_dirs, header)
    print("\n" + text)
    atomic_write(report, lambda tmp: tmp.write_text(text + "\n"), record="demo report")


def demo_report(out_dirs: list[Path], header: str) -> str:
    """Markdown table + validation-PPL and KL curves of finished conversion runs (from their outputs)."""
    lines = [header, "", "| method | E | k | tokens | val PPL | dense PPL | PPL ratio | final KL | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    from dotmoe.artifacts import read_record
    from dotmoe.run_dir import TRAIN_LOG

    logs = []
    for out in out_dirs:
        r = read_record(out)
        records = [json.loads(x) for x in (Path(out) / TRAIN_LOG).read_text().splitlines()]
        logs.append((r.method, [rec for rec in records if "event" not in rec]))
        lines.append(f"| {r.method} | {r.experts} | {r.top_k} | {r.train_tokens} | {r.val_ppl:.3f} | "
                     f"{r.dense_val_ppl:.3f} | {r.ppl_ratio:.3f} | {r.final_terms['kl']:.4f} | {r.wall_seconds} |")
    lines += ["", "Curves at each evaluation point (the first is the start of training): validation PPL of the MoE; "
              "mean KL of the steps since the previous point."]
    for method, log in logs:
        points = [i for i, rec in enumerate(log) if "val_ppl" in rec]
        kls, prev = [], 0
        for i in points:
            seg = [rec["kl"] for rec in log[prev : i + 1] if "kl" in rec]  # the start has no training step
            kls.append(f"{sum(seg) / len(seg):.4f}" if seg else "-")
            prev = i + 1
        lines.append(f"- {method} PPL: " + " ".join(f"{log[i]['val_ppl']:.2f}" for i in points))
        lines.append(f"- {method} KL:  " + " ".join(kls))
    return "\n".join(lines)


def cmd_sample_data(args: argparse.Namespace) -> None:
    from dotmoe.architecture import load_causal_lm
    from dotmoe.guards import check_file_destination, check_replaceable_file, check_separate
    from dotmoe.run_dir import destination_lock
    from dotmoe.self_data import sample_texts, write_texts

    check_file_destination(args.out, "--out")
    check_separate(args.out, {"model": [args.model]})
    if Path(args.out).exists() and not args.overwrite:
        raise DotMoeError(f"--out {args.out} exists; pass --overwrite to replace it")
    check_replaceable_file(args.out, "--out", "sampled text")  # --overwrite: only an earlier sample-data file
    with destination_lock(args.out):  # one process at a time writes this file
        model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
        texts = sample_texts(model.eval(), tokenizer, args.tokens, args.length, args.batch, args.top_p, args.seed)
        print(f"{len(texts)} samples -> {write_texts(texts, args.out)}")


def build_parser():
    """The `dotmoe` parser, each command bound to its `cmd_*` function here."""
    from dotmoe.cli_parser import build_parser as parser_for

    return parser_for({name.removeprefix("cmd_"): f for name, f in globals().items() if name.startswith("cmd_")})


def main(argv: list[str] | None = None) -> int:
    from dotmoe.allocator import use_huge_pages
    from dotmoe.errors import Interrupted
    from dotmoe.stop_signals import stop_on_signals

    use_huge_pages()  # before torch's first CPU allocation, which reads it
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with stop_on_signals():  # SIGINT/SIGTERM: cleanup runs, convert checkpoints at a step boundary
            args.func(args)
    except DotMoeError as exc:
        print(f"dotmoe: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: a full disk, an unreadable file, ...
        where = f": {exc.filename}" if exc.filename else ""
        print(f"dotmoe: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        hint = getattr(exc, "hint", "")
        print(f"dotmoe: {exc}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dotmoe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not a known user error: still one line, unless the traceback is asked for
        if os.environ.get("DOTMOE_TRACEBACK"):
            raise
        from dotmoe.errors import environment_error

        why = environment_error(exc)
        if why:  # a full disk or a read-only directory reached through a library (torch.save, safetensors, ...)
            print(f"dotmoe: error: {why}", file=sys.stderr)
            return 2
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"dotmoe: internal error: {type(exc).__name__}: {first} (a bug or an unchecked input; "
              "DOTMOE_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
