"""Settings of a job's own process (not of the images it works on)."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt() parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(block_limit_bytes: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed blocks of up to ``block_limit_bytes`` for reuse
    instead of handing them back to the system. True when set; False where the C library has
    no such setting (not glibc): nothing changes then.

    Why: by default every block over 32 MB is mapped fresh from the system and unmapped when
    freed, so each full-frame temporary of a 24 MP frame (96 MB a plane) is faulted in page by
    page and zeroed by the kernel again. On the 2-core test machine that was 7-16 % of the
    calibrate, master and stack jobs (benchmarks/README.md). The cost: freed memory stays
    with the process until it exits; the peak resident size of those jobs did not change.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt
        return False
    limit = ctypes.c_int(min(int(block_limit_bytes), 2**31 - 1))
    # mallopt returns 0 for a setting it refuses (musl's is a stub that refuses them all)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
