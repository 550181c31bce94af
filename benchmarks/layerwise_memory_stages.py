"""Resident memory per stage of a layer-wise conversion (where the peak of `layerwise_memory.py` goes).

    python benchmarks/layerwise_memory_stages.py --model DIR [--no-trim]

RSS is sampled every 10 ms by a thread and printed at each stage boundary (imports, data + meta skeleton, each
layer materialized and trained), with the peak so far. Same settings as the layer-wise row of
`layerwise_memory.py`; nothing is exported. `--no-trim` skips handing freed heap pages back to the OS after each
layer (`return_freed_memory`), to see what that call saves.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dense HF model directory")
    parser.add_argument("--no-trim", action="store_true", help="do not return freed heap pages after each layer")
    args = parser.parse_args()
    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()

    def mark(stage: str) -> None:
        print(f"| {stage} | {rss_mb():,.0f} | {max(peak[0], rss_mb()):,.0f} |", flush=True)

    print("| stage | RSS MB | peak so far MB |\n|---|---|---|")
    mark("start")
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dotmoe.layerwise as layerwise
    import dotmoe.prepare as prepare
    from dotmoe.convert import convert
    from dotmoe.config import ConvertConfig
    mark("imports (torch, transformers, dotmoe)")

    materialize, train_layer, preflight = layerwise.materialize_weights, layerwise.train_layer, prepare.preflight

    def traced_materialize(module, prefix, src):
        materialize(module, prefix, src)
        mark(f"materialized {prefix}")

    def traced_train_layer(*a, **k):
        result = train_layer(*a, **k)
        mark("trained it")
        return result

    def traced_preflight(*a, **k):
        mark("tokenized data + meta skeleton")
        return preflight(*a, **k)

    layerwise.materialize_weights, layerwise.train_layer, prepare.preflight = (traced_materialize, traced_train_layer,
                                                                         traced_preflight)
    if args.no_trim:
        layerwise.return_freed_memory = lambda: None
    with tempfile.TemporaryDirectory() as out:
        cfg = ConvertConfig(model=args.model, out=out, mode="layerwise", layer_steps=10, tokens=1, calib_tokens=2048,
                            seq_len=256, batch_size=4, export_format="none", eval_tokens=512)
        convert(cfg, progress=False)
    mark("done")


if __name__ == "__main__":
    main()
