#!/usr/bin/env bash
# Build llama.cpp's GGUF toolchain from the llama-cpp-python sdist on PyPI (CPU, ~7 min on 2 cores) into a
# separate venv. Usage: benchmarks/gguf/setup.sh [WORKDIR=.gguf]
# Do not install PyPI `gguf`: the converter needs the newer gguf-py vendored next to it (it finds it itself).
set -euo pipefail
WORK=${1:-.gguf}
VERSION=0.3.36
mkdir -p "$WORK"/sdist "$WORK"/src "$WORK"/wheels
python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/sdist"
tar xzf "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src"
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
  python3 -m pip wheel --no-deps "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" -w "$WORK/wheels"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install torch==2.13.0 transformers==5.23.0 safetensors numpy sentencepiece \
  "protobuf>=4.21.0,<5.0.0" tqdm pyyaml requests diskcache
"$WORK/venv/bin/pip" install "$WORK"/wheels/llama_cpp_python-$VERSION-*.whl
echo "converter: $WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
