"""A fix for Snakemake's scheduler on nights of many jobs (called from rules/common.smk).

Snakemake 8.17 to 9.x (``--max-jobs-per-timespan``, default 100/1s) ends every scheduling pass
that leaves jobs running by starting a new ``threading.Timer`` that wakes the scheduler one
timespan later, to submit what the rate limit held back. A pass woken by such a timer starts
another, and every finished job starts one more: after k finished jobs about k timers are
pending at any time, each waking the scheduler once a second. Every wake-up is a full pass
over the ready jobs, so the Snakemake process's own work grows with the square of the night:
on 500 frames (about 1,500 jobs) it took a quarter to half of one of the two cores.

``coalesce_reevaluation_timers`` keeps at most one such timer pending per scheduler, which
still wakes it within one timespan of any pass (all the rate limit needs), and makes the
timer a daemon thread so the process does not wait for it at exit.
"""

from __future__ import annotations

import threading

_PATCHED_FLAG = "_nightstack_coalesced"


def _schedule_one_reevaluation(scheduler, delay: float) -> None:
    """Start a timer that releases ``scheduler._open_jobs`` after ``delay`` s, unless one
    started by this function is still pending."""
    pending = getattr(scheduler, "_nightstack_reevaluation", None)
    if pending is not None and pending.is_alive():
        return
    timer = threading.Timer(delay, scheduler._open_jobs.release)
    timer.daemon = True
    scheduler._nightstack_reevaluation = timer
    timer.start()


def coalesce_reevaluation_timers(scheduler_class=None) -> bool:
    """Replace ``JobScheduler._schedule_reevalutation`` (Snakemake's spelling) of
    ``scheduler_class`` (default: Snakemake's own) by ``_schedule_one_reevaluation``.

    Returns True when the method is (now or already) replaced, False when the class has no
    such method (another Snakemake version: nothing is changed).
    """
    if scheduler_class is None:
        try:
            from snakemake.scheduling.job_scheduler import (
                JobScheduler as scheduler_class,
            )
        except ImportError:
            return False
    if getattr(scheduler_class, _PATCHED_FLAG, False):
        return True
    if not callable(getattr(scheduler_class, "_schedule_reevalutation", None)):
        return False
    scheduler_class._schedule_reevalutation = _schedule_one_reevaluation
    setattr(scheduler_class, _PATCHED_FLAG, True)
    return True
