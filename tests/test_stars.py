"""Star extraction against synthetic fields of known truth, and on real frames."""

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree
from scipy.special import erf

from nightstack.errors import NightstackError
from nightstack.stars import (
    FWHM_PER_SIGMA,
    detect_stars,
    find_candidates,
    fit_stars,
    luminance,
    star_config_from_dict,
)

SKY_ADU = 800.0
READ_NOISE_ADU = 6.0
GAIN_E_PER_ADU = 1.0


# --------------------------------------------------------------------------- synthetic fields


def jittered_positions(rng, width, height, cell_px, margin_px):
    """Sub-pixel positions, one per grid cell, so that no two stars blend."""
    gx = np.arange(margin_px, width - margin_px - cell_px + 1, cell_px)
    gy = np.arange(margin_px, height - margin_px - cell_px + 1, cell_px)
    x, y = (a.ravel() for a in np.meshgrid(gx, gy))
    x = x + rng.uniform(0.25, 0.75, x.size) * cell_px
    y = y + rng.uniform(0.25, 0.75, y.size) * cell_px
    return x, y


def pixel_integrated_gaussian(x, y, flux, sigma_x, sigma_y, radius, shape):
    """Axis-aligned Gaussians integrated over pixels (exact, via erf), stamped into an image."""
    img = np.zeros(shape)
    off = np.arange(-radius, radius + 1)
    xc, yc = np.rint(x).astype(int), np.rint(y).astype(int)
    cols, rows = xc[:, None] + off, yc[:, None] + off

    def profile(edges_from_centre, sigma):
        s = np.sqrt(2.0) * sigma[:, None]
        return 0.5 * (erf((edges_from_centre + 0.5) / s) - erf((edges_from_centre - 0.5) / s))

    px = profile(cols - x[:, None], sigma_x)
    py = profile(rows - y[:, None], sigma_y)
    stamps = flux[:, None, None] * py[:, :, None] * px[:, None, :]
    np.add.at(img, (rows[:, :, None], cols[:, None, :]), stamps)
    return img


def supersampled_profile(x, y, flux, radius, shape, profile_fn, oversample=5):
    """Any PSF profile_fn(dx, dy) (unit integral), averaged over sub-pixels, stamped in."""
    img = np.zeros(shape)
    off = np.arange(-radius, radius + 1)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    fine = (off[:, None] + sub[None, :]).ravel()
    xc, yc = np.rint(x).astype(int), np.rint(y).astype(int)
    dx = (xc - x)[:, None, None] + fine[None, None, :]
    dy = (yc - y)[:, None, None] + fine[None, :, None]
    values = profile_fn(dx, dy)
    n, s = len(x), 2 * radius + 1
    values = values.reshape(n, s, oversample, s, oversample).mean(axis=(2, 4))
    rows, cols = yc[:, None] + off, xc[:, None] + off
    np.add.at(img, (rows[:, :, None], cols[:, None, :]), flux[:, None, None] * values)
    return img


def observe(rng, stars_adu, n_hot=0):
    """Sky gradient + stars -> Poisson + read noise; some hot pixels. Returns (image, hot xy)."""
    h, w = stars_adu.shape
    yy, xx = np.mgrid[0:h, 0:w]
    sky = SKY_ADU * (1.0 + 0.4 * xx / w + 0.2 * yy / h)
    electrons = rng.poisson((sky + stars_adu) * GAIN_E_PER_ADU)
    image = electrons / GAIN_E_PER_ADU + rng.normal(0.0, READ_NOISE_ADU, (h, w))
    hot_x = rng.integers(0, w, n_hot)
    hot_y = rng.integers(0, h, n_hot)
    image[hot_y, hot_x] += rng.uniform(2000.0, 20000.0, n_hot)
    return image.astype(np.float32), np.column_stack([hot_x, hot_y])


def sky_noise_adu():
    """Per-pixel noise at the mean sky level of observe()."""
    mean_sky = SKY_ADU * 1.3
    return np.sqrt(mean_sky / GAIN_E_PER_ADU + READ_NOISE_ADU**2)


def true_snr(flux, fwhm_px):
    """The catalog's snr definition applied to the true flux and FWHM."""
    return flux / (sky_noise_adu() * np.sqrt(np.pi) * fwhm_px)


def log_uniform_fluxes(rng, n, fwhm_px, snr_lo, snr_hi):
    snr = np.exp(rng.uniform(np.log(snr_lo), np.log(snr_hi), n))
    return snr * sky_noise_adu() * np.sqrt(np.pi) * fwhm_px


