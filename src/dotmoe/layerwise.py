"""`--mode layerwise`: convert one decoder layer at a time against cached dense inputs/outputs (low memory).

Only the embedding, one decoder layer and the calibration activations are in memory at any time: the model is
built on the meta device and each layer's weights are streamed from the safetensors files, run densely on the
cached hidden states (giving the layer's FFN inputs X and outputs Y, and the next layer's inputs), converted,
and dropped. Each layer's objective is output-aware: the relative error ||MoE(X) - Y||^2 / ||Y||^2 of the
MoE-ified FFN on its own dense inputs (+ router z-loss and load balancing), with the same OT assignment,
straight-through estimator and router as the joint mode. The result is a normal conversion output. After each
layer a checkpoint holds the finished layers and the next layer's inputs, so `--resume` redoes only the layer
in progress.

With `global_tokens > 0` an end-to-end KL phase follows: the layer-wise result is kept in `OUT/layerwise/` and
the joint mode continues from its partition and routers (`init_from`) into OUT. That phase loads the whole model
(it needs the memory of the joint mode); with `--resume`, a finished layer-wise pass is not redone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from dotmoe.architecture import check_checkpoint_names, check_model_dir, find_gated_mlps
from dotmoe.artifacts import save_conversion
from dotmoe.assignment import NeuronAssigner
from dotmoe.config import ConvertConfig
from dotmoe.data import TextFiles, tokenize_stream, training_sequences
from dotmoe.errors import DotMoeError, Interrupted
from dotmoe.export import TensorSource
from dotmoe.guards import check_seq_len
from dotmoe.layer_runner import layer_call_inputs
from dotmoe.losses import load_balancing_loss, router_z_loss
from dotmoe.moe_mlp import MoeMLP, recorded_routing
from dotmoe.record import ConversionRecord
from dotmoe.resume_guards import check_resume_settings, prepare_output, resume_key, settings_key
from dotmoe.run_dir import COMPLETE, LAYERWISE_CHECKPOINT, LAYERWISE_DIR
from dotmoe.stop_signals import stop_at_step_boundaries, stop_requested


def materialize_weights(module: torch.nn.Module, prefix: str, src: TensorSource) -> None:
    """Give a meta-device module real fp32 weights read from the checkpoint (names under `prefix`)."""
    module.to_empty(device="cpu").float()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(src.get(f"{prefix}.{name}").float())
        if hasattr(module, "scalar_embed_scale"):  # Gemma's sqrt(d) embedding scale: a buffer, not in checkpoints
            module.embed_scale.fill_(module.scalar_embed_scale)


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps the arenas of freed tensors mapped, so without this the
    resident memory of a layer-wise run grew by ~40 MB per layer on a 0.6B model (2.5 GB peak instead of 1.2);
    `malloc_trim` is glibc's own call for it. A no-op where it does not exist (macOS, musl)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def train_layer(cfg: ConvertConfig, mlp: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, caps: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """OT assignment + router for one FFN on its dense inputs x [T, d] and outputs y [T, d]."""
    from dotmoe.layer_setup import layer_partition, lstsq_router, partition_kind

    gen = torch.Generator().manual_seed(seed)
    part, router_init = layer_partition(partition_kind(cfg), mlp, x, caps, cfg.shared, gen, cfg.drop)
    moe = MoeMLP(mlp, cfg.experts, cfg.top_k, cfg.gating, shared=cfg.shared > 0, dropped=cfg.drop > 0)
    with torch.no_grad():
        if router_init is not None:  # the baseline's own router
            moe.router.weight.copy_(router_init)
        elif cfg.init_router != "random":
            moe.router.weight.copy_(lstsq_router(mlp, x, part, cfg.experts, cfg.router_fit_top_k))
    affinity = cfg.init_scale * torch.nn.functional.one_hot(part, len(caps)).float().unsqueeze(0)
    assigner = NeuronAssigner(affinity, caps, learn=cfg.learns_assignment, iters=cfg.sinkhorn_iters)
    groups = [{"params": [moe.router.weight], "lr": cfg.lr_router}]
    if assigner.learn:
        groups.append({"params": [assigner.affinity], "lr": cfg.lr_affinity})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    batch = cfg.batch_size * cfg.seq_len
    steps = cfg.layer_steps if cfg.trains_layers else 0
    first = last = None
    for step in range(steps):
        _stop_here(f"while training a layer (the finished ones are in {LAYERWISE_CHECKPOINT})")
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen)
        matrices, _ = assigner.refresh(cfg.tau_at(step, steps))
        moe.assignment = matrices[0]
        with recorded_routing([moe]) as routed:
            err = (moe(x[idx]) - y[idx]).pow(2).sum() / y[idx].pow(2).sum()
        loss = err + cfg.z_weight * router_z_loss(routed) + cfg.lb_weight * load_balancing_loss(routed)
        if not torch.isfinite(loss):
            raise DotMoeError(f"non-finite layer-wise loss at step {step}")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = float(err.detach())
        first = last if first is None else first
    with torch.no_grad():
        matrices, stats = assigner.refresh(cfg.tau_end)
        moe.assignment = matrices[0]
        final = float((moe(x) - y).pow(2).sum() / y.pow(2).sum())
    return stats.hard[0], moe.router.weight.detach().clone(), {"first_batch_error": first, "last_batch_error": last,
                                                             "final_error": final}


def _stop_here(where: str) -> None:
    """Stop (SIGINT/SIGTERM arrived) at this step boundary."""
    signum = stop_requested()
    if signum:
        raise Interrupted(signum, where)


def _resume_key(cfg: ConvertConfig) -> dict:
    """The settings a layer-wise checkpoint must match to be resumed (the global phase's tokens excepted)."""
    return resume_key(cfg, "global_tokens")


def _load_checkpoint(path: Path, cfg: ConvertConfig, num_layers: int) -> dict | None:
    """The layer-wise checkpoint at `path` (None when there is none), checked against this run's settings."""
    from dotmoe.checkpoints import load_checkpoint

    if not path.is_file():
        return None
    state = load_checkpoint(path)
    check_resume_settings(path, state.get("config"), _resume_key(cfg))
    lists = [state.get(k) for k in ("partitions", "routers", "stats")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1 or \
            not isinstance(state.get("hidden"), torch.Tensor):
        raise DotMoeError(f"--resume: {path} is damaged; rerun with --overwrite instead of --resume to start over")
    if not 0 < len(state["partitions"]) < num_layers:
        raise DotMoeError(f"--resume: {path} holds {len(state['partitions'])} layers, the model has {num_layers}")
    return state


def convert_layerwise(cfg: ConvertConfig, progress: bool = True):
    """Layer-wise conversion (see module doc), then the optional global KL phase; writes the same outputs as
    `convert` and exports."""
    from dotmoe.artifacts import mark_complete, read_record
    from dotmoe.conversion_result import ConvertResult, export_and_record
    from dotmoe.joint_recipe import convert_joint

    out = Path(cfg.out)
    if not cfg.global_tokens:
        partition, record = _layerwise_pass(cfg, out, progress)
        export_and_record(out, cfg, record, progress, check_tokens=0)
        mark_complete(out)  # last: only now is this a finished result
        (out / LAYERWISE_CHECKPOINT).unlink(missing_ok=True)
        return ConvertResult(out_dir=out, partition=partition, record=record)
    first = out / LAYERWISE_DIR
    if cfg.resume and (first / COMPLETE).is_file():  # a finished layer-wise pass is not redone, if it is this one
        saved = read_record(first).config or None  # None: a record from before settings were kept
        check_resume_settings(first, settings_key(saved, "global_tokens") if isinstance(saved, dict) else None,
                              _resume_key(cfg))
    else:
        _layerwise_pass(cfg, first, progress)  # returns before the joint phase loads the model: nothing held
        mark_complete(first)
        (first / LAYERWISE_CHECKPOINT).unlink(missing_ok=True)
    return convert_joint(cfg.global_phase(), progress)



class _LayerwiseInputs(NamedTuple):
    """What the layer-wise pass reads before it writes: the model (a meta skeleton, weights streamed from `src`),
    its gated MLPs, the calibration sequences."""

    model_path: Path
    config: object
    skeleton: torch.nn.Module
    named: list
    num_neurons: int
    calib: torch.Tensor
    src: TensorSource


def _load_and_check(cfg: ConvertConfig, out: Path) -> _LayerwiseInputs:
    """Model, tokenizer, data and every input weight checked (finite, named as the model expects), then the output
    prepared: nothing is written before every input passed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dotmoe.gguf_input import resolve_model
    from dotmoe.paths import default_data_file, reference_model_dir
    from dotmoe.prepare import calibration_sequences, check_eval_tokens, preflight

    texts = TextFiles(cfg.data or [str(default_data_file("train", cfg.model))])
    model_path = resolve_model(cfg.model or reference_model_dir())  # a .gguf: its dequantized HF directory
    check_model_dir(model_path, require_dense=True)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    config._attn_implementation = "sdpa"  # causal masking without a mask tensor
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    named = find_gated_mlps(skeleton)
    num_neurons = named[0][1].gate_proj.out_features
    warning = cfg.fit_shared_to_export(config.to_dict())
    if warning:
        print(warning, file=sys.stderr)
    cfg.validate_for(num_neurons)
    if len(tokenizer) > config.vocab_size:
        raise DotMoeError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}")
    check_seq_len(cfg.seq_len, config, "--seq-len")
    seqs = training_sequences(tokenizer, texts, cfg)
    calib = calibration_sequences(seqs, cfg)
    if cfg.global_tokens:  # the global phase's evaluation data, checked before hours of layer-wise work
        eval_texts = TextFiles(cfg.eval_data or [str(default_data_file("validation", cfg.model))])
        check_eval_tokens(len(tokenize_stream(tokenizer, eval_texts, cfg.eval_tokens)), cfg.eval_data)
    src = TensorSource(model_path, None)
    check_checkpoint_names(model_path, skeleton, src.names())
    for name in src.names():  # every input weight finite (streamed: one tensor at a time) before anything is written
        src.get(name)
        src.release()
    prepare_output(cfg.out, cfg.overwrite)  # every input is checked: only now may an --overwrite'n result go
    preflight(out, cfg, skeleton)
    return _LayerwiseInputs(model_path, config, skeleton, named, num_neurons, calib, src)


def _starting_state(cfg: ConvertConfig, got: _LayerwiseInputs, ckpt_path: Path):
    """(hidden states entering the next layer, partitions, routers, layer stats, next layer): the embeddings of
    the calibration sequences, or a --resume'd checkpoint's finished layers."""
    state = _load_checkpoint(ckpt_path, cfg, len(got.named)) if cfg.resume else None
    if state is not None:  # the finished layers' results and the hidden states entering the next layer
        return state["hidden"], state["partitions"], state["routers"], state["stats"], len(state["partitions"])
    embed = got.skeleton.get_input_embeddings()
    embed_name = next(n for n, p in got.skeleton.named_parameters() if p is embed.weight)
    materialize_weights(embed, embed_name.rsplit(".", 1)[0], got.src)
    got.src.release()
    with torch.no_grad():
        hidden = embed(got.calib).float()
    embed.to("meta")
    return hidden, [], [], [], 0


def _convert_layer(cfg: ConvertConfig, got: _LayerwiseInputs, i: int, hidden: torch.Tensor, positions, inputs,
                   caps: torch.Tensor):
    """Layer i: its weights loaded, run on `hidden` (its MLP's inputs and outputs recorded), its MLP converted
    (`train_layer`), its weights dropped; returns (the next layer's hidden states, partition, router, stats)."""
    mlp_name, mlp = got.named[i]
    layer_name = mlp_name.rsplit(".", 1)[0]
    layer = got.skeleton.get_submodule(layer_name)
    materialize_weights(layer, layer_name, got.src)
    got.src.release()  # keep only this layer's weights resident, not the checkpoint's mapped pages
    xs, ys = [], []
    hooks = [mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))),
             mlp.register_forward_hook(lambda m, a, o: ys.append(o.reshape(-1, o.shape[-1])))]
    with torch.no_grad():
        hidden = torch.cat([layer(h, position_ids=positions, **inputs) for h in hidden.split(8)])
    for h in hooks:
        h.remove()
    mlp.requires_grad_(False)
    part, router, stats = train_layer(cfg, mlp, torch.cat(xs), torch.cat(ys), caps, cfg.seed + i)
    layer.to("meta")  # drop this layer's weights
    del xs, ys
    return_freed_memory()
    return hidden, part, router, stats


def _layerwise_pass(cfg: ConvertConfig, out: Path, progress: bool) -> tuple[torch.Tensor, dict]:
    """The layer-by-layer conversion into `out` (partition, routers, metadata); returns (partition, record)."""
    from dotmoe.checkpoints import save_checkpoint

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    got = _load_and_check(cfg, out)
    named, ckpt_path = got.named, out / LAYERWISE_CHECKPOINT
    hidden, partitions, routers, layer_stats, start = _starting_state(cfg, got, ckpt_path)
    rotary = type(got.skeleton.get_decoder().rotary_emb)(config=got.config)
    positions = torch.arange(cfg.seq_len).unsqueeze(0)
    inputs = layer_call_inputs(rotary, got.config, hidden, positions, len(named))
    caps = torch.tensor(cfg.column_capacities(got.num_neurons))

    bar = tqdm(range(start, len(named)), desc="layerwise", unit="layer", disable=not progress, initial=start,
               total=len(named))
    stop_at_step_boundaries(True)  # a signal stops the run at the next step or after a checkpoint, never inside one
    for i in bar:
        hidden, part, router, stats = _convert_layer(cfg, got, i, hidden, positions, inputs[i], caps)
        partitions.append(part)
        routers.append(router)
        layer_stats.append(stats)
        if i + 1 < len(named):  # a crash loses at most the layer in progress
            save_checkpoint({"config": _resume_key(cfg), "hidden": hidden, "partitions": partitions,
                             "routers": routers, "stats": layer_stats}, ckpt_path)
            _stop_here(f"after layer {i} (checkpoint saved in {ckpt_path})")
    stop_at_step_boundaries(False)

    partition = torch.stack(partitions)
    record = ConversionRecord(
        method=cfg.method, mode="layerwise", experts=cfg.experts, top_k=cfg.top_k, shared=cfg.shared, drop=cfg.drop,
        gating=cfg.gating, capacities=caps.tolist(), intermediate_size=got.num_neurons, num_layers=len(named),
        mlp_modules=[n for n, _ in named], base_model=str(got.model_path.resolve()),
        train_tokens=len(named) * (cfg.layer_steps if cfg.trains_layers else 0) * cfg.batch_size * cfg.seq_len,
        calibration_tokens=got.calib.numel(), steps=cfg.layer_steps, processes=1,
        wall_seconds=round(time.time() - t0, 1), final_terms={}, layer_errors=layer_stats, config=cfg.to_dict())
    save_conversion(out, partition, routers, record)  # the checkpoint stays until the result is complete
    # the export that follows runs no parity check: it would load the whole model, which this mode avoids
    return partition, record
