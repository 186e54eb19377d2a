"""The serving process's allocator setting: big buffers in their own mappings, given back when freed.

Owns one glibc `mallopt` call; other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 128 * 1024
"""Allocations of at least this many bytes get their own mapping (glibc's initial default)."""

_M_MMAP_THRESHOLD = -3  # <malloc.h>


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold at `threshold` instead of letting it grow; True when set.

    glibc raises the threshold (up to 32 MiB) each time a mapped block is freed, after which
    buffers of a few MiB come from the heap. A batch holding many big sub-responses then
    fragments the heap, and the process keeps pages its budget (`limits.max_buffered_bytes`)
    no longer counts: in the 40 x 10 MB test, peak RSS grew by 90-180 MiB instead of the 64 MiB
    budget. With the threshold fixed, a freed body goes back to the system at once. An operator's
    own `MALLOC_MMAP_THRESHOLD_` in the environment wins: then nothing is changed here.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols to look up, or not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
