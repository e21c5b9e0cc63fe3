"""Logging set-up for one workflow step, and a clean exit on user-facing errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .errors import NightstackError
from .io import os_reason
from .process import limit_opencv_threads, reuse_freed_memory, single_threaded_blas

log = logging.getLogger("nightstack")


def configure(log_path=None, level=logging.INFO) -> logging.Logger:
    """Send nightstack's messages to the step's log file and to stderr."""
    log.handlers.clear()
    log.setLevel(level)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    # a log line that cannot be written (disk full) must not print a traceback of its own;
    # the step's own write fails a moment later with one clear line
    logging.raiseExceptions = False
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(sh)
    if log_path:
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_path, mode="w", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot write the log %s (%s); logging to the terminal only", log_path, exc.strerror or exc)
        else:
            fh.setFormatter(fmt)
            log.addHandler(fh)
    return log


def os_error_text(exc: OSError) -> str:
    """One line for a file-system failure: what, which file, why (disk full, read-only...)."""
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot read or write{where}: {os_reason(exc)}"


def run_step(func, *args, log_path=None, reuse_memory=False, job_threads=1, **kwargs):
    """Run a step; a NightstackError ends it with one clear line instead of a traceback.

    ``reuse_memory``: for steps that make many full-frame temporaries, keep freed memory in
    the process for reuse (nightstack.process.reuse_freed_memory). ``job_threads``: the
    threads the rule declares; OpenCV gets as many, BLAS one (nightstack.process).
    """
    configure(log_path)
    single_threaded_blas()
    limit_opencv_threads(job_threads)
    if reuse_memory:
        reuse_freed_memory()
    try:
        return func(*args, **kwargs)
    except NightstackError as exc:
        log.error("%s", exc)
        sys.exit(f"nightstack error: {exc}")
    except OSError as exc:
        log.error("%s", os_error_text(exc))
        sys.exit(f"nightstack error: {os_error_text(exc)}")


class Progress:
    """Logs 'label: i/n' about every 10 % so long per-frame steps show they are alive."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.next_pct = label, max(int(total), 1), 0, 10

    def expect(self, total: int) -> None:
        """Set the count to reach once it is known (the stack's tiles, after planning)."""
        self.total = max(int(total), 1)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        pct = 100 * self.done // self.total
        if pct >= self.next_pct or self.done == self.total:
            log.info("%s: %d/%d (%d%%)", self.label, self.done, self.total, pct)
            self.next_pct = (pct // 10 + 1) * 10
