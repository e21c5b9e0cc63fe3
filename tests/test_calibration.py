"""Tests for nightstack.calibration against synthetic ground truth and real frames."""

import tracemalloc
import warnings

import numpy as np
import pytest
from scipy import ndimage

from nightstack import calibration as cal
from nightstack.calibration import (
    Master,
    calibrate,
    demosaic,
    find_cold_pixels,
    find_hot_pixels,
    find_outlier_pixels,
    make_master,
    master_from_fits,
    master_to_fits_header,
    repair_pixels,
    robust_combine,
    with_pixel_masks,
    write_master,
)
from nightstack.errors import FrameError, NightstackError
from nightstack.io import write_fits_image
from nightstack.loading import RawFrame, load_frame

PATTERNS = ["RGGB", "BGGR", "GRBG", "GBRG"]
CHANNEL = {"R": 0, "G": 1, "B": 2}


def mosaic_of(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Sample a (3, H, W) colour image through a Bayer filter -> (H, W)."""
    out = np.empty(rgb.shape[1:], dtype=np.float32)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = rgb[CHANNEL[pattern[2 * dy + dx]], dy::2, dx::2]
    return out


def bilinear_demosaic(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """Reference bilinear interpolation (the method Malvar-He-Cutler improves on)."""
    out = np.zeros((3,) + mosaic.shape, dtype=np.float32)
    k_green = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
    k_red_blue = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
    for colour, kernel in (("R", k_red_blue), ("G", k_green), ("B", k_red_blue)):
        samples = np.zeros_like(mosaic)
        for dy in range(2):
            for dx in range(2):
                if pattern[2 * dy + dx] == colour:
                    samples[dy::2, dx::2] = mosaic[dy::2, dx::2]
        out[CHANNEL[colour]] = ndimage.convolve(samples, kernel, mode="mirror")
    return out


def smooth_colour_scene(height=96, width=128, scale_px=1.0):
    """Shared luminance detail plus slowly varying colour (as in natural scenes), 0..1."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    luminance = 0.5 + 0.35 * np.sin(x / (3.0 * scale_px)) * np.cos(y / (4.0 * scale_px))
    return np.stack(
        [
            0.8 * luminance + 0.15 + 0.1 * np.sin(x / 40.0),
            0.8 * luminance + 0.1,
            0.8 * luminance + 0.05 + 0.05 * np.cos(y / 30.0),
        ]
    )


def frame_of(data, pattern="RGGB", exptime_s=30.0, black_level=0.0, source="f.fits", temp=None):
    header = {"temperature_c": temp} if temp is not None else {}
    return RawFrame(
        data=np.asarray(data, dtype=np.float32), cfa_pattern=pattern, source=source,
        exptime_s=exptime_s, date_obs="2024-01-01T00:00:00", instrument="synthetic",
        gain=None, iso=None, black_level=black_level, white_level=65535.0, focal_mm=None,
        pixel_um=None, header=header,
    )  # fmt: skip


def colour_response(shape, gains_rgb, pattern="RGGB"):
    """Mosaic of per-colour sensitivities (R, G, B)."""
    return mosaic_of(np.stack([np.full(shape, g, np.float32) for g in gains_rgb]), pattern)


def distance_to_nearest(ys, xs, other_ys, other_xs):
    """Distance (px) from each (y, x) to the nearest of the other points."""
    return np.min(np.hypot(ys[:, None] - other_ys[None], xs[:, None] - other_xs[None]), axis=1)


def star_field(height, width, stars, fwhm_px, rng):
    """Sum of pixel-integrated Gaussian stars; stars is (n, 3) of x, y, flux."""
    sigma = fwhm_px / 2.3548
    image = np.zeros((height, width), np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    for x0, y0, flux in stars:  # a handful of synthetic stars
        box = (slice(max(int(y0) - 8, 0), int(y0) + 9), slice(max(int(x0) - 8, 0), int(x0) + 9))
        r2 = (xx[box] - x0) ** 2 + (yy[box] - y0) ** 2
        image[box] += flux / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))
    return image


# ------------------------------------------------------------------ robust_combine


def test_robust_combine_rejects_outliers_and_beats_mean():
    rng = np.random.default_rng(0)
    truth = rng.uniform(100, 200, (40, 50)).astype(np.float32)
    stack = truth + rng.normal(0, 1.0, (15, 40, 50)).astype(np.float32)
    hit_frames = rng.integers(0, 15, 300)
    hit_y, hit_x = rng.integers(0, 40, 300), rng.integers(0, 50, 300)
    stack[hit_frames, hit_y, hit_x] += 5000  # satellites / cosmic rays
    combined = robust_combine(stack)
    assert combined.dtype == np.float32 and combined.shape == truth.shape
    error = np.abs(combined - truth)
    assert error.max() < 1.5  # ~5 sigma of a 14-frame mean
    assert np.abs(stack.mean(axis=0) - truth).max() > 300  # the plain mean is ruined


