"""The scheduler fix: one pending re-evaluation timer per scheduler, not one per pass."""

import threading
import time

import pytest

from nightstack.scheduling import coalesce_reevaluation_timers


class FakeScheduler:
    """Snakemake's JobScheduler as far as the fix touches it: the semaphore its loop waits on
    and the method that re-arms the wake-up timer (Snakemake's own code, one timer a call)."""

    def __init__(self):
        self._open_jobs = threading.Semaphore(0)

    def _schedule_reevalutation(self, delay):
        threading.Timer(delay, lambda: self._open_jobs.release()).start()


def wake_ups(scheduler, passes: int, delay_s: float) -> int:
    """Re-arm ``passes`` times, wait for every timer, count the scheduler's wake-ups."""
    for _ in range(passes):
        scheduler._schedule_reevalutation(delay_s)
    time.sleep(delay_s + 0.3)
    count = 0
    while scheduler._open_jobs.acquire(blocking=False):
        count += 1
    return count


def test_one_pending_timer_per_scheduler_instead_of_one_per_pass():
    class Original(FakeScheduler):
        pass

    class Fixed(FakeScheduler):
        pass

    assert wake_ups(Original(), passes=20, delay_s=0.2) == 20  # the quadratic growth
    assert coalesce_reevaluation_timers(Fixed)
    assert coalesce_reevaluation_timers(Fixed)  # idempotent
    fixed = Fixed()
    assert wake_ups(fixed, passes=20, delay_s=0.2) == 1
    assert fixed._nightstack_reevaluation.daemon  # the process does not wait for it at exit
    assert wake_ups(fixed, passes=1, delay_s=0.2) == 1  # re-armed once the last one fired
    other = Fixed()  # timers are per scheduler
    other._schedule_reevalutation(0.2)
    fixed._schedule_reevalutation(0.2)
    time.sleep(0.5)
    assert other._open_jobs.acquire(blocking=False) and fixed._open_jobs.acquire(blocking=False)


def test_other_snakemake_versions_are_left_alone():
    class NoSuchMethod:
        pass

    assert not coalesce_reevaluation_timers(NoSuchMethod)
    assert not hasattr(NoSuchMethod, "_schedule_reevalutation")


def test_the_installed_snakemake_has_the_method_the_fix_replaces():
    job_scheduler = pytest.importorskip("snakemake.scheduling.job_scheduler")
    assert callable(getattr(job_scheduler.JobScheduler, "_schedule_reevalutation", None))
