"""The reference corpus: the Python 3.11 documentation in GNU info format (Debian `python3.11-doc`).

Split protocol: the info file is cut into its nodes (sections separated by the 0x1f byte); index
nodes are dropped; each node goes wholly to one split chosen by sha256(node name) mod 100:
0-1 -> validation, 2-3 -> test, else train. No node (and so no paragraph) is in two splits.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

from dotmoe.errors import DotMoeError

DEFAULT_INFO = Path("/usr/share/info/python3.11.info.gz")
_NODE_RE = re.compile(r"Node: ([^,\n]+)")
_SKIP_NODES = ("Index", "Python Module Index")


def read_info_nodes(path: Path = DEFAULT_INFO) -> list[tuple[str, str]]:
    """Return (node name, text) pairs of a GNU info file (.gz or plain)."""
    if not path.is_file():
        raise DotMoeError(f"corpus file {path} not found (install it: apt-get install python3.11-doc)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        raw = fh.read()
    nodes = []
    for chunk in raw.split("\x1f")[1:]:
        header, _, body = chunk.strip("\n").partition("\n")
        match = _NODE_RE.search(header)
        if not match or match.group(1).strip() in _SKIP_NODES or "Tag Table" in header:
            continue
        body = body.strip()
        if body:
            nodes.append((match.group(1).strip(), body))
    return nodes


def split_of(node_name: str) -> str:
    """Deterministic split of one node: 'validation', 'test' or 'train'."""
    bucket = int(hashlib.sha256(node_name.encode()).hexdigest(), 16) % 100
    return "validation" if bucket < 2 else "test" if bucket < 4 else "train"


def split_corpus(nodes: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Group node texts by split."""
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for name, text in nodes:
        out[split_of(name)].append(text)
    return out
