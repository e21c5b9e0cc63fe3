"""Frames that read fine but are bad or odd: each is rejected with its reason or repaired,
and the night still stacks (copies of real ALS frames, one workflow run)."""

from __future__ import annotations

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
    ],
)
def test_bad_frame_is_rejected_with_its_reason(bad_night, frame, words):
    rec = bad_night["frames"][frame]
    assert rec["status"] == "rejected", rec
    assert any(w in rec["reason"].lower() for w in words), rec["reason"]
