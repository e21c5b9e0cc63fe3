"""A small demo night with compressed calibrated frames against the same night in float32."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage
from workflow_helpers import read_stack, snakemake, write_config

from nightstack.io import COMPRESSED_HDU, read_catalog, read_json

pytestmark = pytest.mark.workflow

SMALL_DEMO = {"n_lights": 6, "width_px": 800, "height_px": 533}
FORMATS = ("float32", "compressed")


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    """{format: results/demo folder} of two runs differing only in output.calibrated_frames.

    The mean combine makes the stacks a linear function of the frames, so their difference is
    the quantisation alone (clipping flips at the odd pixel under any perturbation at all).
    """
    nights = {}
    for fmt in FORMATS:
        work = tmp_path_factory.mktemp(fmt)
        write_config(work, demo=SMALL_DEMO, stacking={"method": "mean"},
                     output={"calibrated_frames": fmt})
        snakemake(work, timeout=1800)
        nights[fmt] = work / "results" / "demo"
    return nights


def _sky_noise(image, sky):
    """Robust per-pixel noise (ADU) of a (C, H, W) image over the (H, W) sky mask."""
    values = image[:, sky]
    mad = np.median(np.abs(values - np.median(values, axis=1, keepdims=True)), axis=1)
    return 1.4826 * mad


def _sky_mask(stack):
    """Pixels far from stars and edges: luminance within 3 noise of the smooth background."""
    lum = stack.mean(axis=0)
    resid = lum - ndimage.median_filter(lum, 15)
    noise = 1.4826 * np.median(np.abs(resid))
    mask = ~ndimage.binary_dilation(np.abs(resid) > 3 * noise, iterations=4)
    mask[:20], mask[-20:], mask[:, :20], mask[:, -20:] = False, False, False, False
    return mask


def test_calibrated_frames_are_compressed_and_smaller(both_runs):
    sizes = {fmt: sum(p.stat().st_size for p in (both_runs[fmt] / "calibrated").glob("*.fits"))
             for fmt in FORMATS}
    ratio = sizes["float32"] / sizes["compressed"]
    assert 3.5 < ratio < 10, sizes
    frame = min((both_runs["compressed"] / "calibrated").glob("*.fits"))
    with fits.open(frame) as hdul:
        assert hdul[0].data is None and COMPRESSED_HDU in hdul and "LPMODEL" in hdul
        assert hdul[0].header["NSSTATUS"] == "ok"
        assert hdul[COMPRESSED_HDU].compression_type == "RICE_1"


def test_same_frames_accepted_and_same_stars(both_runs):
    sols = {fmt: read_json(both_runs[fmt] / "solution.json") for fmt in FORMATS}
    assert sols["float32"]["reference"] == sols["compressed"]["reference"]
    status = {fmt: [(f["frame"], f["status"]) for f in sols[fmt]["frames"]] for fmt in FORMATS}
    assert status["float32"] == status["compressed"]
    ref = sols["float32"]["reference"]
    a, b = (read_catalog(both_runs[fmt] / "stars" / f"{ref}.ecsv") for fmt in FORMATS)
    assert abs(len(a) - len(b)) <= 0.02 * len(a) + 1
    assert np.median(b["fwhm_px"]) == pytest.approx(np.median(a["fwhm_px"]), rel=3e-3)


def test_stack_matches_float32_within_a_small_fraction_of_the_noise(both_runs):
    plain = read_stack(both_runs["float32"] / "stack_linear.fits")
    packed = read_stack(both_runs["compressed"] / "stack_linear.fits")
    np.testing.assert_array_equal(np.isfinite(plain), np.isfinite(packed))
    sky = _sky_mask(np.nan_to_num(plain))
    assert sky.mean() > 0.3
    noise = _sky_noise(plain, sky)
    diff = (packed - plain)[:, sky]
    # one frame's quantisation error is noise / 55; the mean of 6 frames shrinks it as the noise
    assert np.all(np.std(diff, axis=1) < 0.03 * noise), np.std(diff, axis=1) / noise
    assert np.all(np.abs(np.mean(diff, axis=1)) < 0.01 * noise)  # no bias
    # quantisation alone: +0.02 %; weights and normalisation re-derived from the compressed
    # frames move it by up to +-0.2 % (benchmarks/README.md); the issue allows 1 %
    rise = _sky_noise(packed, sky) / noise - 1
    assert np.all(rise < 0.01), rise
