"""A run killed with SIGKILL while stacking resumes where it stopped and gives the same stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits

from workflow_helpers import REPO, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow

SMALL_DEMO = {"n_lights": 6, "width_px": 800, "height_px": 533}


def _start(workdir):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2"]
    log = open(workdir / "run.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def _kill_when_stacking(proc, workdir, timeout_s=600):
    """SIGKILL the whole process group as soon as the stack job has started."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the workflow ended before the stack job started")
        if "rule stack:" in (workdir / "run.log").read_text():
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the stack job did not start in time")


def test_killed_run_resumes_and_equals_an_uninterrupted_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for work in (killed, clean):
        work.mkdir()
        write_config(work, demo=SMALL_DEMO)
    proc, log = _start(killed)
    try:
        _kill_when_stacking(proc, killed)
    finally:
        log.close()
    night = killed / "results" / "demo"
    # nothing half-written is left looking finished
    assert not (night / "stack.fits").exists()
    if (night / "stack_linear.fits").exists():
        fits.getdata(night / "stack_linear.fits")  # whole, if it made it before the kill
    # a kill leaves Snakemake's lock behind: --unlock, then the run picks up where it stopped
    snakemake(killed, "--unlock")
    jobs = planned_jobs(snakemake(killed, "-n"))
    assert "calibrate" not in jobs and "stars" not in jobs and "solve" not in jobs, jobs
    snakemake(killed)
    snakemake(clean)
    a = fits.getdata(killed / "results" / "demo" / "stack.fits")
    b = fits.getdata(clean / "results" / "demo" / "stack.fits")
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.nan_to_num(a), np.nan_to_num(b))