def test_robust_combine_bands_list_nan_and_memory(monkeypatch):
    rng = np.random.default_rng(1)
    stack = rng.normal(50, 2, (12, 300, 200)).astype(np.float32)
    stack[:, 5, 7] = np.nan  # never observed
    stack[3, 9, 9] = np.nan  # missing in one frame
    whole = robust_combine(stack)
    monkeypatch.setattr(cal, "COMBINE_BAND_BYTES", 64 * 1024)
    banded = robust_combine(list(stack))
    assert np.allclose(whole, banded, equal_nan=True)
    assert np.isnan(banded[5, 7]) and np.isfinite(banded[9, 9])
    # extra memory: about 3 bands at most (plus the result), whatever N
    band_bytes = 64 * 1024
    tracemalloc.start()
    tracemalloc.reset_peak()
    robust_combine(stack)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result_bytes = stack[0].nbytes
    assert peak - result_bytes < 3.2 * band_bytes + 64 * 1024


def test_robust_combine_two_frames_is_mean():
    a, b = np.full((4, 4), 10, np.float32), np.full((4, 4), 20, np.float32)
    assert np.allclose(robust_combine([a, b]), 15)


# ------------------------------------------------------------------ masters


def vignetting(height, width, strength=0.4):
    y, x = np.mgrid[0:height, 0:width]
    r2 = ((x - width / 2) ** 2 + (y - height / 2) ** 2) / ((width / 2) ** 2 + (height / 2) ** 2)
    return (1 - strength * r2).astype(np.float32)


def test_master_flat_normalised_per_colour_with_bad_pixels():
    rng = np.random.default_rng(2)
    height, width = 64, 80
    vig = vignetting(height, width)
    colour_gain = colour_response((height, width), (0.5, 1.0, 0.7))
    bias = 300.0
    flats = []
    for level in (20000, 25000, 30000, 22000, 27000):
        signal = level * vig * colour_gain
        flats.append(frame_of(bias + signal + rng.normal(0, 20, signal.shape), exptime_s=1.0))
    flats[0].data[10, 12] = bias  # no response (0 after bias) in one frame only: clipped
    for f in flats:
        f.data[30, 41] = bias - 5  # dead pixel: negative response in every flat
    master_bias = Master("bias", np.full((height, width), bias, np.float32), "RGGB", 0.0, 10, None)
    flat = make_master(flats, "flat", bias=master_bias)
    assert flat.kind == "flat" and flat.n_frames == 5 and flat.data.dtype == np.float32
    for _, index in cal.colour_planes(flat.data.shape, "RGGB"):
        good = flat.data[index][np.isfinite(flat.data[index])]
        assert np.median(good) == pytest.approx(1.0, abs=0.02)
    # the flat is the vignetting alone (colour balance removed)
    ratio = flat.data / (vig / np.median(vig))
    ratio[30, 41] = 1
    assert np.abs(ratio - np.median(ratio)).max() < 0.02
    assert flat.data[30, 41] == 1.0 and flat.bad_pixels[30, 41]
    assert flat.bad_pixels.sum() == 1
    assert abs(flat.data[10, 12] - ratio[10, 12] * vig[10, 12] / np.median(vig)) < 0.05


def test_master_bias_dark_and_fits_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    frames = [
        frame_of(500 + rng.normal(0, 3, (20, 30)), exptime_s=60.0, temp=-10 + i) for i in range(7)
    ]
    dark = make_master(frames, "dark")
    assert dark.exptime_s == 60.0 and dark.temperature_c == -7 and dark.n_frames == 7
    assert np.abs(dark.data - 500).max() < 5
    path = tmp_path / "master_dark.fits"
    write_fits_image(path, dark.data, master_to_fits_header(dark))
    back = master_from_fits(path)
    assert (back.kind, back.cfa_pattern, back.exptime_s, back.n_frames) == ("dark", "RGGB", 60.0, 7)
    assert back.temperature_c == -7 and np.array_equal(back.data, dark.data)

    flat = Master("flat", np.ones((20, 30), np.float32), None, 1.0, 3, None,
                  bad_pixels=np.zeros((20, 30), bool))  # fmt: skip
    flat.bad_pixels[4, 5] = True
    write_master(tmp_path / "flat.fits", flat)
    back = master_from_fits(tmp_path / "flat.fits")
    assert back.cfa_pattern is None and back.bad_pixels[4, 5] and back.bad_pixels.sum() == 1


def test_make_master_rejects_mixed_frames():
    a = frame_of(np.zeros((10, 12)), source="a.fits")
    b = frame_of(np.zeros((12, 10)), source="b.fits")
    with pytest.raises(NightstackError, match="b.fits is 10x12 but a.fits is 12x10"):
        make_master([a, b], "bias")
    c = frame_of(np.zeros((10, 12)), pattern="GRBG", source="c.fits")
    with pytest.raises(NightstackError, match="CFA pattern GRBG"):
        make_master([a, c], "bias")
    with pytest.raises(NightstackError, match="unknown master kind"):
        make_master([a], "sky")


