"""Deliverables: stretches, 16-bit TIFF, PNG preview, stack FITS with its header."""

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from nightstack.errors import NightstackError
from nightstack.outputs import (
    bin_image,
    frame_names_from_header,
    stack_header,
    write_background_model,
    write_preview_png,
    write_stack_fits,
    write_tiff16,
)
from nightstack.stretch import autostretch, linear_scale, midtones_transfer


def sky_with_stars(shape=(3, 120, 160), levels=(500.0, 300.0, 120.0), noise=15.0, seed=0):
    """Colour-cast sky (R > G > B) with noise and a few bright stars: (C, H, W) float32."""
    rng = np.random.default_rng(seed)
    img = np.asarray(levels)[:, None, None] + rng.normal(0, noise, shape)
    ys, xs = rng.integers(5, shape[1] - 5, 20), rng.integers(5, shape[2] - 5, 20)
    img[:, ys, xs] += 20000
    return img.astype(np.float32)


# ---------------------------------------------------------------- stretch


def test_midtones_transfer_fixed_points_and_monotonic():
    x = np.linspace(0, 1, 101)
    for m in (0.05, 0.25, 0.5, 0.8):
        y = midtones_transfer(x, m)
        assert y[0] == 0 and y[-1] == pytest.approx(1)
        assert midtones_transfer(m, m) == pytest.approx(0.5)
        assert np.all(np.diff(y) > 0)
    np.testing.assert_allclose(midtones_transfer(x, 0.5), x, atol=1e-12)


def test_autostretch_unlinked_puts_every_channel_median_at_target():
    img = sky_with_stars()
    out = autostretch(img, target_median=0.25)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    for c in range(3):
        assert np.median(out[c]) == pytest.approx(0.25, abs=0.01)
    # Black point at median - 2.8 sigma: only ~0.3 % of sky pixels clip to black.
    assert 0 < (out == 0).mean() < 0.01
    # Value order is kept inside each channel.
    order = np.argsort(img[0].ravel())
    assert np.all(np.diff(out[0].ravel()[order]) >= 0)


def test_autostretch_linked_keeps_colour_cast_and_mono_works():
    img = sky_with_stars()
    linked = autostretch(img, linked=True)
    medians = [np.median(c) for c in linked]
    assert medians[0] > medians[1] > medians[2]
    mono = autostretch(img[1], target_median=0.2)
    assert mono.shape == img[1].shape
    assert np.median(mono) == pytest.approx(0.2, abs=0.01)
    assert np.all(autostretch(np.full((10, 10), 3.0)) == 0)  # flat frame: no crash, black
    with pytest.raises(NightstackError):
        autostretch(img, target_median=1.5)


def test_linear_scale_defaults_and_explicit():
    img = sky_with_stars()
    scaled, low, high = linear_scale(img)
    assert low == pytest.approx(np.quantile(img, 0.001))
    assert high == img.max() and scaled.max() == 1
    assert (scaled == 0).mean() == pytest.approx(0.001, abs=0.0005)
    scaled, low, high = linear_scale(img, low=0, high=1000)
    np.testing.assert_allclose(scaled, np.clip(img / 1000, 0, 1), atol=1e-6)
    nan_img = img.copy()
    nan_img[0, 0, 0] = np.nan
    assert linear_scale(nan_img)[0][0, 0, 0] == 0


# ---------------------------------------------------------------- TIFF


def test_tiff16_round_trip_is_linear_and_ordered(tmp_path):
    img = sky_with_stars()
    path = tmp_path / "stack.tif"
    scaling = write_tiff16(path, img)
    back = tifffile.imread(path)
    assert back.dtype == np.uint16 and back.shape == (120, 160, 3)
    hwc = np.moveaxis(img, 0, -1)
    expected = np.clip(np.round((hwc - scaling["low"]) * scaling["scale"]), 0, 65535)
    assert np.max(np.abs(back.astype(float) - expected)) <= 1
    assert back.max() == 65535
    unclipped = hwc > scaling["low"]
    # Linear: a least-squares line through (value, tiff) has no curvature left.
    fit = np.polyfit(hwc[unclipped], back[unclipped].astype(float), 1)
    assert fit[0] == pytest.approx(scaling["scale"], rel=1e-4)
    order = np.argsort(hwc[unclipped])
    assert np.all(np.diff(back[unclipped][order].astype(int)) >= 0)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_tiff16_mono_and_explicit_range(tmp_path):
    img = np.linspace(0, 100, 50 * 40, dtype=np.float32).reshape(50, 40)
    scaling = write_tiff16(tmp_path / "mono.tif", img, low=10, high=90)
    back = tifffile.imread(tmp_path / "mono.tif")
    assert back.shape == (50, 40) and back.dtype == np.uint16
    assert scaling == {"low": 10.0, "high": 90.0, "scale": pytest.approx(65535 / 80)}
    assert back[img <= 10].max() == 0 and back[img >= 90].min() == 65535
    with pytest.raises(NightstackError):
        write_tiff16(tmp_path / "bad.tif", np.zeros((4, 10, 10), np.float32))


