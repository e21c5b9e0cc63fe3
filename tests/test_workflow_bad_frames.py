"""Frames that read fine but are bad or odd: each is rejected with its reason or repaired,
and the night still stacks (copies of real ALS frames, one workflow run)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import convolve1d

from conftest import shared_dataset
from nightstack.io import read_json

from test_workflow_faults import ALS, ALS_FRAMES, _header_for_rewrite, copy_good_frames
from workflow_helpers import snakemake, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.realdata]

SOURCE_FRAME = "Light_1264.fits"
SEESTAR = "seestar_ngc7023_s50"
SEESTAR_FRAME = "Light_NGC 7023_10.0s_IRCUT_20240730-224436.fit"
DUPLICATE = "Light_1069 (copy).fits"
OFFSET_ADU = 16.0  # the ASI224MC frames' zero level
TRAIL_ADU = 3000.0
TRAIL_SIGMA_PX = 1.2


def trail_line(shape, n: int = 400):
    """(x, y) points of the satellite's straight path across a frame of ``shape``."""
    height, width = shape
    x = np.linspace(40, width - 40, n)
    return x, 0.35 * x + 0.2 * height


def trail_image(shape) -> np.ndarray:
    """A straight satellite trail, Gaussian across, TRAIL_ADU at its centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    slope, intercept = 0.35, 0.2 * shape[0]
    distance = np.abs(slope * xx - yy + intercept) / np.hypot(slope, 1.0)
    inside = (xx >= 40) & (xx <= shape[1] - 40)
    return TRAIL_ADU * np.exp(-0.5 * (distance / TRAIL_SIGMA_PX) ** 2) * inside


def clouded(data: np.ndarray) -> np.ndarray:
    """Stars and sky dimmed to 4 % under a cloud lit by the town (a broad bright glow)."""
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]].astype(np.float64)
    glow = 900.0 * np.exp(-((xx - 0.3 * data.shape[1]) ** 2 + (yy - data.shape[0]) ** 2) / (2 * 600.0**2))
    light = 300.0 + glow
    shot = np.random.default_rng(7).normal(0.0, np.sqrt(light))  # the cloud's own photon noise
    return OFFSET_ADU + 0.04 * (data - OFFSET_ADU) + light + shot


def _write(dest, data, header, dtype=np.uint16):
    if dtype == np.uint16:
        data = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=np.asarray(data, dtype=dtype), header=header).writeto(dest)


@pytest.fixture(scope="module")
def bad_night(tmp_path_factory):
    source = shared_dataset(ALS)
    base = tmp_path_factory.mktemp("badframes")
    lights = base / "night" / "lights"
    copy_good_frames(source, lights)
    with fits.open(source / SOURCE_FRAME) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float64)
        hdr = _header_for_rewrite(hdul[0].header)
    # a meridian flip: the sensor turned half a turn (the 2x2 Bayer cell turns with it)
    flipped_hdr = hdr.copy()
    flipped_hdr["BAYERPAT"] = "BGGR"
    _write(lights / "flipped.fits", data[::-1, ::-1], flipped_hdr)
    _write(lights / "black.fits", np.zeros_like(data), hdr)
    _write(lights / "saturated.fits", np.full_like(data, 65535.0), hdr)
    # a mirror image is no rotation of this sky: it stands for a frame of another field
    _write(lights / "other_field.fits", data[:, ::-1], hdr)
    # wind: every star drawn into a 25 px streak
    trailed = convolve1d(data, np.full(25, 1 / 25), axis=1, mode="nearest")
    _write(lights / "trailed.fits", trailed, hdr)
    # dead columns and a corner of NaN/inf in a float frame: repaired, frame kept
    holes = data.copy()
    holes[:80, :120] = np.nan
    holes[200:210, 300] = np.inf
    _write(lights / "holes.fits", holes, hdr, dtype=np.float32)
    # thin cloud: stars dimmed to 4 %, a bright glow over the frame
    _write(lights / "clouds.fits", clouded(data), hdr)
    # a satellite crosses an otherwise good frame: kept, its trail removed by the clipping
    _write(lights / "satellite.fits", data + trail_image(data.shape), hdr)
    # the camera turned a quarter turn (portrait); rot90 of this RGGB mosaic is GBRG
    portrait_hdr = hdr.copy()
    portrait_hdr["BAYERPAT"] = "GBRG"
    _write(lights / "portrait.fits", np.rot90(data, 1), portrait_hdr)
    # the same file twice under another name
    shutil.copyfile(source / ALS_FRAMES[0], lights / DUPLICATE)
    # a frame from another camera (Seestar S50) slipped into the night
    shutil.copyfile(shared_dataset(SEESTAR) / SEESTAR_FRAME, lights / "other_camera.fit")
    work = base / "work"
    work.mkdir()
    write_config(work, nights={"bad": str(base / "night")})
    proc = snakemake(work, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sol = read_json(work / "results" / "bad" / "solution.json")
    return {"work": work, "frames": {r["frame"]: r for r in sol["frames"]}, "sol": sol}


def test_good_frames_and_repaired_ones_are_stacked(bad_night):
    frames = bad_night["frames"]
    for name in ALS_FRAMES:
        assert frames[name.removesuffix(".fits")]["status"] == "accepted"
    with fits.open(bad_night["work"] / "results" / "bad" / "stack.fits") as hdul:
        assert np.isfinite(hdul[0].data).all()
        assert hdul[0].header["NCOMBINE"] == bad_night["sol"]["n_accepted"]


def _roll_deg(rec):
    h = np.asarray(rec["H"])
    return np.degrees(np.arctan2(h[1, 0], h[0, 0]))


def test_meridian_flip_is_registered_at_half_a_turn(bad_night):
    flipped, good = bad_night["frames"]["flipped"], bad_night["frames"]["Light_1069"]
    assert flipped["status"] == "accepted", flipped
    turn = (_roll_deg(flipped) - _roll_deg(good)) % 360
    assert abs(turn - 180) < 1.0, turn


def test_frame_with_nan_and_inf_pixels_is_repaired(bad_night):
    rec = bad_night["frames"]["holes"]
    assert rec["status"] == "accepted", rec
    calibrated = fits.getdata(bad_night["work"] / "results" / "bad" / "calibrated" / "holes.fits")
    assert np.isfinite(calibrated).all()


@pytest.mark.parametrize(
    "frame, words",
    [
        ("black", ("stars",)),
        ("saturated", ("stars",)),
        ("other_field", ("reference",)),
        ("trailed", ("ellipticity",)),
        ("clouds", ("stars",)),
        ("portrait", ("976x1304", "quarter turn")),
        ("other_camera", ("Seestar S50", "ZWO CCD ASI224MC")),
    ],
)
def test_bad_frame_is_rejected_with_its_reason(bad_night, frame, words):
    rec = bad_night["frames"][frame]
    assert rec["status"] == "rejected", rec
    assert all(w.lower() in rec["reason"].lower() for w in words), rec["reason"]


def test_duplicate_file_is_stacked_once(bad_night):
    pair = [bad_night["frames"]["Light_1069"], next(r for r in bad_night["frames"].values() if r["file"] == DUPLICATE)]
    accepted = [r for r in pair if r["status"] == "accepted"]
    assert len(accepted) == 1, pair
    copy = next(r for r in pair if r["status"] != "accepted")
    assert copy["reason"] == f"duplicate of {accepted[0]['file']} (identical file content)", copy


def _trail_excess(image: np.ndarray, x: np.ndarray, y: np.ndarray, normal: np.ndarray) -> float:
    """Median brightness on a line minus the median 12 px either side of it (channel sum)."""
    lum = np.nansum(image, axis=0) if image.ndim == 3 else image

    def sample(dx, dy):
        xi, yi = np.rint(x + dx).astype(int), np.rint(y + dy).astype(int)
        ok = (xi >= 0) & (yi >= 0) & (xi < lum.shape[1]) & (yi < lum.shape[0])
        return lum[yi[ok], xi[ok]]

    beside = np.concatenate([sample(*(12 * normal)), sample(*(-12 * normal))])
    return float(np.median(sample(0, 0)) - np.median(beside))


def test_satellite_trail_is_removed_by_the_clipping(bad_night):
    rec = bad_night["frames"]["satellite"]
    assert rec["status"] == "accepted", rec
    res = bad_night["work"] / "results" / "bad"
    frame = fits.getdata(res / "calibrated" / "satellite.fits")
    x, y = trail_line(frame.shape[-2:])
    normal = np.array([0.35, -1.0]) / np.hypot(0.35, 1.0)
    in_frame = _trail_excess(frame, x, y, normal)
    assert in_frame > 1000, in_frame  # the trail really is in the calibrated frame
    # where the trail lies on the reference grid
    to_ref = np.linalg.inv(np.asarray(rec["H"]))
    pts = to_ref @ np.vstack([x, y, np.ones_like(x)])
    xr, yr = pts[0] / pts[2], pts[1] / pts[2]
    stack = fits.getdata(res / "stack_linear.fits")
    n = bad_night["sol"]["n_accepted"]
    left = _trail_excess(stack, xr, yr, normal)
    # a plain mean would keep in_frame / n (scaled to the reference's flux) along the line
    assert abs(left) < 0.1 * in_frame / n, (left, in_frame, n)