# ------------------------------------------------------------------ bad pixels


def test_find_hot_pixels_ignores_amp_glow():
    rng = np.random.default_rng(4)
    height, width = 200, 240
    y, x = np.mgrid[0:height, 0:width]
    glow = 400 * np.exp(-((x - width) ** 2 + y**2) / (2 * 40.0**2))  # bright corner
    dark = 100 + glow + rng.normal(0, 2, (height, width))
    hot_y, hot_x = rng.integers(0, height, 60), rng.integers(0, width, 60)
    dark[hot_y, hot_x] += rng.uniform(60, 3000, 60)
    hot = find_hot_pixels(dark.astype(np.float32), "RGGB", sigma=8)
    assert hot[hot_y, hot_x].all()
    assert hot.sum() == len(set(zip(hot_y.tolist(), hot_x.tolist())))


def test_find_cold_pixels_in_vignetted_flat():
    rng = np.random.default_rng(5)
    flat = vignetting(120, 160, 0.6) * (1 + rng.normal(0, 0.01, (120, 160)))
    cold_y, cold_x = rng.integers(0, 120, 30), rng.integers(0, 160, 30)
    flat[cold_y, cold_x] *= 0.3
    flat[0, 0] = np.nan
    cold = find_cold_pixels(flat.astype(np.float32), "GBRG", threshold=0.5)
    assert cold[cold_y, cold_x].all() and cold[0, 0]
    assert cold.sum() == len(set(zip(cold_y.tolist(), cold_x.tolist()))) + 1


def test_repair_uses_same_colour_neighbours():
    scene = smooth_colour_scene(64, 64, scale_px=6.0) * 1000
    mosaic = mosaic_of(scene, "GRBG")
    bad = np.zeros(mosaic.shape, bool)
    bad[10, 10] = bad[10, 12] = bad[12, 10] = True  # a same-colour cluster
    bad[0, 1] = bad[63, 63] = True  # corners
    bad[31, 20] = True
    broken = mosaic.copy()
    broken[bad] = [60000, np.nan, -500, 1e6, 0, 123456][: bad.sum()]
    fixed = repair_pixels(broken, bad, "GRBG")
    assert np.isfinite(fixed).all()
    assert np.array_equal(fixed[~bad], mosaic[~bad])
    # a neighbour of another colour would be off by ~20 % here; same-colour is within ~5 %
    assert np.all(np.abs(fixed[bad] - mosaic[bad]) < 0.05 * mosaic[bad] + 15)
    mono = scene[1]
    fixed_mono = repair_pixels(np.where(bad, 0, mono), bad, None)
    assert np.all(np.abs(fixed_mono[bad] - mono[bad]) < 0.05 * mono[bad] + 15)


def test_find_outlier_pixels_spikes_vs_stars_synthetic():
    rng = np.random.default_rng(6)
    height, width = 256, 256
    stars = np.column_stack(
        [rng.uniform(10, 246, 80), rng.uniform(10, 246, 80), rng.uniform(300, 60000, 80)]
    )
    colour_gain = colour_response((height, width), (0.6, 1.0, 0.8))
    # undersampled stars (FWHM 1.6 px) are the hard case: most light in one pixel
    sky = (200 + star_field(height, width, stars, 1.6, rng)) * colour_gain
    image = sky + rng.normal(0, 5, sky.shape)
    spike_y, spike_x = rng.integers(2, height - 2, 40), rng.integers(2, width - 2, 40)
    far = distance_to_nearest(spike_y, spike_x, stars[:, 1], stars[:, 0]) > 6
    spike_y, spike_x = spike_y[far], spike_x[far]
    image[spike_y, spike_x] += rng.uniform(100, 5000, spike_y.size)
    found = find_outlier_pixels(image.astype(np.float32), "RGGB", sigma=10)
    assert found[spike_y, spike_x].mean() >= 0.95
    star_pixels = np.zeros_like(found)
    star_pixels[np.round(stars[:, 1]).astype(int), np.round(stars[:, 0]).astype(int)] = True
    star_pixels = ndimage.binary_dilation(star_pixels, iterations=2)
    assert not (found & star_pixels).any()


def detect_bright_stars(mosaic, n_sigma=30):
    smooth = ndimage.gaussian_filter(mosaic, 2)
    background = np.median(smooth)
    spread = 1.4826 * np.median(np.abs(smooth - background))
    peaks = (smooth == ndimage.maximum_filter(smooth, 9)) & (smooth > background + n_sigma * spread)
    return np.argwhere(peaks)