# ---------------------------------------------------------------- PNG


def test_preview_png_opens_and_sky_median_near_target(tmp_path):
    img = sky_with_stars(shape=(3, 300, 400))
    path = tmp_path / "preview.png"
    write_preview_png(path, img, max_side_px=200)
    with Image.open(path) as pil:
        assert pil.format == "PNG" and pil.mode == "RGB" and pil.size == (200, 150)
        data = np.asarray(pil)
    # Downsizing averages 2x2 pixels through the stretch's curve, so allow a few levels.
    for c in range(3):
        assert np.median(data[..., c]) == pytest.approx(0.25 * 255, abs=6)
    write_preview_png(tmp_path / "full.png", img[0])
    with Image.open(tmp_path / "full.png") as pil:
        assert pil.mode == "L" and pil.size == (400, 300)
        assert np.median(np.asarray(pil)) == pytest.approx(0.25 * 255, abs=2)


# ---------------------------------------------------------------- FITS


def awkward_frame_names(n=500):
    return [f"Light frame {i:04d} – M27 ñight é 'quote' 100% " + "x" * (i % 90) for i in range(n)]


def full_meta(frames):
    return {
        "software_version": "9.8.7",
        "n_frames": len(frames),
        "frames": frames,
        "total_exptime_s": 6.0 * len(frames),
        "date_obs_start": "2018-09-07T22:31:45",
        "date_obs_end": "2018-09-07T22:57:18",
        "method": "sigma_clip",
        "night": "2018-09-07 garden",
        "reference": frames[0],
    }


def test_stack_header_has_every_key_and_all_500_frames(tmp_path):
    frames = awkward_frame_names(500)
    hdr = stack_header(full_meta(frames))
    for key in (
        "SOFTWARE",
        "NSVER",
        "NCOMBINE",
        "EXPTIME",
        "DATE-BEG",
        "DATE-END",
        "STACKMTH",
        "BUNIT",
    ):
        assert key in hdr, key
    assert hdr["NSVER"] == "9.8.7" and hdr["NCOMBINE"] == 500 and hdr["EXPTIME"] == 3000.0
    assert hdr["STACKMTH"] == "sigma_clip" and hdr["DATE-END"] == "2018-09-07T22:57:18"
    assert "FRAME001" in hdr and "FRAME500" in hdr and "FRAME501" not in hdr
    path = tmp_path / "stack.fits"
    img = sky_with_stars(shape=(3, 20, 30))
    write_stack_fits(path, img, hdr)
    with fits.open(path) as hdul:
        back = hdul[0].header
        assert hdul[0].data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(hdul[0].data, img)
        assert frame_names_from_header(back) == frames  # spaces, non-ASCII, quotes, % all survive
        assert back["NCOMBINE"] == 500 and back["NIGHT"] == "2018-09-07 garden"


def test_more_than_999_frames_and_trailing_blanks(tmp_path):
    frames = [f"f{i} " for i in range(1002)] + ["ends with blanks   "]
    path = tmp_path / "many.fits"
    write_stack_fits(path, np.zeros((4, 5), np.float32), stack_header({"frames": frames}))
    with fits.open(path) as hdul:
        assert frame_names_from_header(hdul[0].header) == frames
        assert hdul[0].header["NCOMBINE"] == len(frames)


