"""Calibration frames that do not fit: a stray bias of another size is dropped, darks of
another exposure and temperature are scaled on the hot pixels they share with the lights,
a flat with zeros is repaired, and masters that fit no light stop the night with one clear
line. Lights are copies of real ALS M27 frames (ASI224MC, RGGB, 6 s, zero level 16 ADU);
the calibration frames are generated with known hot pixels and temperatures.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from astropy.io import fits

from conftest import shared_dataset
from nightstack.io import read_json

from test_workflow_faults import ALS, ALS_FRAMES, _header_for_rewrite
from workflow_helpers import snakemake, write_config

pytestmark = [pytest.mark.workflow, pytest.mark.realdata]

WIDTH, HEIGHT = 1304, 976
OFFSET_ADU = 16.0
LIGHT_TEMP_C, DARK_TEMP_C = -10.0, 5.0
# dark current doubles about every 6.5 degC: 15 degC warmer is x4.9, and the darks are
# exposed twice as long as the lights, so the true dark-to-light scale is 1 / (2 * 4.9)
TEMPERATURE_FACTOR = 2.0 ** (15.0 / 6.5)
TRUE_DARK_SCALE = 1.0 / (2.0 * TEMPERATURE_FACTOR)
N_HOT = 400
ZERO_BLOCK = (slice(500, 508), slice(600, 608))


def _hot_pixels(seed: int = 11):
    rng = np.random.default_rng(seed)
    ys = rng.integers(10, HEIGHT - 10, N_HOT)
    xs = rng.integers(10, WIDTH - 10, N_HOT)
    light_adu = rng.uniform(150, 1500, N_HOT)
    return ys, xs, light_adu


def _header(kind: str, exptime_s: float, temp_c: float | None, pattern: str = "RGGB") -> fits.Header:
    hdr = fits.Header()
    hdr["INSTRUME"] = "ZWO CCD ASI224MC"
    hdr["IMAGETYP"] = kind
    hdr["EXPTIME"] = exptime_s
    hdr["BAYERPAT"] = pattern
    if temp_c is not None:
        hdr["CCD-TEMP"] = temp_c
    return hdr


def _write_u16(path, data, header) -> None:
    fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16), header).writeto(path)


def _bias(rng, shape=(HEIGHT, WIDTH)):
    return OFFSET_ADU + rng.normal(0, 2.0, shape)


def write_lights(source, lights, names, hot) -> None:
    """Copies of ALS lights taken at LIGHT_TEMP_C with the sensor's hot pixels in them."""
    ys, xs, light_adu = hot
    lights.mkdir(parents=True)
    for name in names:
        with fits.open(source / name) as hdul:
            data = np.asarray(hdul[0].data, dtype=np.float64)
            hdr = _header_for_rewrite(hdul[0].header)
        data[ys, xs] += light_adu
        hdr["CCD-TEMP"] = LIGHT_TEMP_C
        _write_u16(lights / name, data, hdr)


def write_biases(folder, n: int, rng, shape=(HEIGHT, WIDTH), pattern="RGGB", prefix="bias") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _write_u16(folder / f"{prefix}_{i}.fits", _bias(rng, shape), _header("Bias", 0.0, DARK_TEMP_C, pattern))


def write_darks(folder, n: int, rng, hot, shape=(HEIGHT, WIDTH)) -> None:
    """12 s darks at DARK_TEMP_C: the lights' hot pixels, 2 x TEMPERATURE_FACTOR brighter."""
    ys, xs, light_adu = hot
    folder.mkdir(parents=True)
    for i in range(n):
        dark = _bias(rng, shape) + 3.0
        if shape == (HEIGHT, WIDTH):
            dark[ys, xs] += light_adu / TRUE_DARK_SCALE
        _write_u16(folder / f"dark_{i}.fits", dark, _header("Dark", 12.0, DARK_TEMP_C))