def test_outliers_on_real_als_frame_keep_stars_and_find_spikes(shared_data):
    path = sorted(shared_data("als_m27_asi224mc").glob("*.fits"))[0]
    raw = load_frame(path)
    mosaic = raw.data
    stars = detect_bright_stars(mosaic)
    assert len(stars) > 40
    found = find_outlier_pixels(mosaic, "RGGB", sigma=10)
    repaired = repair_pixels(mosaic, found, "RGGB")
    # star peak fluxes (brightest pixel and 7x7 sum around each star) are unchanged
    for y, x in stars:
        box = (slice(max(y - 3, 0), y + 4), slice(max(x - 3, 0), x + 4))
        assert repaired[box].max() == mosaic[box].max()
        assert repaired[box].sum() == pytest.approx(mosaic[box].sum(), rel=1e-3)
    # injected single-pixel spikes in the sky are all found
    rng = np.random.default_rng(7)
    noise = cal._plane_noise(mosaic[0::2, 1::2])
    spike_y, spike_x = rng.integers(4, 970, 200), rng.integers(4, 1298, 200)
    far = distance_to_nearest(spike_y, spike_x, stars[:, 0], stars[:, 1]) > 10
    spike_y, spike_x = spike_y[far], spike_x[far]
    spiked = mosaic.copy()
    spiked[spike_y, spike_x] += 40 * noise
    found = find_outlier_pixels(spiked, "RGGB", sigma=10)
    assert found[spike_y, spike_x].mean() >= 0.95


# ------------------------------------------------------------------ demosaic


@pytest.mark.parametrize("pattern", PATTERNS)
def test_demosaic_beats_bilinear_on_smooth_scene(pattern):
    truth = smooth_colour_scene()
    mosaic = mosaic_of(truth, pattern)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    mhc = demosaic(mosaic, pattern)
    assert mhc.shape == truth.shape and mhc.dtype == np.float32
    mhc_rms = np.sqrt(np.mean((mhc - truth)[inner] ** 2))
    bilinear_rms = np.sqrt(np.mean((bilinear_demosaic(mosaic, pattern) - truth)[inner] ** 2))
    assert mhc_rms < 0.7 * bilinear_rms  # measured 0.58
    assert mhc_rms < 0.005  # on a 0..1 scale, features ~20 px across
    # known samples pass through untouched
    for dy in range(2):
        for dx in range(2):
            c = CHANNEL[pattern[2 * dy + dx]]
            assert np.array_equal(mhc[c, dy::2, dx::2], mosaic[dy::2, dx::2])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("colour", ["R", "G", "B"])
def test_demosaic_channel_order(pattern, colour):
    field = np.zeros((3, 32, 48), np.float32)
    field[CHANNEL[colour]] = 1000
    rgb = demosaic(mosaic_of(field, pattern), pattern)
    means = rgb.mean(axis=(1, 2))
    assert means[CHANNEL[colour]] == pytest.approx(1000, rel=1e-3)
    assert np.all(np.delete(means, CHANNEL[colour]) < 10)


# ------------------------------------------------------------------ calibrate end to end


def synthetic_night(pattern="RGGB", height=96, width=128, seed=8):
    """Truth sky, and the pieces a sensor adds: bias, dark current, flat, hot pixels."""
    rng = np.random.default_rng(seed)
    stars = np.column_stack(
        [
            rng.uniform(8, width - 8, 25),
            rng.uniform(8, height - 8, 25),
            rng.uniform(2000, 40000, 25),
        ]
    )
    truth_rgb = np.stack(
        [(100 + star_field(height, width, stars, 3.0, rng)) * g for g in (0.8, 1.0, 0.6)]
    ).astype(np.float32)
    sensor = {
        # column pattern noise on top of the offset
        "bias": np.broadcast_to(500 + 8 * np.sin(np.arange(width) / 3.0), (height, width)),
        "dark_rate": rng.uniform(0.05, 0.15, (height, width)).astype(np.float32),  # ADU/s
        "flat": vignetting(height, width, 0.5) * rng.uniform(0.97, 1.03, (height, width)),
    }
    hot_y, hot_x = rng.integers(2, height - 2, 30), rng.integers(2, width - 2, 30)
    sensor["dark_rate"][hot_y, hot_x] = rng.uniform(30, 100, 30)
    sensor["hot"] = (hot_y, hot_x)
    return truth_rgb, sensor, rng


def expose(signal_mosaic, sensor, exptime_s, rng, noise=1.0):
    dark = sensor["dark_rate"] * exptime_s
    return sensor["bias"] + dark + signal_mosaic * sensor["flat"] + rng.normal(0, noise, dark.shape)


