"""Settings of a job's own process (not of the images it works on)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt() parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# read by a BLAS library when it loads
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


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


def single_threaded_blas() -> int:
    """Run the BLAS libraries of this process (OpenBLAS under numpy and scipy) on one thread
    for the rest of the process: those loaded now through threadpoolctl, those loaded later
    (scipy's own OpenBLAS comes with scipy.linalg) through OPENBLAS_NUM_THREADS and its
    kin, which a BLAS reads when it loads. Returns the number of loaded BLAS libraries limited.

    Why: the workflow's parallelism is its jobs (and the stack job's own reading thread),
    and its BLAS calls are small (3x3 homographies on a tile's pixels, 6x6 normal equations).
    OpenBLAS answers each of them with a thread per core that then keeps spinning, waiting
    for more work: on the 2-core test machine that took 44 s of CPU from a 24 MP stack job's
    two threads (user time 121 s -> 84 s, wall time 66 s -> 50 s; benchmarks/README.md).
    """
    import numpy  # noqa: F401  (loads numpy's BLAS, so that it is limited here too)
    from threadpoolctl import threadpool_info, threadpool_limits

    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = "1"
    loaded = [pool for pool in threadpool_info() if pool.get("user_api") == "blas"]
    if loaded:
        threadpool_limits(limits=1, user_api="blas")
    return len(loaded)


def limit_opencv_threads(n_threads: int) -> None:
    """OpenCV's own thread pool to ``n_threads`` (its default is one thread per core).

    A job declares its threads to the scheduler, which runs jobs side by side on the other
    cores: two 24 MP calibrate jobs at once took 5.25 s each with OpenCV on every core and
    5.0 s with one thread each, the stars jobs 3.7 s and 3.45 s.
    """
    import cv2

    cv2.setNumThreads(max(1, int(n_threads)))
