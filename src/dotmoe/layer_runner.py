"""Run a causal LM's decoder one layer at a time over all calibration sequences, a chunk of sequences at a time.

A whole-model forward of the calibration tokens holds, at every layer, the transient activations of all of them
at once (attention scores, the FFN's [tokens, N] intermediates): on SmolLM2-135M the training-free conversion
peaked at 2.5 GB with 16k calibration tokens and 6.0 GB with 64k. Here only the hidden states [B, S, d] of all
sequences persist between layers; each layer runs on `chunk` sequences at a time, so memory grows with
tokens x d instead of tokens x N, and a layer can be processed on all tokens (partitioned, refitted) before the
layer above it runs. The calls are the ones the model's own forward makes (`layer_call_inputs`); tests check that
the stacked layers reproduce `decoder(input_ids)` on Llama, Qwen2 and Gemma-3 configs.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from dotmoe.errors import DotMoeError

CHUNK_SEQUENCES = 8  # sequences per layer call: 2,048 tokens at seq_len 256


def layer_call_inputs(rotary: nn.Module, config, hidden: torch.Tensor, positions: torch.Tensor,
                      num_layers: int) -> list[dict]:
    """Per decoder layer, the position embeddings and attention mask the model's own forward would pass.

    Models with `layer_types` (Gemma-3: sliding-window and global layers, each with its own mask; RoPE bases per
    type when the rotary embedding takes a `layer_type`) get their layer type's; others one causal mask for all
    (None under SDPA, which then masks causally itself, a tensor under eager attention)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    probe = hidden[:1]
    per_type_rope = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    per_type = {}
    for kind in set(layer_types):
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        mask = make(config=config, inputs_embeds=probe, attention_mask=None, past_key_values=None,
                    position_ids=positions)
        rope = rotary(probe, positions, kind) if per_type_rope else rotary(probe, positions)
        per_type[kind] = {"position_embeddings": rope, "attention_mask": mask}
    return [per_type[layer_types[i]] for i in range(num_layers)]


class _Caught(Exception):
    """Raised by `LayerRunner.feed`'s hook to stop a layer's forward once its target module's input is known."""


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerRunner:
    """The decoder of a causal LM as a list of layers to run one by one over `ids` [B, S] (see the module doc).

    `hidden` starts as the token embeddings; `run(i, hidden)` applies decoder layer i to every sequence, `chunk`
    sequences at a time, without gradients. Hooks registered on a layer's modules see one chunk per call."""

    def __init__(self, decoder: nn.Module, ids: torch.Tensor, chunk: int = CHUNK_SEQUENCES):
        missing = [a for a in ("embed_tokens", "layers", "rotary_emb") if not hasattr(decoder, a)]
        if missing:
            raise DotMoeError(f"{type(decoder).__name__} has no {', '.join(missing)}: layer-by-layer calibration "
                              "needs a Llama-style decoder (embed_tokens, layers, rotary_emb)")
        self.layers = list(decoder.layers)
        self.chunk = chunk
        device = next(decoder.parameters()).device
        self.positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
        with torch.no_grad():
            self.hidden = decoder.embed_tokens(ids.to(device))
            self.inputs = layer_call_inputs(decoder.rotary_emb, decoder.config, self.hidden, self.positions,
                                            len(self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def call(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i on one chunk of sequences [b, S, d] (the call the model's forward makes)."""
        return _output(self.layers[i](hidden, position_ids=self.positions, **self.inputs[i]))

    def run(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i's output [B, S, d] for the input hidden states [B, S, d], `chunk` sequences per call."""
        return torch.cat([self.call(i, h) for h in hidden.split(self.chunk)])

    def feed(self, i: int, hidden: torch.Tensor, module: nn.Module, fn) -> None:
        """Run layer i on `hidden` [B, S, d] a chunk at a time only up to `module` (one of its submodules, e.g. its
        FFN) and call `fn(x)` with the inputs [tokens, d'] `module` would receive; the rest of the layer (the module
        itself included) is skipped, since its output is not needed (the GPTQ-style "catcher")."""
        def catch(m, args):
            fn(args[0].reshape(-1, args[0].shape[-1]))
            raise _Caught

        hook = module.register_forward_pre_hook(catch)
        try:
            for h in hidden.split(self.chunk):
                try:
                    self.call(i, h)
                except _Caught:
                    pass
        finally:
            hook.remove()

    def run_capturing(self, i: int, hidden: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """`run(i, hidden)` and the inputs [tokens, d'] (fp32) that `module`, one of layer i's submodules (its FFN),
        received over all chunks."""
        xs: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(
            lambda m, args: xs.append(args[0].reshape(-1, args[0].shape[-1]).float()))
        try:
            out = self.run(i, hidden)
        finally:
            hook.remove()
        return out, torch.cat(xs)


@torch.no_grad()
def map_layer_inputs(model: nn.Module, mlps: list[nn.Module], batches: torch.Tensor, fn,
                     chunk: int = CHUNK_SEQUENCES, progress: bool = False) -> list:
    """[fn(i, x_i) for every MLP i], x_i [tokens, d] (fp32) its dense input on `batches` [B, S], layer by layer
    (`LayerRunner`): resident are the hidden states and one layer's inputs, not any layer's [tokens, N]
    activations for all tokens. `mlps[i]` must be the FFN of decoder layer i."""
    runner = LayerRunner(model.get_decoder(), batches, chunk)
    if len(mlps) != len(runner):
        raise DotMoeError(f"{len(mlps)} FFNs for {len(runner)} decoder layers: one FFN per layer expected")
    results: list = [None] * len(mlps)
    hidden = runner.hidden
    from tqdm import tqdm

    for i, mlp in enumerate(tqdm(mlps, desc="calibrate", unit="layer", disable=not progress)):
        hidden, x = runner.run_capturing(i, hidden, mlp)
        results[i] = fn(i, x)
        del x
    return results