@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
def test_calibrate_end_to_end_recovers_truth(pattern):
    truth_rgb, sensor, rng = synthetic_night(pattern)
    shape = truth_rgb.shape[1:]
    truth_mosaic = mosaic_of(truth_rgb, pattern)
    zero = np.zeros(shape, np.float32)
    biases = [frame_of(expose(zero, sensor, 0.0, rng), pattern, 0.0) for _ in range(16)]
    darks = [frame_of(expose(zero, sensor, 60.0, rng), pattern, 60.0) for _ in range(16)]
    flat_signal = np.full(shape, 20000, np.float32)
    flats = [frame_of(expose(flat_signal, sensor, 1.0, rng), pattern, 1.0) for _ in range(16)]
    master_bias = make_master(biases, "bias")
    master_dark = make_master(darks, "dark")
    darkflats = [frame_of(expose(zero, sensor, 1.0, rng), pattern, 1.0) for _ in range(8)]
    darkflat = make_master(darkflats, "darkflat")
    master_flat = make_master(flats, "flat", bias=master_bias, dark=darkflat)

    light = frame_of(expose(truth_mosaic, sensor, 30.0, rng), pattern, 30.0, source="light.fits")
    light.data[40, 50] = np.nan  # a dropped pixel
    result = calibrate(light, master_bias, master_dark, master_flat, {})
    assert result.data.shape == (3,) + shape and result.data.dtype == np.float32
    assert np.isfinite(result.data).all()
    assert "dark scaled x0.5 (60 s -> 30 s)" in result.notes
    assert any(n.endswith("hot pixels repaired") for n in result.notes)
    assert any(n.startswith("1 non-finite") for n in result.notes)
    assert result.n_repaired >= 15 and result.meta["cfa_pattern"] == pattern
    assert result.meta["source"] == "light.fits" and result.meta["exptime_s"] == 30.0

    # the master flat has median 1 per colour, so the result keeps the median flat level
    flat_level = np.empty(shape, np.float32)
    for colour in "RGB":
        phases = [cal.colour_planes(shape, pattern)[i][1] for i in range(4) if pattern[i] == colour]
        level = np.median(np.concatenate([sensor["flat"][p].ravel() for p in phases]))
        for index in phases:
            flat_level[index] = level
    expected = demosaic(truth_mosaic * flat_level, pattern)
    residual = (result.data - expected)[:, 3:-3, 3:-3]
    sky = np.median(expected, axis=(1, 2))[:, None, None]
    background = np.abs(expected[:, 3:-3, 3:-3] - sky) < 5
    # on the sky background: within noise (1 ADU read noise / flat ~ 0.5..1, plus master noise)
    assert np.sqrt(np.mean(residual[background] ** 2)) < 3.0
    assert abs(np.mean(residual[background])) < 0.5
    # hot pixels (30..100 ADU/s -> 900..3000 ADU) on the sky are gone (one on a star core
    # is repaired too, but from neighbours that cannot know the true peak)
    hot_y, hot_x = sensor["hot"]
    on_sky = ndimage.minimum_filter(np.all(np.abs(expected - sky) < 5, axis=0), 5)[hot_y, hot_x]
    hot_y, hot_x = hot_y[on_sky], hot_x[on_sky]
    assert len(hot_y) >= 8
    assert np.abs(result.data[:, hot_y, hot_x] - expected[:, hot_y, hot_x]).max() < 5
    uncalibrated = calibrate(light, None, None, None, {"repair_outliers": False})
    assert np.abs(uncalibrated.data[:, hot_y, hot_x] - expected[:, hot_y, hot_x]).min() > 100


def test_masters_store_their_bad_pixel_masks_for_the_lights(tmp_path, monkeypatch):
    pattern = "RGGB"
    truth_rgb, sensor, rng = synthetic_night(pattern)
    shape = truth_rgb.shape[1:]
    zero = np.zeros(shape, np.float32)
    bias = make_master([frame_of(expose(zero, sensor, 0.0, rng), pattern, 0.0) for _ in range(8)],
                       "bias")
    dark = make_master([frame_of(expose(zero, sensor, 60.0, rng), pattern, 60.0)
                        for _ in range(8)], "dark")
    flat_signal = np.full(shape, 20000, np.float32)
    flat = make_master([frame_of(expose(flat_signal, sensor, 1.0, rng), pattern, 1.0)
                        for _ in range(8)], "flat", bias=bias)
    flat.data[10, 11] = 0.2  # a dead pixel
    settings = {"hot_sigma": 8.0, "cold_threshold": 0.5}
    for master, name in ((bias, "bias"), (dark, "dark"), (flat, "flat")):
        write_master(tmp_path / f"{name}.fits", with_pixel_masks(master, bias, settings))
    loaded = {name: master_from_fits(tmp_path / f"{name}.fits") for name in ("bias", "dark", "flat")}
    hot = loaded["dark"].pixel_masks[cal.hot_mask_key(8.0, True)]
    np.testing.assert_array_equal(hot, find_hot_pixels(dark.data - bias.data, pattern, 8.0))
    assert hot[sensor["hot"]].all()
    cold = loaded["flat"].pixel_masks[cal.cold_mask_key(0.5)]
    assert cold[10, 11] and np.array_equal(cold, find_cold_pixels(flat.data, pattern, 0.5))
    assert not loaded["bias"].pixel_masks

    light = frame_of(expose(mosaic_of(truth_rgb, pattern), sensor, 60.0, rng), pattern, 60.0)
    fresh = [Master(m.kind, m.data, m.cfa_pattern, m.exptime_s, m.n_frames, m.temperature_c,
                    m.bad_pixels) for m in (bias, dark, flat)]
    expected = calibrate(light, *fresh, settings)
    with monkeypatch.context() as patched:  # the stored masks are used, not found again
        patched.setattr(cal, "find_hot_pixels", None)
        patched.setattr(cal, "find_cold_pixels", None)
        stored = calibrate(light, loaded["bias"], loaded["dark"], loaded["flat"], settings)
    np.testing.assert_allclose(stored.data, expected.data, rtol=1e-6, atol=1e-3)
    assert stored.notes == expected.notes
    # other settings than the stored masks were found with: found again, as without them
    other = {"hot_sigma": 5.0, "cold_threshold": 0.8}
    np.testing.assert_allclose(
        calibrate(light, loaded["bias"], loaded["dark"], loaded["flat"], other).data,
        calibrate(light, *fresh, other).data, rtol=1e-6, atol=1e-3)


