"""Keep the process's resident memory close to what torch holds: glibc's malloc otherwise keeps freed tensors.

glibc serves a large allocation with mmap (returned to the system on free) only above a threshold that it raises
each time such a block is freed, up to 32 MiB; after that, freed activations and logits of a few MiB stay in the
heap, and the peak RSS of a conversion measures the allocator's history, not the live tensors (SmolLM2 training:
RSS grew ~600 MB over one student forward whose live tensors are a few hundred MB). Fixing the threshold at 1 MiB
(mallopt M_MMAP_THRESHOLD, which also stops the dynamic adjustment) returns every large tensor on free. Nothing
else changes; elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_system() -> bool:
    """Set glibc's mmap threshold to 1 MiB for this process; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