def match(truth_xy, found_xy, radius_px):
    """For each true star, the index of the nearest detection within radius (or -1)."""
    if len(found_xy) == 0:
        return np.full(len(truth_xy), -1)
    dist, idx = cKDTree(found_xy).query(truth_xy, distance_upper_bound=radius_px)
    return np.where(np.isfinite(dist), idx, -1)


@pytest.fixture(scope="module")
def gaussian_field():
    """1000x800 px field: Gaussian PSF, FWHM 3.0 px (continuous), snr 5..3000, hot pixels."""
    rng = np.random.default_rng(1)
    w, h, fwhm = 1000, 800, 3.0
    x, y = jittered_positions(rng, w, h, cell_px=32, margin_px=4)
    sigma = np.full(x.size, fwhm / FWHM_PER_SIGMA)
    flux = log_uniform_fluxes(rng, x.size, fwhm, 5.0, 3000.0)
    stars = pixel_integrated_gaussian(x, y, flux, sigma, sigma, 12, (h + 40, w + 40))
    image, hot = observe(rng, stars[:h, :w], n_hot=300)
    # A pixel-integrated Gaussian is, to high accuracy, a Gaussian of variance sigma^2 + 1/12.
    fwhm_pixelated = FWHM_PER_SIGMA * np.sqrt(sigma[0] ** 2 + 1.0 / 12.0)
    inside = (x < w - 0.5) & (y < h - 0.5)
    return {
        "image": image, "x": x[inside], "y": y[inside], "flux": flux[inside],
        "fwhm": fwhm_pixelated, "hot": hot,
    }


@pytest.fixture(scope="module")
def gaussian_catalog(gaussian_field):
    return detect_stars(gaussian_field["image"])


# --------------------------------------------------------------------------- config & helpers


def test_config_from_dict_accepts_known_and_rejects_unknown_keys():
    cfg = star_config_from_dict({"detect_sigma": 4, "max_stars": 100, "stamp_radius_px": None})
    assert cfg.detect_sigma == 4.0 and cfg.max_stars == 100 and cfg.stamp_radius_px is None
    with pytest.raises(NightstackError, match="detect_sigmaa"):
        star_config_from_dict({"detect_sigmaa": 4})
    with pytest.raises(NightstackError, match="max_fwhm_px"):
        star_config_from_dict({"min_fwhm_px": 30.0})
    with pytest.raises(NightstackError, match="max_stars"):
        star_config_from_dict({"max_stars": "many"})


def test_luminance_averages_colour_and_passes_mono_through():
    rgb = np.stack([np.full((4, 5), v, np.float32) for v in (1.0, 2.0, 6.0)])
    assert luminance(rgb).shape == (4, 5) and np.allclose(luminance(rgb), 3.0)
    mono = np.arange(20, dtype=np.uint16).reshape(4, 5)
    assert luminance(mono).dtype == np.float32 and np.array_equal(luminance(mono), mono)
    with pytest.raises(NightstackError):
        luminance(np.zeros(5))


def test_detect_stars_rejects_mask_of_wrong_shape():
    with pytest.raises(NightstackError, match="mask"):
        detect_stars(np.zeros((50, 60), np.float32), mask=np.ones((60, 50), bool))


# --------------------------------------------------------------------------- synthetic truth


def test_centroids_are_accurate_and_unbiased(gaussian_field, gaussian_catalog):
    f, cat = gaussian_field, gaussian_catalog
    bright = true_snr(f["flux"], f["fwhm"]) > 50
    idx = match(np.column_stack([f["x"], f["y"]])[bright],
                np.column_stack([cat["x"], cat["y"]]), 1.5)
    assert np.all(idx >= 0)
    dx = np.asarray(cat["x"])[idx] - f["x"][bright]
    dy = np.asarray(cat["y"])[idx] - f["y"][bright]
    rms = np.sqrt(np.mean(dx**2 + dy**2) / 2)
    assert rms < 0.05
    n = bright.sum()
    assert abs(dx.mean()) < 4 * rms / np.sqrt(n) + 0.003
    assert abs(dy.mean()) < 4 * rms / np.sqrt(n) + 0.003


def test_gaussian_fwhm_and_flux_are_recovered(gaussian_field, gaussian_catalog):
    f, cat = gaussian_field, gaussian_catalog
    bright = true_snr(f["flux"], f["fwhm"]) > 30
    idx = match(np.column_stack([f["x"], f["y"]])[bright],
                np.column_stack([cat["x"], cat["y"]]), 1.5)
    fwhm = np.asarray(cat["fwhm_px"])[idx]
    assert abs(np.median(fwhm) / f["fwhm"] - 1) < 0.05
    assert np.all(np.abs(fwhm / f["fwhm"] - 1) < 0.15)
    flux_ratio = np.asarray(cat["flux"])[idx] / f["flux"][bright]
    assert abs(np.median(flux_ratio) - 1) < 0.05
    assert abs(cat.meta["fwhm_px_median"] / f["fwhm"] - 1) < 0.05
    assert cat.meta["ellipticity_median"] < 0.1