def test_calibrate_without_bias_subtracts_dark_unscaled():
    truth_rgb, sensor, rng = synthetic_night()
    zero = np.zeros(truth_rgb.shape[1:], np.float32)
    darks = [frame_of(expose(zero, sensor, 60.0, rng), "RGGB", 60.0) for _ in range(5)]
    master_dark = make_master(darks, "dark")
    light = frame_of(expose(mosaic_of(truth_rgb, "RGGB"), sensor, 30.0, rng), "RGGB", 30.0)
    result = calibrate(light, None, master_dark, None, {})
    assert any("unscaled" in note and "60 s dark" in note for note in result.notes)
    # no bias: the black level is not subtracted on top of the dark's offset
    assert not any("black level" in note for note in result.notes)


def test_calibrate_black_level_mono_and_colour_inputs():
    mono = frame_of(np.full((20, 30), 600.0), pattern=None, black_level=512.0)
    result = calibrate(mono, None, None, None, {})
    assert result.data.shape == (1, 20, 30) and np.allclose(result.data, 88)
    assert "camera black level 512 ADU subtracted" in result.notes
    colour = frame_of(np.full((3, 20, 30), 40.0), pattern=None)
    assert calibrate(colour, None, None, None, {}).data.shape == (3, 20, 30)


def test_calibrate_rejects_mismatched_masters():
    light = frame_of(np.zeros((1920, 1080), np.float32), "GRBG", source="light.fit")
    dark = Master("dark", np.zeros((1080, 1920), np.float32), "GRBG", 10.0, 5, None)
    with pytest.raises(FrameError) as info:
        calibrate(light, None, dark, None, {})
    assert info.value.reason == "master dark is 1920x1080 but this frame is 1080x1920"
    assert info.value.path == "light.fit"
    flat = Master("flat", np.ones((1920, 1080), np.float32), "RGGB", 1.0, 5, None)
    with pytest.raises(FrameError, match="master flat has CFA pattern RGGB but this frame has GRB"):
        calibrate(light, None, None, flat, {})


# --------------------------------------------------------------------------- dark temperature


def _warm_dark_case(rng, scale, n_hot=300, shape=(200, 260)):
    """(bias-subtracted light, dark current) sharing n_hot hot pixels; light = scale x dark
    on them, over a sky with stars so only the shared hot pixels can tell the scale."""
    ys = rng.integers(2, shape[0] - 2, n_hot)
    xs = rng.integers(2, shape[1] - 2, n_hot)
    current = np.abs(rng.normal(2.0, 0.5, shape)).astype(np.float32)
    current[ys, xs] += rng.uniform(500, 5000, n_hot)
    stars = np.column_stack([rng.uniform(5, shape[1] - 5, 40), rng.uniform(5, shape[0] - 5, 40),
                             rng.uniform(2e3, 4e4, 40)])
    light = star_field(shape[0], shape[1], stars, 2.5, rng) + rng.normal(300, 8, shape)
    light = (light + scale * current).astype(np.float32)
    return light, current


@pytest.mark.parametrize("scale", [0.08, 0.5, 2.0])
def test_dark_scale_from_hot_pixels_recovers_the_scale(scale):
    light, current = _warm_dark_case(np.random.default_rng(4), scale)
    assert cal.dark_scale_from_hot_pixels(light, current, "RGGB") == pytest.approx(scale, rel=0.05)


