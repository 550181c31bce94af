"""Keep the process's resident memory close to what torch holds: glibc's malloc otherwise keeps freed tensors.

glibc serves a large allocation with mmap (returned to the system on free) only above a threshold that it raises
each time such a block is freed, up to 32 MiB; after that, freed activations and logits of a few MiB stay in the
heap, and the peak RSS of a conversion measures the allocator's history, not the live tensors (SmolLM2 training:
RSS grew ~600 MB over one student forward whose live tensors are a few hundred MB). Fixing the threshold at 1 MiB
(mallopt M_MMAP_THRESHOLD, which also stops the dynamic adjustment) returns every large tensor on free. Nothing
else changes; elsewhere than glibc this does nothing.

That alone made training slow: every tensor of 1 MiB or more was a fresh mmap, and each of its 4 KiB pages a page
fault on first touch (SmolLM2 bf16 training, 3 steps from an --init-from start: 23 million minor faults, 55 s of
system time in an 84 s run). Two more settings remove most of them without giving back the RSS: torch's
transparent-huge-page allocation for blocks of 2 MiB or more (THP_MEM_ALLOC_ENABLE: one fault per 2 MiB page), and
a heap that keeps up to 1 GiB of freed small blocks instead of trimming and re-faulting them (M_TRIM_THRESHOLD, with
64 MiB of top pad). Either can be turned off for a comparison (THP_MEM_ALLOC_ENABLE=0, MALLOC_TRIM_THRESHOLD_=131072:
glibc's own settings win); `benchmarks/train_step_profile.py --env ...` measures it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20


def use_huge_pages() -> None:
    """torch's transparent-huge-page allocation for blocks of 2 MiB or more, unless THP_MEM_ALLOC_ENABLE is set. torch
    reads it at its first CPU allocation: the command line calls this before any, a library caller may set it itself."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def return_large_blocks_to_the_system() -> bool:
    """Set glibc's mmap threshold to 1 MiB for this process (and the two settings that keep it fast, module
    docstring); True when the threshold took effect."""
    use_huge_pages()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # glibc's own setting, when given, decides
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
            libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