def test_completeness_and_no_false_detections(gaussian_field, gaussian_catalog):
    f, cat = gaussian_field, gaussian_catalog
    truth = np.column_stack([f["x"], f["y"]])
    found = np.column_stack([cat["x"], cat["y"]])
    snr_true = true_snr(f["flux"], f["fwhm"])
    idx = match(truth, found, 1.5)
    assert np.mean(idx[snr_true > 20] >= 0) > 0.95
    # Every detection must be a true star; hot pixels in particular are not stars.
    nearest_truth = match(found, truth, 1.5)
    assert np.mean(nearest_truth < 0) < 0.02
    hot_matches = match(f["hot"].astype(float), found, 1.0)
    lone_hot = match(f["hot"].astype(float), truth, 8.0) < 0
    assert np.sum((hot_matches >= 0) & lone_hot) == 0
    # Sorted by flux, with the documented meta data.
    assert np.all(np.diff(cat["flux"]) <= 0)
    assert cat.meta["n_stars"] == len(cat) and cat.meta["n_candidates"] >= len(cat)
    assert (cat.meta["width_px"], cat.meta["height_px"]) == (1000, 800)
    assert abs(cat.meta["noise_adu"] / sky_noise_adu() - 1) < 0.15
    assert abs(cat.meta["background_adu"] / (SKY_ADU * 1.3) - 1) < 0.1


def test_reported_snr_tracks_the_truth(gaussian_field, gaussian_catalog):
    f, cat = gaussian_field, gaussian_catalog
    idx = match(np.column_stack([f["x"], f["y"]]), np.column_stack([cat["x"], cat["y"]]), 1.5)
    found = idx >= 0
    ratio = np.asarray(cat["snr"])[idx[found]] / true_snr(f["flux"][found], f["fwhm"])
    assert 0.8 < np.median(ratio) < 1.25


def test_moffat_stars_are_found_and_centred():
    rng = np.random.default_rng(2)
    w, h, fwhm, beta = 600, 500, 4.0, 3.0
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    x, y = jittered_positions(rng, w, h, cell_px=40, margin_px=20)
    flux = log_uniform_fluxes(rng, x.size, fwhm, 30.0, 3000.0)

    def moffat(dx, dy):
        return (beta - 1) / (np.pi * alpha**2) * (1 + (dx**2 + dy**2) / alpha**2) ** -beta

    stars = supersampled_profile(x, y, flux, 16, (h, w), moffat)
    image, _ = observe(rng, stars)
    cat = detect_stars(image)
    idx = match(np.column_stack([x, y]), np.column_stack([cat["x"], cat["y"]]), 1.5)
    assert np.mean(idx >= 0) > 0.95
    found = idx >= 0
    err = np.hypot(np.asarray(cat["x"])[idx[found]] - x[found],
                   np.asarray(cat["y"])[idx[found]] - y[found])
    assert np.sqrt(np.mean(err**2)) < 0.1
    # A Gaussian fitted to the core of a Moffat comes out near the Moffat's FWHM.
    assert 0.85 < cat.meta["fwhm_px_median"] / fwhm < 1.2
    assert len(cat) < 1.02 * x.size


def test_elongated_stars_report_their_ellipticity_and_width():
    rng = np.random.default_rng(3)
    w, h = 600, 500
    sigma_major, sigma_minor, angle = 2.6, 1.5, np.deg2rad(30.0)
    x, y = jittered_positions(rng, w, h, cell_px=40, margin_px=20)
    flux = log_uniform_fluxes(rng, x.size, 5.0, 50.0, 1000.0)
    cos, sin = np.cos(angle), np.sin(angle)

    def elliptical(dx, dy):
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        g = np.exp(-0.5 * ((u / sigma_major) ** 2 + (v / sigma_minor) ** 2))
        return g / (2 * np.pi * sigma_major * sigma_minor)

    stars = supersampled_profile(x, y, flux, 14, (h, w), elliptical)
    image, _ = observe(rng, stars)
    cat = detect_stars(image)
    # Pixelation adds 1/12 px^2 of variance to (nearly) both axes.
    a, b = np.sqrt(sigma_major**2 + 1 / 12), np.sqrt(sigma_minor**2 + 1 / 12)
    assert len(cat) > 0.95 * x.size
    assert abs(cat.meta["ellipticity_median"] - (1 - b / a)) < 0.03
    assert abs(cat.meta["fwhm_px_median"] / (FWHM_PER_SIGMA * np.sqrt(a * b)) - 1) < 0.05


