"""Peak memory of `--mode layerwise` vs the joint mode on a model saved to disk (`/usr/bin/time -v`).

    python benchmarks/layerwise_memory.py --model DIR [--out benchmarks/results/layerwise_memory.md]

Without --model, a random ~0.5B Llama (hidden 1280, intermediate 5120, 22 layers, bf16, FFN-dominant) is saved
to a temporary directory first. Both runs use the bundled training sample, E=8, k=2, a short budget and no
export; the numbers are the maximum resident set size of the whole process (Python, torch and data included).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, str]:
    """(max RSS in MB, wall seconds, stderr tail) of a command run under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return rss, seconds, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="dense HF model directory (default: a random ~0.5B Llama)")
    parser.add_argument("--out", default="benchmarks/results/layerwise_memory.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from dotmoe_dev.bench import synthetic_pair

            dense, moe = synthetic_pair("0.5b", Path(tmp), 8, 2)
            shutil.rmtree(moe)
            model = dense
        cfg = json.loads((model / "config.json").read_text())
        weights_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1024**2
        layers = cfg["num_hidden_layers"]
        config = Path(tmp) / "c.yaml"
        config.write_text("calib_tokens: 2048\nseq_len: 256\nbatch_size: 4\nexport_format: none\neval_tokens: 512\n")
        base = [sys.executable, "-m", "dotmoe.cli", "convert", "--model", str(model), "--config", str(config)]
        rows = []
        for name, extra in (("layerwise (10 steps/layer)", ["--mode", "layerwise", "--layer-steps", "10", "--tokens",
                                                             "1"]),
                            ("joint (2 steps)", ["--tokens", "2048"])):
            rss, wall, _ = peak_rss_mb(base + extra + ["--out", str(Path(tmp) / name.split()[0])])
            rows.append(f"| {name} | {rss:,.0f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        f"`python benchmarks/layerwise_memory.py{' --model ' + args.model if args.model else ''}` on "
        f"{platform.machine()}; model: {layers} layers, hidden {cfg['hidden_size']}, intermediate "
        f"{cfg['intermediate_size']}, {weights_mb:,.0f} MB of bf16 safetensors "
        f"(one layer ~ {weights_mb / layers:,.0f} MB bf16, {2 * weights_mb / layers:,.0f} MB fp32). "
        "Peak = maximum resident set size of the whole process (/usr/bin/time -v).", "",
        "| mode | peak RSS MB | wall s |", "|---|---|---|", *rows])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