def test_dark_scale_needs_hot_pixels():
    rng = np.random.default_rng(2)
    light, current = _warm_dark_case(rng, 1.0, n_hot=5)
    assert cal.dark_scale_from_hot_pixels(light, current, "RGGB") is None


def test_calibrate_scales_a_dark_of_another_temperature():
    rng = np.random.default_rng(8)
    light, current = _warm_dark_case(rng, 0.1)
    bias = cal.Master("bias", np.full(light.shape, 100, np.float32), "RGGB", 0.0, 10, None)
    dark = cal.Master("dark", (current / 1.0 + 100).astype(np.float32), "RGGB", 60.0, 10, 20.0)
    raw = frame_of(light + 100, exptime_s=30.0, temp=-5.0)
    out = calibrate(raw, bias, dark, None, {"repair_outliers": False})
    note = next(n for n in out.notes if "degC" in n)
    assert note.startswith("dark taken at 20 degC but this frame at -5 degC: dark current scaled x0.1")
    assert "exposure ratio alone: x0.5" in note
    # within tolerance the exposure ratio is used and nothing is said about temperature
    raw_same = frame_of(light + 100, exptime_s=30.0, temp=19.0)
    notes = calibrate(raw_same, bias, dark, None, {"repair_outliers": False}).notes
    assert not any("degC" in n for n in notes) and any("dark scaled x0.5" in n for n in notes)


# ------------------------------------------------------------------ fast kernels = reference

RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
SMALL_SHAPES = [(2, 2), (2, 7), (3, 3), (5, 2), (9, 11), (130, 67)]


@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_ring_median_equals_rank_filter(shape):
    rng = np.random.default_rng(11)
    smooth = rng.normal(100, 5, shape).astype(np.float32)
    quantised = np.round(smooth / 4).astype(np.float32)  # many ties
    for plane in (smooth, quantised):
        expected = ndimage.median_filter(plane, footprint=RING, mode="mirror")
        assert np.array_equal(cal._ring_median(plane), expected)


@pytest.mark.parametrize("shape", SMALL_SHAPES + [(1, 5), (200, 3)])
def test_ring_maximum_equals_maximum_filter_with_nan(shape):
    rng = np.random.default_rng(12)
    image = rng.normal(0, 1, shape).astype(np.float32)
    image[rng.random(shape) < 0.3] = np.nan
    if min(shape) >= 3:
        image[1:4, 1:4] = np.nan  # a pixel whose 8 neighbours are all NaN
        image[2, 2] = 5.0
    expected = ndimage.maximum_filter(
        np.where(np.isnan(image), -np.inf, image), footprint=RING, mode="mirror"
    )
    got = cal._ring_maximum(image)
    assert np.array_equal(got, expected)
    if min(shape) >= 3:
        assert got[2, 2] == -np.inf


def test_median_and_sigma_match_the_plain_formulas():
    rng = np.random.default_rng(13)
    values = rng.normal(3, 2, 10001).astype(np.float32)
    values[::97] = np.nan
    values[5] = np.inf
    finite = values[np.isfinite(values)]
    centre, sigma = cal._median_and_sigma(values)
    assert centre == float(np.median(finite))
    assert sigma == cal.MAD_TO_SIGMA * float(np.median(np.abs(finite - np.median(finite))))
    assert cal._median_and_sigma(np.full(10, 7, np.float32)) == (7.0, 0.0)  # MAD 0: std
    assert np.isnan(cal._median_and_sigma(np.full(3, np.nan, np.float32))[0])


