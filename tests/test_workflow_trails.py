"""Star-trail mode through the workflow on the Canon 40D tripod frames (no registration)."""

import numpy as np
import pytest
from astropy.io import fits

from conftest import shared_dataset
from nightstack.io import read_json
from nightstack.trails import sky_levels

from workflow_helpers import planned_jobs, snakemake, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.realdata]


def test_trails_mode_streams_a_lighten_stack(tmp_path):
    folder = shared_dataset("startrail_canon40d_trees")
    write_config(tmp_path, nights={"trees": str(folder)}, mode="trails")
    jobs = planned_jobs(snakemake(tmp_path, "-n"))
    assert "pose" not in jobs and "solve" not in jobs and jobs.get("trails") == 1, jobs
    snakemake(tmp_path)
    night = tmp_path / "results" / "trees"
    with fits.open(night / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 6
        assert "trails" in hdul[0].header["STACKMTH"]
    trails = fits.getdata(night / "stack_trails.fits").astype(float)
    info = read_json(night / "stack_trails.json")
    assert len(info["frames"]) == 6
    # lighten: never below any frame brought to the common sky level
    sky = np.asarray(info["info"]["mean_sky"], float)[:, None, None]
    for path in sorted((night / "calibrated").glob("*.fits")):
        frame = fits.getdata(path).astype(float)
        level = sky_levels(frame)[:, None, None]
        assert np.all(trails >= frame - level + sky - 1e-3)