def write_flats(folder, n: int, rng, pattern="RGGB", zeros=False) -> None:
    """Vignetted flats (20,000 ADU in the centre); with ``zeros`` a dead 8x8 block reads 0."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    r2 = ((xx - WIDTH / 2) ** 2 + (yy - HEIGHT / 2) ** 2) / (WIDTH / 2) ** 2
    level = 20000.0 * (1 - 0.25 * r2)
    for i in range(n):
        flat = OFFSET_ADU + rng.normal(level, np.sqrt(level))
        if zeros:
            flat[ZERO_BLOCK] = 0
        _write_u16(folder / f"flat_{i}.fits", flat, _header("Flat", 1.0, DARK_TEMP_C, pattern))


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory):
    source = shared_dataset(ALS)
    base = tmp_path_factory.mktemp("calfaults")
    rng = np.random.default_rng(5)
    hot = _hot_pixels()
    night = base / "calfaults"
    write_lights(source, night / "lights", ALS_FRAMES[:3], hot)
    write_biases(night / "biases", 4, rng)
    write_biases(night / "biases", 1, rng, shape=(800, 1000), prefix="odd")
    write_darks(night / "darks", 3, rng, hot)
    write_flats(night / "flats", 3, rng, zeros=True)
    work = base / "work"
    work.mkdir()
    write_config(work, nights={"calfaults": str(night)})
    proc = snakemake(work, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = work / "results" / "calfaults"
    return {"res": res, "hot": hot, "sol": read_json(res / "solution.json")}


def test_every_light_is_calibrated_and_stacked(calibration_run):
    sol = calibration_run["sol"]
    assert [r["status"] for r in sol["frames"]] == ["accepted"] * 3, sol["frames"]
    with fits.open(calibration_run["res"] / "stack.fits") as hdul:
        assert hdul[0].header["NCOMBINE"] == 3
        assert np.isfinite(hdul[0].data).all()


def test_bias_of_another_size_is_dropped_by_name(calibration_run):
    log = (calibration_run["res"] / "logs" / "master_bias.log").read_text()
    assert "skipping bias frame odd_0.fits: 1000x800 px, CFA RGGB, but the other 4 bias frames are 1304x976 px" in log, log
    assert fits.getheader(calibration_run["res"] / "masters" / "bias.fits")["NCOMBINE"] == 4


def _calibrate_log(run, frame) -> str:
    return (run["res"] / "logs" / "calibrate" / f"{frame}.log").read_text()


@pytest.mark.parametrize("frame", [f.removesuffix(".fits") for f in ALS_FRAMES[:3]])
def test_warm_darks_are_scaled_on_the_shared_hot_pixels(calibration_run, frame):
    log = _calibrate_log(calibration_run, frame)
    found = re.search(
        r"dark taken at 5 degC but this frame at -10 degC: dark current scaled x([0-9.]+) "
        r"to match the frame's hot pixels \(exposure ratio alone: x0\.5\)",
        log,
    )
    assert found, log
    assert float(found.group(1)) == pytest.approx(TRUE_DARK_SCALE, rel=0.1)


def test_flat_with_zeros_is_repaired(calibration_run):
    master = fits.getheader(calibration_run["res"] / "masters" / "flat.fits")
    assert master["NBADPIX"] == 64
    for frame in (f.removesuffix(".fits") for f in ALS_FRAMES[:3]):
        assert "cold pixels repaired" in _calibrate_log(calibration_run, frame)
        data = fits.getdata(calibration_run["res"] / "calibrated" / f"{frame}.fits")
        block = data[:, ZERO_BLOCK[0], ZERO_BLOCK[1]]
        around = data[:, 490:518, 590:618]
        assert np.isfinite(block).all()
        # repaired from the neighbours: no hole, no spike
        spread = np.nanpercentile(around, 99) - np.nanpercentile(around, 1)
        assert np.abs(block - np.median(around)).max() < spread, (block.min(), block.max())


# --------------------------------------------------------------------------- masters that fit no light


def test_masters_that_fit_no_light_stop_each_night_with_one_line(tmp_path, shared_data):
    source = shared_data(ALS)
    rng = np.random.default_rng(9)
    nights = {}
    for name in ("wrongflat", "wrongdark"):
        night = tmp_path / name
        (night / "lights").mkdir(parents=True)
        for frame in ALS_FRAMES[:2]:
            shutil.copyfile(source / frame, night / "lights" / frame)
        nights[name] = str(night)
    write_flats(tmp_path / "wrongflat" / "flats", 2, rng, pattern="GRBG")
    write_darks(tmp_path / "wrongdark" / "darks", 2, rng, _hot_pixels(), shape=(800, 1000))
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, nights=nights)
    proc = snakemake(work, "--keep-going", check=False, timeout=900)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-4000:]
    flat_lines = [ln for ln in text.splitlines() if "night 'wrongflat' has no usable frame" in ln]
    dark_lines = [ln for ln in text.splitlines() if "night 'wrongdark' has no usable frame" in ln]
    assert flat_lines and dark_lines, text[-4000:]
    assert "master flat has CFA pattern GRBG but this frame has RGGB" in flat_lines[0]
    assert "master dark is 1000x800 but this frame is 1304x976" in dark_lines[0]
    assert not list((work / "results").rglob("stack*.fits"))
