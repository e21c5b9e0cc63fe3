"""The whole workflow on the demo night: accuracy against the generator's truth, noise, sharpness,
outputs, and which jobs rerun when a setting changes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import yaml
from astropy.io import fits
from PIL import Image

from nightstack.camera import apply_homography
from nightstack.io import read_fits_image, read_json

from workflow_helpers import REPO, night_fwhm_figures, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    write_config(work)
    snakemake(work, timeout=2400)
    return work


def test_outputs_exist_and_are_well_formed(demo_run):
    night = demo_run / "results" / "demo"
    with fits.open(night / "stack.fits") as hdul:
        data, hdr = hdul[0].data, hdul[0].header
        assert data.dtype.kind == "f" and data.dtype.itemsize == 4 and data.shape == (3, 1066, 1600)
        assert "COVERAGE" in hdul
    sol = read_json(night / "solution.json")
    accepted = [f for f in sol["frames"] if f["status"] == "accepted"]
    assert hdr["NCOMBINE"] == len(accepted) == 16
    assert hdr["EXPTIME"] == pytest.approx(16 * 20.0)
    assert "nightstack" in str(hdr.get("SOFTWARE", "")) + str(hdr.get("NSVER", ""))
    tif = tifffile.imread(night / "stack.tif")
    assert tif.dtype == np.uint16 and tif.shape[:2] == (1066, 1600)
    png = Image.open(night / "stack.png")
    assert png.size == (1600, 1066)
    for kind in ("bias", "dark", "flat"):
        assert (night / "masters" / f"{kind}.fits").is_file()
    # calibrated_frames: auto; 16 x 1.7 MP is far under the float32 limit
    with fits.open(night / "calibrated" / f"{sol['reference']}.fits") as hdul:
        assert hdul[0].data.shape == (3, 1066, 1600) and hdul[0].data.dtype.itemsize == 4


def test_every_homography_matches_truth(demo_run):
    truth = read_json(demo_run / "resources" / "demo-night" / "truth.json")
    sol = read_json(demo_run / "results" / "demo" / "solution.json")
    true_h = {f"light_{t['index']:03d}": np.asarray(t["H"]) for t in truth["frames"]}
    ref = sol["reference"]
    xs, ys = np.meshgrid(np.linspace(0, 1599, 33), np.linspace(0, 1065, 23))
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    errors = {}
    for rec in sol["frames"]:
        # truth maps frame-0 pixels; ours map reference pixels
        h_true = true_h[rec["frame"]] @ np.linalg.inv(true_h[ref])
        d = apply_homography(np.asarray(rec["H"]), grid) - apply_homography(h_true, grid)
        errors[rec["frame"]] = float(np.sqrt(np.mean(np.sum(d**2, axis=1))))
    assert max(errors.values()) <= 0.05, errors


def _aperture_noise(image2d, mask_stars, n=600, radius=3, seed=0):
    """Std of background-subtracted sums in circular apertures placed on empty sky.

    Each aperture (radius px) loses the median of its own annulus (7-12 px), as in aperture
    photometry, so slow sky variations do not count as noise.
    """
    rng = np.random.default_rng(seed)
    h, w = image2d.shape
    yy, xx = np.mgrid[-12:13, -12:13]
    rr = np.hypot(xx, yy)
    disk, annulus = rr <= radius, (rr >= 7) & (rr <= 12)
    sums = []
    tries = 0
    while len(sums) < n and tries < n * 80:
        tries += 1
        x, y = rng.integers(100, w - 100), rng.integers(100, h - 100)
        cut = (slice(y - 12, y + 13), slice(x - 12, x + 13))
        if mask_stars[cut].any():
            continue
        stamp = image2d[cut]
        sums.append(stamp[disk].sum() - np.median(stamp[annulus]) * disk.sum())
    assert len(sums) == n, "not enough empty sky"
    return float(np.std(sums))


def _star_mask(image2d):
    """Stars (3 sigma above a 15 px median) grown by 4 px."""
    from scipy.ndimage import binary_dilation, median_filter

    resid = image2d - median_filter(image2d, 15)
    sub = resid[::5, ::5]
    sigma = 1.4826 * np.median(np.abs(sub - np.median(sub)))
    return binary_dilation(resid > 3 * sigma, iterations=4)


def test_noise_falls_with_frame_count(demo_run):
    night = demo_run / "results" / "demo"
    with fits.open(night / "stack_linear.fits") as hdul:
        stack = np.asarray(hdul[0].data, dtype=np.float64).mean(axis=0)
    sol = read_json(night / "solution.json")
    single = np.asarray(read_fits_image(night / "calibrated" / f"{sol['reference']}.fits")[0],
                        dtype=np.float64).mean(axis=0)
    # the stack shows faint stars the single frame hides: mask stars found in either
    stars = _star_mask(stack) | _star_mask(single)
    n = sol["n_accepted"]
    ratio = _aperture_noise(single, stars) / _aperture_noise(stack, stars)
    assert ratio >= 0.9 * np.sqrt(n), ratio


def test_stack_is_as_sharp_as_the_frames(demo_run):
    stack_fwhm, best, median = night_fwhm_figures(demo_run / "results", "demo")
    assert stack_fwhm <= 1.08 * median, (stack_fwhm, best, median)


def test_changing_stacking_reruns_only_stack(demo_run):
    write_config(demo_run, stacking={"method": "mean"})
    jobs = planned_jobs(snakemake(demo_run, "-n"))
    # the output rules: the images and the report plots made from them
    assert set(jobs) - {"all"} == {"stack", "outputs", "plots"}, jobs


def test_changing_star_detection_reruns_from_stars(demo_run):
    write_config(demo_run, stars={"detect_sigma": 6.0})
    jobs = planned_jobs(snakemake(demo_run, "-n"))
    assert "calibrate" not in jobs and "master" not in jobs and "demo_night" not in jobs, jobs
    assert jobs.get("stars") == 16 and {"pose", "solve", "stack", "outputs"} <= set(jobs), jobs
    write_config(demo_run)


def test_local_runs_use_the_greedy_scheduler(tmp_path):
    # Snakemake's default ILP scheduler solved an integer program at every job end: on a
    # 500-frame night that was minutes of CPU. The workflow profile next to the Snakefile
    # turns it off for every local run, and the cluster profile does the same.
    write_config(tmp_path, demo={"n_lights": 4, "width_px": 200, "height_px": 150})
    proc = snakemake(tmp_path, "-n")
    assert "profiles/default for setting default command line arguments" in proc.stdout + proc.stderr
    for profile in ("default", "slurm"):
        settings = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
        assert settings["scheduler"] == "greedy", profile


def test_landscape_demo_night_is_generated_with_its_truth_mask(tmp_path):
    small = {"landscape": True, "n_lights": 6, "width_px": 400, "height_px": 300}
    write_config(tmp_path, demo=small)
    plan = planned_jobs(snakemake(tmp_path, "-n"))
    assert plan["demo_night"] == 1 and plan["calibrate"] == 6
    snakemake(tmp_path, "resources/demo-night/truth.json")
    night = tmp_path / "resources" / "demo-night"
    truth = read_json(night / "truth.json")
    mask = np.asarray(Image.open(night / truth["landscape"]["sky_mask"]))
    assert mask.shape == (300, 400)
    assert np.mean(mask == 0) == pytest.approx(truth["landscape"]["ground_fraction"])
    # Once generated, the folder scan still finds the same six lights and ignores nothing.
    again = snakemake(tmp_path, "-n")
    plan = planned_jobs(again)
    assert plan["calibrate"] == 6 and "demo_night" not in plan
    assert "ignoring files" not in again.stdout + again.stderr
