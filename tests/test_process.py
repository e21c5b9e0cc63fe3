"""nightstack.process: the job process's malloc setting and thread pools."""

import platform
import subprocess
import sys
import textwrap

import pytest

from nightstack import logs, process

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Resident memory of a process after it frees a 200 MB array, in a fresh interpreter each
# time (the setting lasts for the process, so it must not leak into the test session's).
FREED_RSS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nightstack.process import reuse_freed_memory

    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
    before = resident_mb()
    block = np.ones(50_000_000, dtype=np.float32)
    del block
    print(applied, resident_mb() - before)
    """
)


def _freed_block_kept_mb(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", FREED_RSS, mode], capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied, float(kept)


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")
def test_freed_full_frame_blocks_stay_in_the_process_for_reuse():
    applied, kept_mb = _freed_block_kept_mb("reuse")
    _, default_kept_mb = _freed_block_kept_mb("default")
    assert applied == "True"
    assert kept_mb > 150  # the 200 MB block stays mapped, ready for the next temporary
    assert default_kept_mb < 50  # without it glibc unmaps the block at once


def test_without_mallopt_nothing_is_changed(monkeypatch):
    def no_c_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(process.ctypes, "CDLL", no_c_library)
    assert process.reuse_freed_memory() is False


def test_a_refused_setting_is_reported(monkeypatch):
    class Refusing:
        @staticmethod
        def mallopt(param, value):
            return 0

    monkeypatch.setattr(process.ctypes, "CDLL", lambda name: Refusing)
    assert process.reuse_freed_memory() is False


def test_run_step_applies_it_only_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(logs, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(logs, "single_threaded_blas", lambda: 1)
    monkeypatch.setattr(logs, "limit_opencv_threads", lambda n: None)
    assert logs.run_step(lambda x: x + 1, 1, log_path=tmp_path / "a.log") == 2
    assert calls == []
    assert logs.run_step(lambda x: x + 1, 1, log_path=tmp_path / "b.log", reuse_memory=True) == 2
    assert calls == [1]


# BLAS thread pools of a fresh interpreter after single_threaded_blas: numpy's, loaded before
# the call, and scipy's, loaded after it (scipy.linalg brings its own OpenBLAS).
BLAS_POOLS = textwrap.dedent(
    """
    import json, os
    from nightstack.process import single_threaded_blas
    limited = single_threaded_blas()
    import scipy.linalg
    from threadpoolctl import threadpool_info
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    print(json.dumps({"limited": limited, "threads": [p["num_threads"] for p in pools],
                      "libraries": sorted({p["filepath"] for p in pools})}))
    """
)


def test_blas_runs_on_one_thread_also_when_loaded_later():
    import json
    import os

    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")  # as a caller (the benchmark) may set it
    out = subprocess.run([sys.executable, "-c", BLAS_POOLS], capture_output=True, text=True,
                         check=True, env=env)
    pools = json.loads(out.stdout)
    assert pools["limited"] >= 1 and pools["threads"]
    assert set(pools["threads"]) == {1}, pools


def test_opencv_gets_the_jobs_threads():
    code = "import cv2; from nightstack.process import limit_opencv_threads as f; f(1); a = cv2.getNumThreads(); f(2); print(a, cv2.getNumThreads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2"]


def test_run_step_sets_the_thread_pools_for_the_job(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(logs, "single_threaded_blas", lambda: calls.append("blas") or 1)
    monkeypatch.setattr(logs, "limit_opencv_threads", lambda n: calls.append(("opencv", n)))
    logs.run_step(lambda: None, log_path=tmp_path / "a.log")
    logs.run_step(lambda threads: threads, log_path=tmp_path / "b.log", job_threads=2, threads=2)
    assert calls == ["blas", ("opencv", 1), "blas", ("opencv", 2)]