def test_saturated_stars_keep_a_good_centre_and_show_their_peak():
    rng = np.random.default_rng(4)
    w, h, fwhm, clip_adu = 400, 300, 3.5, 20000.0
    x, y = jittered_positions(rng, w, h, cell_px=50, margin_px=20)
    flux = np.full(x.size, 2e6)  # peak ~ 1e5 ADU above sky: flat-topped after clipping
    sigma = np.full(x.size, fwhm / FWHM_PER_SIGMA)
    stars = pixel_integrated_gaussian(x, y, flux, sigma, sigma, 20, (h + 50, w + 50))[:h, :w]
    image, _ = observe(rng, stars)
    image = np.minimum(image, clip_adu)
    cat = detect_stars(image)
    idx = match(np.column_stack([x, y]), np.column_stack([cat["x"], cat["y"]]), 1.5)
    assert np.all(idx >= 0) and len(cat) == x.size
    err = np.hypot(np.asarray(cat["x"])[idx] - x, np.asarray(cat["y"])[idx] - y)
    assert np.max(err) < 0.2
    assert np.all(np.asarray(cat["peak"]) >= cat.meta["saturation_adu"])


def test_pure_noise_gives_almost_no_stars():
    rng = np.random.default_rng(5)
    image, _ = observe(rng, np.zeros((800, 1000)), n_hot=100)
    cat = detect_stars(image)
    assert len(cat) <= 3


def test_mask_limits_where_stars_are_found(gaussian_field):
    image = gaussian_field["image"]
    mask = np.zeros(image.shape, bool)
    mask[:, :500] = True
    cat = detect_stars(image, mask=mask)
    assert len(cat) > 100 and np.all(np.asarray(cat["x"]) < 505)


def test_fit_stars_and_candidates_agree_with_detect(gaussian_field):
    image = gaussian_field["image"][:300, :300]
    x0, y0, scale, peak = find_candidates(image)
    assert len(x0) > 20 and np.all(np.diff(peak) <= 0) and np.all(scale > 0)
    fits_ = fit_stars(image, x0, y0, scale_px=scale)
    assert set(fits_) >= {"x", "y", "flux", "fwhm_px", "ellipticity", "snr", "background",
                          "peak", "ok"}
    assert fits_["ok"].sum() > 20 and len(fits_["x"]) == len(x0)


def test_edge_stars_are_fitted_without_padding_artifacts():
    rng = np.random.default_rng(6)
    w, h, fwhm = 200, 100, 3.0
    x = np.array([1.3, 198.6, 100.2, 50.7])
    y = np.array([50.4, 40.8, 1.1, 98.4])
    sigma = np.full(4, fwhm / FWHM_PER_SIGMA)
    stars = pixel_integrated_gaussian(x + 20, y + 20, np.full(4, 2e5), sigma, sigma, 10,
                                      (h + 40, w + 40))[20:-20, 20:-20]
    image, _ = observe(rng, stars)
    cat = detect_stars(image)
    idx = match(np.column_stack([x, y]), np.column_stack([cat["x"], cat["y"]]), 1.0)
    assert np.all(idx >= 0)
    err = np.hypot(np.asarray(cat["x"])[idx] - x, np.asarray(cat["y"])[idx] - y)
    assert np.max(err) < 0.15


# --------------------------------------------------------------------------- real frames


def binned_bayer_luminance(cfa):
    """Raw 2x2 Bayer mosaic -> half-size luminance: the mean of each 2x2 cell."""
    cfa = np.asarray(cfa, dtype=np.float32)
    h, w = cfa.shape[0] // 2 * 2, cfa.shape[1] // 2 * 2
    return cfa[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def test_real_m27_raw_frame_has_many_plausible_stars(shared_data):
    raw = fits.getdata(shared_data("als_m27_asi224mc") / "Light_1069.fits")
    cat = detect_stars(binned_bayer_luminance(raw))
    assert len(cat) > 100
    assert 1.0 < cat.meta["fwhm_px_median"] < 6.0
    assert cat.meta["ellipticity_median"] < 0.35


def test_real_dslr_jpeg_has_stars(shared_data):
    from PIL import Image

    path = shared_data("dslr_canon_jpeg_pair") / "20130906_015110_IMG_8470-preview3.jpg"
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    cat = detect_stars(rgb.transpose(2, 0, 1))
    assert len(cat) > 50
    assert 1.0 < cat.meta["fwhm_px_median"] < 12.0