def outliers_by_full_test(mosaic, pattern, sigma):
    """find_outlier_pixels as first written: every local maximum gets the full test."""
    image = np.asarray(mosaic, dtype=np.float32)
    step = 2 if pattern else 1
    excess = np.empty_like(image)
    noise = np.empty_like(image)
    for _, index in cal.colour_planes(image.shape, pattern):
        plane = np.where(np.isfinite(image[index]), image[index], np.nan).astype(np.float32)
        excess[index] = plane - cal._block_background(plane)
        noise[index] = cal._plane_noise(plane)
    brightest = ndimage.maximum_filter(
        np.where(np.isnan(excess), -np.inf, excess), footprint=RING, mode="mirror"
    )
    ys, xs = np.nonzero(excess > brightest)
    values = excess[np.clip(ys[:, None] + step * np.array([-1, -1, -1, 0, 0, 1, 1, 1]), 0, None)
                    .clip(None, image.shape[0] - 1),
                    np.clip(xs[:, None] + step * np.array([-1, 0, 1, -1, 1, -1, 0, 1]), 0, None)
                    .clip(None, image.shape[1] - 1)]  # fmt: skip
    inside_y = (ys[:, None] + step * np.array([-1, -1, -1, 0, 0, 1, 1, 1]))
    inside_x = (xs[:, None] + step * np.array([-1, 0, 1, -1, 1, -1, 0, 1]))
    outside = (inside_y < 0) | (inside_y >= image.shape[0]) | (inside_x < 0) | (
        inside_x >= image.shape[1]
    )
    values = np.where(outside, np.nan, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        local = np.nanmedian(values, axis=1).astype(np.float32)
    height = excess[ys, xs] - local
    is_spike = (height > sigma * noise[ys, xs]) & (
        brightest[ys, xs] - local <= cal._spike_neighbour_limit(height, noise[ys, xs])
    )
    mask = np.zeros(image.shape, dtype=bool)
    mask[ys[is_spike], xs[is_spike]] = True
    return mask, ys.size


@pytest.mark.parametrize("pattern", [None, "GRBG"])
def test_outlier_candidates_do_not_change_the_mask(pattern):
    """The cheap candidate test keeps every pixel the full test on all local maxima flags,
    on a frame with undersampled stars, spikes of all heights and NaN holes."""
    rng = np.random.default_rng(14)
    height, width = 300, 260
    stars = np.column_stack(
        [rng.uniform(5, width - 5, 150), rng.uniform(5, height - 5, 150), rng.uniform(50, 8e4, 150)]
    )
    image = 300 + star_field(height, width, stars, 1.3, rng) + rng.normal(0, 6, (height, width))
    ys, xs = rng.integers(0, height, 400), rng.integers(0, width, 400)
    image[ys, xs] += rng.uniform(0, 400, 400)  # from below the threshold to far above it
    image[rng.random(image.shape) < 0.002] = np.nan
    image = image.astype(np.float32)
    expected, n_maxima = outliers_by_full_test(image, pattern, 10.0)
    got = find_outlier_pixels(image, pattern, 10.0)
    assert 50 < expected.sum() < n_maxima / 20
    assert np.array_equal(got, expected)


def test_outlier_ignore_mask_is_the_same_as_nan():
    rng = np.random.default_rng(15)
    image = (200 + rng.normal(0, 5, (3, 120, 90))).astype(np.float32)
    image[:, rng.integers(0, 120, 30), rng.integers(0, 90, 30)] += 500
    ignore = rng.random(image.shape) < 0.01
    as_nan = find_outlier_pixels(np.where(ignore, np.nan, image), None, 10.0)
    assert as_nan.sum() > 40
    assert np.array_equal(find_outlier_pixels(image, None, 10.0, ignore=ignore), as_nan)


def test_calibrate_repairs_its_own_copy():
    rng = np.random.default_rng(16)
    data = (500 + rng.normal(0, 5, (64, 80))).astype(np.float32)
    data[10, 20] = 60000.0
    data[30, 31] = np.nan
    raw = frame_of(data.copy())
    result = calibrate(raw, None, None, None)
    assert np.array_equal(raw.data, data, equal_nan=True)  # the loaded frame is untouched
    assert result.n_repaired == 2
    assert np.isfinite(result.data).all() and result.data.max() < 1000


def test_masters_from_frames_on_disk_equal_masters_in_memory(tmp_path):
    """master_step parks frames on disk (DiskFrame); the masters must not change by a bit."""
    from nightstack.calibration import DiskFrame

    rng = np.random.default_rng(11)
    bias_frames = [frame_of(rng.normal(200, 5, (40, 60)), source=f"b{k}.fits") for k in range(5)]
    bias_frames[2].data[10, 10] = 5000.0  # an outlier the clipping must drop either way
    bias = make_master(bias_frames, "bias")
    parked = [frame_of(f.data, source=f.source) for f in bias_frames]
    for frame in parked:
        frame.data = DiskFrame(frame.data, tmp_path)
    np.testing.assert_array_equal(make_master(parked, "bias").data, bias.data)

    flats = [frame_of(200 + rng.normal(3000, 40, (40, 60)), source=f"f{k}.fits") for k in range(4)]
    flat = make_master(flats, "flat", bias=bias)
    parked = [frame_of(f.data, source=f.source) for f in flats]
    for frame in parked:
        frame.data = DiskFrame(frame.data, tmp_path)
    on_disk = make_master(parked, "flat", bias=bias)
    np.testing.assert_array_equal(on_disk.data, flat.data)
    np.testing.assert_array_equal(on_disk.bad_pixels, flat.bad_pixels)
    # a band is read from the file, not the whole frame
    np.testing.assert_array_equal(parked[0].data[100:150], flats[0].data.ravel()[100:150])


def test_master_step_leaves_no_scratch_files(tmp_path):
    from nightstack.steps import master_step

    rng = np.random.default_rng(5)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"bias_{k}.fits")
        write_fits_image(paths[-1], rng.normal(300, 4, (30, 40)).astype(np.float32))
    out = tmp_path / "masters" / "bias.fits"
    master_step("bias", paths, out, {})
    assert master_from_fits(out).data.shape == (30, 40)
    assert sorted(p.name for p in out.parent.iterdir()) == ["bias.fits"]
