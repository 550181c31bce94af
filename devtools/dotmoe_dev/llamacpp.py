"""llama.cpp's own GGUF converter, run on an export (the helpers of benchmarks/gguf/): which converter it is (its
file hash, the vendored gguf-py and llama.cpp commit), and a conversion through `benchmarks/gguf/convert_pretok.py`
(the converter unmodified, plus the pre-tokenizer mapping it needs for our tokenizers)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CONVERT_PRETOK = Path(__file__).resolve().parents[2] / "benchmarks" / "gguf" / "convert_pretok.py"
DEFAULT_CONVERTER = Path(os.environ.get("GGUF_WORK", ".gguf")) / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"


def converter_info(conv: Path) -> dict:
    info: dict = {"converter": str(conv)}
    info["converter_sha256"] = hashlib.sha256(conv.read_bytes()).hexdigest()[:16]
    pyproj = conv.parent / "gguf-py" / "pyproject.toml"
    if pyproj.is_file():
        m = re.search(r'^version\s*=\s*"([^"]+)"', pyproj.read_text(), re.M)
        info["vendored_gguf_py"] = (m.group(1) if m else "?") + f" ({pyproj.parent})"
    # llama-cpp-python sdist: CHANGELOG records the vendored llama.cpp commit
    for parent in conv.parents:
        cl = parent / "CHANGELOG.md"
        pk = parent / "PKG-INFO"
        if cl.is_file() and pk.is_file():
            ver = re.search(r"^Version:\s*(\S+)", pk.read_text(), re.M)
            info["llama_cpp_python_sdist"] = f"{ver.group(1) if ver else '?'} ({parent})"
            txt = cl.read_text()
            if ver:
                sec = re.search(r"^## \[" + re.escape(ver.group(1)) + r"\](.*?)(?=^## \[)", txt, re.M | re.S)
                txt = sec.group(1) if sec else txt
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", txt)
            if m:
                info["llama_cpp_commit_changelog"] = m.group(1)
            break
    if (conv.parent / ".git").exists():
        try:
            info["llama_cpp_commit_git"] = subprocess.run(
                ["git", "-C", str(conv.parent), "rev-parse", "HEAD"],
                capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            pass
    return info


def run_conversion(args, outfile: Path) -> None:
    cmd = [sys.executable, str(CONVERT_PRETOK), "--converter", str(args.converter)]
    if args.tokenizer_pre:
        cmd += ["--tokenizer-pre", args.tokenizer_pre]
    cmd += ["--", str(args.model), "--outtype", args.outtype, "--outfile", str(outfile)]
    print("[convert] " + " ".join(cmd), flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    notes = [ln for ln in log.splitlines()
             if "convert_pretok" in ln or "chkhsh:" in ln or "tokenizer.ggml.pre" in ln]
    for ln in notes:
        print("[convert] " + ln.strip())
    if p.returncode != 0 or not outfile.is_file():
        print("\n".join(log.splitlines()[-40:]), file=sys.stderr)
        print(f"[convert] FAILED (rc={p.returncode})", file=sys.stderr)
        sys.exit(2)
    print(f"[convert] ok in {time.time() - t0:.1f}s -> {outfile} ({outfile.stat().st_size / 1e6:.2f} MB)")