def test_stack_fits_coverage_extension(tmp_path):
    img = sky_with_stars(shape=(3, 20, 30))
    coverage = np.arange(20 * 30).reshape(20, 30) % 7
    coverage[0, 0] = 100000  # more frames than int16 holds: clipped, not wrapped
    path = tmp_path / "cov.fits"
    write_stack_fits(path, img, stack_header({"frames": ["a.fits"]}), coverage=coverage)
    with fits.open(path) as hdul:
        cov = hdul["COVERAGE"].data
        assert cov.dtype.kind == "i" and cov.dtype.itemsize == 2
        assert cov[0, 0] == 32767
        np.testing.assert_array_equal(cov.ravel()[1:], coverage.ravel()[1:])
    with pytest.raises(NightstackError):
        write_stack_fits(path, img, {}, coverage=np.zeros((5, 5)))
    with pytest.raises(NightstackError):
        write_stack_fits(path, np.zeros(5), {})


# ---------------------------------------------------------------- light-pollution model


def test_bin_image_averages_blocks_including_the_edges():
    img = np.arange(3 * 10 * 7, dtype=float).reshape(3, 10, 7)
    binned, factor = bin_image(img, max_side_px=4)
    assert factor == 3 and binned.shape == (3, 4, 3)
    assert binned[1, 0, 0] == pytest.approx(img[1, :3, :3].mean())
    assert binned[2, 3, 2] == pytest.approx(img[2, 9:, 6:].mean())  # partial corner block
    same, one = bin_image(img[0], max_side_px=10)
    assert one == 1 and np.array_equal(same, img[0])


def test_background_model_file_is_small_and_keeps_the_gradient(tmp_path):
    yy, xx = np.mgrid[0:1066, 0:1600]
    model = np.stack([400 + 0.02 * xx + 0.01 * yy, 450 + 0.01 * xx, 330 - 0.005 * yy])
    path = tmp_path / "background_model.fits"
    write_background_model(path, model, removed=False, night="demo")
    with fits.open(path) as hdul:
        data, hdr = hdul[0].data, hdul[0].header
    assert data.shape == (3, 153, 229) and max(data.shape[1:]) <= 256
    assert hdr["BINFACT"] == 7 and (hdr["STACKW"], hdr["STACKH"]) == (1600, 1066)
    assert hdr["BGREMOVD"] is False and hdr["CHANNELS"] == "R,G,B" and hdr["BUNIT"] == "adu"
    # a linear gradient survives block averaging: the first block is centred on pixel (3, 3)
    assert data[0, 0, 0] == pytest.approx(400 + 0.02 * 3 + 0.01 * 3, abs=1e-3)
    assert np.ptp(data[1]) == pytest.approx(0.01 * (1600 - 1 - 4), rel=0.01)


@pytest.mark.parametrize("case", ["rgb", "grey_with_nan_and_inf", "bound_too_low", "tiny"])
def test_linear_limits_equal_quantile_and_max_of_the_finite_values(case, monkeypatch):
    # the black point comes from the low tail alone (no copy of the image): it must be
    # np.quantile(finite, 0.001) exactly, and the white point the finite maximum; when the
    # subsample's bound leaves out ranks the quantile reads, all finite values are used
    from nightstack import stretch

    candidates = []
    ranks = stretch._quantile_ranks
    monkeypatch.setattr(stretch, "_quantile_ranks",
                        lambda values, n, q: candidates.append(values.size) or ranks(values, n, q))
    rng = np.random.default_rng(7)
    if case == "rgb":
        image = rng.normal(500, 40, (3, 400, 500)).astype(np.float32)
    elif case == "grey_with_nan_and_inf":
        image = rng.normal(500, 40, (400, 500)).astype(np.float32)
        image[rng.random(image.shape) < 0.1] = np.nan
        image[0, :7] = [np.inf, -np.inf, -1e30, 5e4, np.nan, -np.inf, 3]
    elif case == "bound_too_low":
        monkeypatch.setattr(stretch, "LOW_TAIL_MARGIN", 0.2)
        image = rng.normal(500, 40, (200, 300)).astype(np.float32)
    else:
        image = np.array([[3.0, np.nan], [1.0, 2.0]], np.float32)
    finite = image[np.isfinite(image)]
    low, high = stretch.linear_limits(image)
    assert low == float(np.quantile(finite, 0.001))
    assert high == float(finite.max())
    if case in ("rgb", "grey_with_nan_and_inf"):
        assert candidates == [pytest.approx(0.004 * finite.size, rel=0.3)]  # the tail only
    else:
        assert candidates == [finite.size]
