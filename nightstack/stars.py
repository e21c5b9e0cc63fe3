"""Star extraction (seed 000, "Star extraction"): find, fit and prune stars in one image.

1. Candidates: a small difference-of-Gaussians (DoG) pyramid. Each level's response is
   divided by its own robust noise, so the levels compare in signal-to-noise units; every
   pixel keeps its best level. Local maxima above ``detect_sigma`` are candidates, strongest
   first (the vectorised form of the seed's "take the strongest blob, blank its radius").
2. Fit: every candidate gets a square stamp; an elliptical 2D Gaussian
   ``B + A exp(-q/2)``, ``q = a dx^2 + 2 b dx dy + c dy^2`` is fitted to all stamps at once
   by batched Levenberg-Marquardt. ``B`` is fixed to the median of the stamp's outer ring.
   As in the seed, pixels within ``background_sigma`` noise sigmas of the background get no
   weight: the first pass uses the pixel values, later passes the fitted star itself (pixels
   where the model rises more than ``background_sigma`` sigmas above ``B``, and at least
   those within 2 sigma of the centre), which avoids favouring pixels that happen to be
   noisy-high; pixels within 2 px of the centre always count, so undersampled stars keep
   enough pixels, while pixels the fit cannot explain (>5 sigma + 25 %: a hot pixel or
   cosmic ray on the star) drop out. Saturated pixels get no weight, so flat-topped stars are centred on their wings.
3. Pruning: failed fits, fits that wandered more than ~1 FWHM from their candidate, low SNR,
   implausible width or elongation, and duplicates (two fits within ~1 px: keep the brighter).

Conventions: pixel centres at integers, x = column, y = row; intensities in the image's ADU.
``snr`` is background-limited: ``flux / (noise * sqrt(pi) * fwhm_px * noise_correlation)``,
i.e. flux over the sky noise summed in a circular aperture of radius one FWHM (which holds
~94 % of a Gaussian); ``noise`` is the robust sigma of the stamp's outer ring and
``noise_correlation`` (>= 1, in detect_stars' meta) how much noisier the sky is at star scale
than white pixel noise predicts (JPEG blotches, demosaicing, crowding).

Isolated hot pixels are repaired before detection (repair_hot_pixels); clusters of hot pixels
smeared by demosaicing (colourful dots in camera JPEGs) look like small stars and stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from astropy.stats import sigma_clipped_stats
from scipy.spatial import cKDTree

from .errors import NightstackError
from .filters import gaussian_filter, nonzero_2d
from .robust import nanmedian_last_axis
from .settings import settings_from_dict

if TYPE_CHECKING:
    from astropy.table import Table

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
MAD_TO_SIGMA = 1.4826
DOG_RATIO = 1.6  # outer / inner sigma of each DoG level, and the step between levels
QUANTISATION_NOISE_ADU = 1.0 / np.sqrt(12.0)  # noise floor of integer-valued data
STAR_COLUMNS = ("x", "y", "flux", "fwhm_px", "ellipticity", "snr", "peak")
N_PARAMS = 6  # A, x0, y0, a, b, c
FIT_CHUNK_STARS = 128  # stars fitted together (vectorised; 128 was fastest of 32-2048 on 24 MP)
# From this many candidates on, the compiled fit (psf_fit) is used: 3x faster per star, but
# loading numba and its cache costs a job about 0.4 s, more than a small frame's whole fit.
COMPILED_FIT_MIN_STARS = 1500


@dataclass
class StarConfig:
    """Settings of star extraction; the defaults work untuned on all shared data."""

    dog_sigma_px: float = 1.2  # inner Gaussian of the finest DoG level; outer = 1.6x
    dog_levels: int = 3  # DoG levels, each 1.6x coarser: 1.2, 1.9, 3.1 px cover FWHM 1.5..12 px
    detect_sigma: float = 5.0  # candidate threshold, in units of each level's robust DoG noise
    max_stars: int = 5000
    stamp_radius_px: int | None = None  # None: chosen from the DoG level of each candidate
    min_snr: float = 5.0
    min_fwhm_px: float = 0.8  # narrower: hot pixels / noise spikes
    max_fwhm_px: float = 25.0
    max_ellipticity: float = 0.6
    background_sigma: float = 2.0  # pixels within this many sigma of the background: no weight
    fit_iterations: int = 8  # Levenberg-Marquardt iterations per weighting pass (3 passes)


def star_config_from_dict(d: dict | None) -> StarConfig:
    """Build a StarConfig from a settings dict; unknown keys or bad values -> NightstackError."""
    cfg = settings_from_dict(StarConfig, d, "star")
    _validate_config(cfg)
    return cfg


def _validate_config(cfg: StarConfig) -> None:
    problems = []
    if cfg.dog_sigma_px <= 0:
        problems.append("dog_sigma_px must be > 0")
    if not 1 <= cfg.dog_levels <= 6:
        problems.append("dog_levels must be 1..6")
    if cfg.detect_sigma <= 0:
        problems.append("detect_sigma must be > 0")
    if cfg.max_stars < 1:
        problems.append("max_stars must be >= 1")
    if cfg.stamp_radius_px is not None and cfg.stamp_radius_px < 3:
        problems.append("stamp_radius_px must be >= 3")
    if not 0 < cfg.min_fwhm_px < cfg.max_fwhm_px:
        problems.append("need 0 < min_fwhm_px < max_fwhm_px")
    if not 0 < cfg.max_ellipticity <= 1:
        problems.append("max_ellipticity must be in (0, 1]")
    if cfg.background_sigma < 0:
        problems.append("background_sigma must be >= 0")
    if cfg.fit_iterations < 1:
        problems.append("fit_iterations must be >= 1")
    if problems:
        raise NightstackError("star settings: " + "; ".join(problems))


def luminance(image) -> np.ndarray:
    """Image (H, W) or colour (C, H, W) -> float32 (H, W); colour is averaged over channels."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        return arr.astype(np.float32, copy=False)
    if arr.ndim == 3:
        return arr.mean(axis=0, dtype=np.float32)
    raise NightstackError(f"expected an image shaped (H, W) or (C, H, W), got shape {arr.shape}")


# --------------------------------------------------------------------------- sky statistics


def _robust_sigma(values: np.ndarray) -> float:
    """1.4826 * median absolute deviation of a flat array."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size == 0:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(values - np.median(values))))


def sky_background_and_noise(image2d: np.ndarray, block_px: int = 32) -> tuple[float, float]:
    """Robust sky level and per-pixel sky noise (ADU) of a 2D image.

    Median and MAD are taken in blocks (of every second pixel, for speed) and the median
    over blocks is returned, so stars, nebulae and smooth gradients barely move either figure.
    """
    sub = np.asarray(image2d, dtype=np.float32)
    if min(sub.shape) >= 4 * block_px:
        sub = sub[::2, ::2]
    nby, nbx = sub.shape[0] // block_px, sub.shape[1] // block_px
    if nby == 0 or nbx == 0:
        return float(np.median(sub)), _robust_sigma(sub)
    blocks = sub[: nby * block_px, : nbx * block_px].reshape(nby, block_px, nbx, block_px)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(nby * nbx, block_px * block_px)
    med = np.median(blocks, axis=1)
    mad = np.median(np.abs(blocks - med[:, None]), axis=1)
    return float(np.median(med)), float(MAD_TO_SIGMA * np.median(mad))


def _noise_floor_adu(image2d: np.ndarray) -> float:
    """Smallest believable pixel noise: quantisation for integer-valued data, else ~0."""
    sample = np.asarray(image2d).ravel()[:: max(1, image2d.size // 20000)]
    if sample.size and np.all(sample == np.round(sample)):
        return QUANTISATION_NOISE_ADU
    return 1e-6 * max(1.0, float(np.max(np.abs(sample))) if sample.size else 1.0)


def _clipped_sigma(values: np.ndarray, max_samples: int = 300_000) -> float:
    """3-sigma-clipped standard deviation of (a regular subsample of) an array.

    Star wings fill several % of a crowded frame's DoG response; a MAD widens with them,
    iterative clipping much less.
    """
    flat = np.asarray(values).ravel()
    flat = flat[:: max(1, flat.size // max_samples)]
    _, _, std = sigma_clipped_stats(flat, sigma=3.0, maxiters=10)
    return float(std)


def noise_correlation_factor(dog_noise: float, pixel_noise_adu: float, cfg: StarConfig) -> float:
    """How much more noise the finest DoG level sees than white pixel noise would give (>= 1).

    Demosaiced and JPEG-compressed frames have blotchy, correlated noise: sums over a star's
    footprint are noisier than sqrt(n) * pixel noise. This factor corrects the SNR for that.
    """
    white = pixel_noise_adu * _dog_white_noise_gain(cfg.dog_sigma_px, DOG_RATIO * cfg.dog_sigma_px)
    if white <= 0 or not np.isfinite(dog_noise):
        return 1.0
    return float(max(1.0, dog_noise / white))


def _dog_white_noise_gain(sigma_in: float, sigma_out: float) -> float:
    """Std of a DoG(sigma_in, sigma_out) response to unit-variance white noise."""
    s1, s2 = sigma_in**2, sigma_out**2
    var = 1 / (4 * np.pi * s1) + 1 / (4 * np.pi * s2) - 1 / (np.pi * (s1 + s2))
    return float(np.sqrt(max(var, 0.0)))


def _saturation_level(image2d: np.ndarray, background_adu: float) -> float | None:
    """ADU above which pixels count as saturated, or None when nothing looks clipped.

    Clipping shows as several pixels sharing the image maximum; everything within 2 % of
    that maximum (above the sky) is then treated as unreliable.
    """
    vmax = float(np.max(image2d))
    span = vmax - background_adu
    if span <= 0:
        return None
    n_at_max = int(np.count_nonzero(image2d >= vmax - 1e-4 * span))
    if n_at_max < 4:
        return None
    return background_adu + 0.98 * span


def _finite_image(image2d) -> np.ndarray:
    img = np.asarray(image2d, dtype=np.float32)
    if img.ndim != 2:
        raise NightstackError(f"expected a 2D image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        img = img.copy()
        bad = ~np.isfinite(img)
        img[bad] = np.median(img[~bad]) if np.any(~bad) else 0.0
    return img


def repair_hot_pixels(image2d, noise_adu: float, threshold_sigma: float = 5.0):
    """Replace isolated hot pixels by the median of their 8 neighbours.

    A pixel is hot when it stands more than ``threshold_sigma`` * ``noise_adu`` above the
    median of the 5x5 border around it while none of its 4 direct neighbours carries even
    20 % of that excess: even a star of FWHM 1.5 px puts ~35 % of its peak into the next
    pixel. The outermost 2 pixels of the frame are not examined. Returns (float32 (H, W)
    with the hot pixels replaced, number replaced); the input is not modified.
    """
    img = np.asarray(image2d, dtype=np.float32)
    h, w = img.shape
    if h < 5 or w < 5:
        return img, 0
    core = img[2:-2, 2:-2]
    # one full-frame buffer, filled in place: each fresh 24 MP temporary costs its page faults
    neighbour_max = np.maximum(img[1:-3, 2:-2], img[3:-1, 2:-2])
    np.maximum(neighbour_max, img[2:-2, 1:-3], out=neighbour_max)
    np.maximum(neighbour_max, img[2:-2, 3:-1], out=neighbour_max)
    # Cheap full-frame preselection; the real test runs on the few pixels that pass.
    passing = np.subtract(core, neighbour_max) > 0.5 * threshold_sigma * noise_adu
    rows, cols = nonzero_2d(passing)
    del passing
    if rows.size == 0:
        return img, 0
    rows, cols = rows + 2, cols + 2
    d = np.arange(-2, 3)
    ring = (np.abs(d)[:, None] == 2) | (np.abs(d)[None, :] == 2)
    dr, dc = np.broadcast_to(d[:, None], (5, 5))[ring], np.broadcast_to(d[None, :], (5, 5))[ring]
    local = np.median(img[rows[:, None] + dr, cols[:, None] + dc], axis=1)
    excess = img[rows, cols] - local
    near_max = neighbour_max[rows - 2, cols - 2]
    hot = (excess > threshold_sigma * noise_adu) & (near_max - local < 0.2 * excess)
    rows, cols = rows[hot], cols[hot]
    if rows.size == 0:
        return img, 0
    eight_r = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
    eight_c = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
    replacement = np.median(img[rows[:, None] + eight_r, cols[:, None] + eight_c], axis=1)
    img = img.copy()
    img[rows, cols] = replacement
    return img, int(rows.size)


# --------------------------------------------------------------------------- candidates


def dog_sigmas_px(cfg: StarConfig) -> np.ndarray:
    """Inner sigma (px) of every DoG level."""
    return cfg.dog_sigma_px * DOG_RATIO ** np.arange(cfg.dog_levels)


def _dog_pyramid(img: np.ndarray, cfg: StarConfig, noise_floor: float):
    """Yield (DoG / its noise, stride, inner sigma in image px, DoG noise) for each level.

    A real pyramid: once the running blur is >= 1.8 px of the current grid, sampling every
    second pixel loses nothing, so coarse levels are computed on 2x, 4x ... smaller grids.
    """
    sigmas = cfg.dog_sigma_px * DOG_RATIO ** np.arange(cfg.dog_levels + 1)
    stride = 1
    current = gaussian_filter(img, sigmas[0], mode="nearest")
    for k in range(cfg.dog_levels):
        # Each coarser blur is built from the previous one: smaller kernels, same result.
        extra = np.sqrt(sigmas[k + 1] ** 2 - sigmas[k] ** 2) / stride
        coarser = gaussian_filter(current, extra, mode="nearest")
        dog = current - coarser
        noise = max(
            _clipped_sigma(dog), noise_floor * _dog_white_noise_gain(sigmas[k], sigmas[k + 1])
        )
        dog /= noise
        yield dog, stride, sigmas[k], noise
        current = coarser
        if sigmas[k + 1] / stride >= 1.8 and k + 1 < cfg.dog_levels:
            current = current[::2, ::2]
            stride *= 2


def _local_maxima(snr: np.ndarray, threshold: float):
    """(rows, cols, values) of pixels above threshold that are maxima of their 3x3.

    Only pixels above threshold are compared with their neighbours, which on a star field
    is a tiny fraction of the frame (much cheaper than a full maximum filter).
    """
    rows, cols = nonzero_2d(snr > threshold)
    values = snr[rows, cols]
    h, w = snr.shape
    is_max = np.ones(rows.size, dtype=bool)
    for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        neighbour = snr[np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)]
        is_max &= values >= neighbour
    return rows[is_max], cols[is_max], values[is_max]


def find_candidates(image2d, cfg: StarConfig = StarConfig(), mask=None):
    """Star candidates in a 2D image: local maxima of a multi-scale DoG response.

    Each DoG level finds its own maxima (in its noise sigmas); of candidates closer than
    2 DoG sigmas only the strongest survives. Returns ``(x, y, scale_px, dog_peak)``:
    integer pixel positions (float64), the inner DoG sigma (px) of the candidate's level, and
    its response in noise sigmas; strongest first, at most ``2 * max_stars``. ``mask``
    (bool (H, W), True = may hold stars) drops candidates outside it. Hot pixels are not
    removed here (see repair_hot_pixels / detect_stars).
    """
    img = _finite_image(image2d)
    return _find_candidates(img, cfg, _noise_floor_adu(img), mask)[:4]


def _find_candidates(img, cfg, noise_floor, mask=None):
    h, w = img.shape
    xs, ys, scales, strengths = [], [], [], []
    dog_noise_finest = None
    for snr, stride, sigma, dog_noise in _dog_pyramid(img, cfg, noise_floor):
        if dog_noise_finest is None:
            dog_noise_finest = dog_noise
        rows, cols, values = _local_maxima(snr, cfg.detect_sigma)
        ys.append(np.minimum(rows * stride, h - 1))
        xs.append(np.minimum(cols * stride, w - 1))
        scales.append(np.full(rows.size, sigma))
        strengths.append(values)
    x, y = np.concatenate(xs), np.concatenate(ys)
    scale, strength = np.concatenate(scales), np.concatenate(strengths)
    if mask is not None:
        inside = mask[y, x]
        x, y, scale, strength = x[inside], y[inside], scale[inside], strength[inside]
    order = np.argsort(-strength, kind="stable")[: 6 * cfg.max_stars]
    x, y, scale, strength = x[order], y[order], scale[order], strength[order]
    keep = _suppress_weaker_neighbours(x, y, scale)[: 2 * cfg.max_stars]
    return (
        x[keep].astype(np.float64),
        y[keep].astype(np.float64),
        scale[keep].astype(np.float64),
        strength[keep].astype(np.float64),
        dog_noise_finest,
    )


def _suppress_weaker_neighbours(x, y, scale_px) -> np.ndarray:
    """Indices of candidates (sorted strongest first) not within 2 scales of a stronger one."""
    if len(x) < 2:
        return np.arange(len(x))
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(r=2.0 * float(scale_px.max()), output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(len(x))
    i, j = pairs[:, 0], pairs[:, 1]  # i < j, so i is the stronger
    dist = np.hypot(x[i] - x[j], y[i] - y[j])
    close = dist < 2.0 * np.maximum(scale_px[i], scale_px[j])
    suppressed = np.zeros(len(x), dtype=bool)
    suppressed[j[close]] = True
    return np.flatnonzero(~suppressed)


# --------------------------------------------------------------------------- fitting


def stamp_radius_px(scale_px, cfg: StarConfig) -> np.ndarray:
    """Stamp half-size (px) per candidate: fixed by cfg or ~4.5 DoG sigmas (at least 5)."""
    scale_px = np.asarray(scale_px, dtype=float)
    if cfg.stamp_radius_px is not None:
        return np.full(scale_px.shape, int(cfg.stamp_radius_px))
    return np.maximum(5, np.ceil(4.5 * scale_px)).astype(int)


def fit_stars(
    image2d,
    x0,
    y0,
    cfg: StarConfig = StarConfig(),
    scale_px=None,
    saturation_adu: float | None = None,
    noise_floor_adu: float | None = None,
    noise_correlation: float = 1.0,
) -> dict:
    """Fit an elliptical Gaussian to the star near each (x0, y0) (pixels), all at once.

    ``scale_px`` (per star, px) is the first guess of the Gaussian sigma and sets the stamp
    size (default ``cfg.dog_sigma_px``); pixels at or above ``saturation_adu`` get no weight;
    ``noise_correlation`` (>= 1, see noise_correlation_factor) divides the white-noise SNR.
    Returns a dict of float64 arrays (bool for ``ok``): x, y (px), flux (ADU summed over the
    star), fwhm_px (geometric mean of the axes), ellipticity (1 - minor/major), snr (see
    module doc), background and noise (ADU, of the stamp's outer ring), peak (brightest raw
    pixel near the centre, background included: compare with the saturation level), ok.
    """
    img = _finite_image(image2d)
    x0 = np.atleast_1d(np.asarray(x0, dtype=float))
    y0 = np.atleast_1d(np.asarray(y0, dtype=float))
    if x0.shape != y0.shape:
        raise NightstackError("fit_stars: x0 and y0 differ in length")
    scale = np.full(x0.shape, cfg.dog_sigma_px) if scale_px is None else np.asarray(scale_px, float)
    if noise_floor_adu is None:
        noise_floor_adu = _noise_floor_adu(img)
    radius = stamp_radius_px(scale, cfg)
    keys = ("x", "y", "flux", "fwhm_px", "ellipticity", "snr", "background", "noise", "peak")
    out = {k: np.full(x0.shape, np.nan) for k in keys}
    out["ok"] = np.zeros(x0.shape, dtype=bool)
    if len(x0) >= COMPILED_FIT_MIN_STARS:
        from .psf_fit import levenberg_marquardt
    else:
        levenberg_marquardt = _levenberg_marquardt
    # One batch per stamp size (a handful: one per DoG level).
    for r in np.unique(radius):
        same_size = np.flatnonzero(radius == r)
        # in chunks: each star's fit is independent, and a chunk's Jacobian (6 x stamp x chunk
        # float64) stays in cache instead of reaching 700 MB for 7000 large stars
        for lo in range(0, len(same_size), FIT_CHUNK_STARS):
            sel = same_size[lo:lo + FIT_CHUNK_STARS]
            part = _fit_batch(img, x0[sel], y0[sel], int(r), scale[sel], cfg, saturation_adu,
                              noise_floor_adu, levenberg_marquardt)
            for key, values in part.items():
                out[key][sel] = values
    out["snr"] /= noise_correlation
    return out


def _cut_stamps(img, xc, yc, r):
    """Stamps (N, s, s) float64 around integer centres; pixels off the frame are flagged."""
    h, w = img.shape
    off = np.arange(-r, r + 1)
    rows = yc[:, None, None] + off[None, :, None]
    cols = xc[:, None, None] + off[None, None, :]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    data = img[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)].astype(np.float64)
    return data, inside


def _ring_background(data, inside, r, noise_floor):
    """Median and robust sigma of each stamp's outer ring (off-frame pixels ignored)."""
    off = np.arange(-r, r + 1)
    ring = np.hypot(off[:, None], off[None, :]) >= r - 1.0
    values = np.where(inside[:, ring], data[:, ring], np.nan)
    bg = nanmedian_last_axis(values)  # NaN for the all-NaN ring of a stamp off the frame
    noise = MAD_TO_SIGMA * nanmedian_last_axis(np.abs(values - bg[:, None]))
    bg = np.where(np.isfinite(bg), bg, 0.0)
    noise = np.where(np.isfinite(noise), np.maximum(noise, noise_floor), np.inf)
    return bg, noise


def _gaussian_model(p, dx_grid, dy_grid, jac_out=None):
    """Star model A exp(-q/2) (N, M) over stamp offsets, and q; fills jac_out (N, 6, M)."""
    amp, x0, y0, a, b, c = (p[:, i, None] for i in range(N_PARAMS))
    dx = dx_grid[None, :] - x0
    dy = dy_grid[None, :] - y0
    grad_x = a * dx + b * dy  # half of dq/d(dx)
    grad_y = b * dx + c * dy
    q = dx * grad_x + dy * grad_y
    e = np.exp(-0.5 * np.clip(q, -50.0, 700.0))  # trial steps may be non-definite
    model = amp * e
    if jac_out is not None:
        jac_out[:, 0] = e
        np.multiply(model, grad_x, out=jac_out[:, 1])
        np.multiply(model, grad_y, out=jac_out[:, 2])
        np.multiply(model, dx * dx, out=jac_out[:, 3])
        jac_out[:, 3] *= -0.5
        np.multiply(model, dx * dy, out=jac_out[:, 4])
        jac_out[:, 4] *= -1.0
        np.multiply(model, dy * dy, out=jac_out[:, 5])
        jac_out[:, 5] *= -0.5
    return model, q


def _params_valid(p, r):
    amp, x0, y0, a, b, c = p.T
    return (
        np.all(np.isfinite(p), axis=1)
        & (amp > 0)
        & (a > 0)
        & (c > 0)
        & (a * c - b * b > 0)
        & (np.abs(x0) <= r)
        & (np.abs(y0) <= r)
    )


def _levenberg_marquardt(p, target, weight, dx_grid, dy_grid, r, iterations):
    """Batched LM on weighted squared residuals; returns new params and a 'valid' flag.

    Each star has its own damping; a step is only taken when it lowers that star's
    weighted chi^2 and keeps the Gaussian well-formed (positive-definite, A > 0).
    """
    n, m = target.shape
    lam = np.full(n, 1e-2)
    root_w = np.sqrt(weight)
    model, _ = _gaussian_model(p, dx_grid, dy_grid)
    chi2 = np.sum(weight * (target - model) ** 2, axis=1)
    eye = np.eye(N_PARAMS)
    jac = np.empty((n, N_PARAMS, m))
    for _ in range(iterations):
        model, _ = _gaussian_model(p, dx_grid, dy_grid, jac_out=jac)
        jac *= root_w[:, None, :]
        hess = jac @ jac.transpose(0, 2, 1)
        grad = jac @ ((target - model) * root_w)[:, :, None]
        # Scale to a unit diagonal so A (thousands of ADU) and a, b, c (~1/px^2) share one damping.
        d = np.sqrt(np.diagonal(hess, axis1=1, axis2=2))
        d = np.where(d > 0, d, 1.0)
        hs = hess / (d[:, :, None] * d[:, None, :]) + lam[:, None, None] * eye
        step = np.linalg.solve(hs, grad / d[:, :, None])[:, :, 0] / d
        step[:, 1:3] = np.clip(step[:, 1:3], -1.0, 1.0)  # at most 1 px per iteration
        trial = p + step
        trial_model, _ = _gaussian_model(trial, dx_grid, dy_grid)
        trial_chi2 = np.sum(weight * (target - trial_model) ** 2, axis=1)
        better = _params_valid(trial, r) & (trial_chi2 < chi2)
        p = np.where(better[:, None], trial, p)
        chi2 = np.where(better, trial_chi2, chi2)
        lam = np.clip(np.where(better, lam / 3.0, lam * 4.0), 1e-7, 1e7)
    return p, _params_valid(p, r)


def _fit_batch(img, x0, y0, r, sigma0, cfg, saturation_adu, noise_floor, levenberg_marquardt):
    """Fit stars whose stamps share half-size r; returns the fit_stars dict for them.

    levenberg_marquardt: the fitter, ``_levenberg_marquardt`` or psf_fit's compiled one.
    """
    xc = np.rint(x0).astype(int)
    yc = np.rint(y0).astype(int)
    data, inside = _cut_stamps(img, xc, yc, r)
    n, s = len(xc), 2 * r + 1
    bg, noise = _ring_background(data, inside, r, noise_floor)
    usable = inside if saturation_adu is None else inside & (data < saturation_adu)
    data, usable = data.reshape(n, s * s), usable.reshape(n, s * s)
    target = data - bg[:, None]
    off = np.arange(-r, r + 1, dtype=float)
    dy_grid, dx_grid = (g.ravel() for g in np.meshgrid(off, off, indexing="ij"))
    r2_grid = dx_grid**2 + dy_grid**2

    inv_var0 = 1.0 / np.asarray(sigma0, dtype=float) ** 2
    centre = r2_grid <= 2.0
    # Saturated cores are excluded from the fit but still give a sensible first amplitude.
    amp0 = np.max(np.where(centre & inside.reshape(n, s * s), target, -np.inf), axis=1)
    amp0 = np.where(np.isfinite(amp0) & (amp0 > noise), amp0, noise)
    amp0 = np.where(np.isfinite(amp0), amp0, 1.0)
    zeros = np.zeros(n)
    p = np.column_stack([amp0, x0 - xc, y0 - yc, inv_var0, zeros, inv_var0])

    k = cfg.background_sigma
    # Pass 1, the seed's rule on pixel values (plus the core, so faint stars keep pixels).
    weight = usable & ((target > k * noise[:, None]) | (r2_grid[None, :] <= 2.0))
    p, valid = levenberg_marquardt(p, target, weight.astype(float), dx_grid, dy_grid, r,
                                   cfg.fit_iterations)
    # Passes 2-3: the same rule applied to the fitted star (no noise-selection bias).
    for _ in range(2):
        model, q = _gaussian_model(p, dx_grid, dy_grid)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_cut = 2.0 * np.log(p[:, 0] / (k * noise)) if k > 0 else np.full(n, np.inf)
        q_cut = np.clip(np.nan_to_num(q_cut, nan=4.0), 4.0, 25.0)
        near_centre = (dx_grid - p[:, 1:2]) ** 2 + (dy_grid - p[:, 2:3]) ** 2 <= 4.0
        # Pixels the fitted star cannot explain (a hot pixel or cosmic ray on the star) drop out.
        outlier = np.abs(target - model) > 5.0 * noise[:, None] + 0.25 * model
        weight = usable & ((q <= q_cut[:, None]) | near_centre) & ~outlier
        p, valid = levenberg_marquardt(p, target, weight.astype(float), dx_grid, dy_grid, r,
                                       cfg.fit_iterations)
    n_used = weight.sum(axis=1)
    return _derived_quantities(p, valid & (n_used > N_PARAMS), xc, yc, bg, noise, data,
                               dx_grid, dy_grid)


def _derived_quantities(p, ok, xc, yc, bg, noise, data, dx_grid, dy_grid):
    """Fitted parameters -> catalog quantities (see fit_stars)."""
    amp, dx0, dy0, a, b, c = p.T
    with np.errstate(all="ignore"):
        # Eigenvalues of the inverse covariance [[a, b], [b, c]]: 1/sigma^2 along the axes.
        half_trace = 0.5 * (a + c)
        root = np.sqrt(np.maximum(half_trace**2 - (a * c - b * b), 0.0))
        sigma_major = 1.0 / np.sqrt(half_trace - root)
        sigma_minor = 1.0 / np.sqrt(half_trace + root)
        fwhm = FWHM_PER_SIGMA * np.sqrt(sigma_major * sigma_minor)
        flux = 2.0 * np.pi * amp * sigma_major * sigma_minor
        snr = flux / (noise * np.sqrt(np.pi) * fwhm)
        ellipticity = 1.0 - sigma_minor / sigma_major
    near = (dx_grid[None, :] - dx0[:, None]) ** 2 + (dy_grid[None, :] - dy0[:, None]) ** 2
    near_radius2 = np.maximum(2.25, np.nan_to_num(fwhm / 2.0, nan=1.5) ** 2)
    peak = np.max(np.where(near <= near_radius2[:, None], data, -np.inf), axis=1)
    ok = ok & np.isfinite(fwhm) & np.isfinite(snr) & np.isfinite(ellipticity)
    return {
        "x": xc + dx0,
        "y": yc + dy0,
        "flux": flux,
        "fwhm_px": fwhm,
        "ellipticity": ellipticity,
        "snr": snr,
        "background": bg,
        "noise": noise,
        "peak": np.where(np.isfinite(peak), peak, np.nan),
        "ok": ok,
    }


# --------------------------------------------------------------------------- pruning


def prune_fits(fits: dict, x0, y0, cfg: StarConfig, width_px: int, height_px: int) -> np.ndarray:
    """Indices of fits that look like real, distinct stars, brightest first.

    Drops failed fits, fits that moved more than max(1 px, 1 FWHM) from their candidate
    (x0, y0) or off the frame, and those outside the cfg limits on snr, fwhm, ellipticity;
    then of two fits within max(1 px, FWHM/2) keeps the brighter. At most cfg.max_stars.
    """
    x, y, fwhm = fits["x"], fits["y"], fits["fwhm_px"]
    with np.errstate(invalid="ignore"):
        good = (
            fits["ok"]
            & (np.hypot(x - x0, y - y0) <= np.maximum(1.0, fwhm))
            & (x >= -0.5) & (x <= width_px - 0.5) & (y >= -0.5) & (y <= height_px - 0.5)
            & (fits["snr"] >= cfg.min_snr)
            & (fwhm >= cfg.min_fwhm_px)
            & (fwhm <= cfg.max_fwhm_px)
            & (fits["ellipticity"] <= cfg.max_ellipticity)
        )
    idx = np.flatnonzero(good)
    idx = idx[np.argsort(-fits["flux"][idx], kind="stable")]
    idx = idx[_drop_duplicates(x[idx], y[idx], fwhm[idx])]
    return idx[: cfg.max_stars]


def _drop_duplicates(x, y, fwhm) -> np.ndarray:
    """Positions (sorted brightest first) -> indices of those not duplicating a brighter one."""
    if len(x) < 2:
        return np.arange(len(x))
    radius = np.maximum(1.0, 0.5 * fwhm)
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(r=float(radius.max()),
                                                         output_type="ndarray")
    if len(pairs) == 0:
        return np.arange(len(x))
    i, j = pairs[:, 0], pairs[:, 1]  # i < j: i is the brighter
    dup = np.hypot(x[i] - x[j], y[i] - y[j]) <= radius[i]
    drop = np.zeros(len(x), dtype=bool)
    drop[j[dup]] = True
    return np.flatnonzero(~drop)


# --------------------------------------------------------------------------- whole pipeline


def detect_stars(image, cfg: StarConfig = StarConfig(), mask=None) -> Table:
    """Stars of an image (H, W) or (C, H, W) as an astropy Table, brightest first.

    Columns (float64): x, y (px), flux (ADU), fwhm_px, ellipticity, snr, peak (ADU, raw
    brightest pixel near the centre; compare with meta['saturation_adu']). meta:
    n_candidates, n_stars, fwhm_px_median, ellipticity_median, background_adu, noise_adu
    (robust sky level and noise of the luminance), saturation_adu (NaN if nothing clipped),
    width_px, height_px. ``mask``: optional bool (H, W), True where stars may be found.
    """
    img = _finite_image(luminance(image))
    height, width = img.shape
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != img.shape:
            raise NightstackError(f"star mask shape {mask.shape} differs from image {img.shape}")
    background, noise = sky_background_and_noise(img)
    floor = _noise_floor_adu(img)
    img, n_hot = repair_hot_pixels(img, max(noise, floor))
    saturation = _saturation_level(img, background)
    x0, y0, scale, _, dog_noise = _find_candidates(img, cfg, floor, mask)
    correlation = noise_correlation_factor(dog_noise, max(noise, floor), cfg)
    fits = fit_stars(img, x0, y0, cfg, scale_px=scale, saturation_adu=saturation,
                     noise_floor_adu=floor, noise_correlation=correlation)
    keep = prune_fits(fits, x0, y0, cfg, width, height)
    # imported here, not at the top: calibrate jobs import this module for luminance only
    from astropy.table import Table

    table = Table({name: np.asarray(fits[name][keep], dtype=np.float64) for name in STAR_COLUMNS})
    table.meta.update(
        {
            "n_candidates": len(x0),
            "n_hot_pixels": n_hot,
            "n_stars": len(table),
            "fwhm_px_median": float(np.median(table["fwhm_px"])) if len(table) else float("nan"),
            "ellipticity_median": (
                float(np.median(table["ellipticity"])) if len(table) else float("nan")
            ),
            "background_adu": background,
            "noise_adu": max(noise, floor),
            "noise_correlation": correlation,
            "saturation_adu": float("nan") if saturation is None else float(saturation),
            "width_px": int(width),
            "height_px": int(height),
        }
    )
    return table


def detect_stars_presmoothed(image, cfg: StarConfig = StarConfig(), presmooth_px: float = 0.0, mask=None) -> Table:
    """detect_stars on a luminance smoothed by a Gaussian of sigma ``presmooth_px``.

    Why: on frames demosaiced from a Bayer mosaic, stars of FWHM ~2 px carry a centroid error
    that depends on where they fall on the 2x2 colour grid, and it changes from frame to frame.
    A light Gaussian (sigma ~1 px, close to a matched filter) averages over the grid: on
    als_m27 it cut the registration residual of bright stars from 0.32 to 0.21 px. Positions
    and fluxes are unbiased by a normalised symmetric kernel; fwhm_px is corrected in quadrature
    (and ellipticity is that of the smoothed star, slightly rounder).
    """
    if presmooth_px <= 0:
        return detect_stars(image, cfg, mask)
    native = _finite_image(luminance(image))
    table = detect_stars(gaussian_filter(native, presmooth_px), cfg, mask)
    if len(table):
        # shape from the unsmoothed image at the smoothed positions; quadrature as a fallback
        kernel_fwhm = FWHM_PER_SIGMA * presmooth_px
        fwhm = np.asarray(table["fwhm_px"])
        fwhm = np.sqrt(np.maximum(fwhm**2 - kernel_fwhm**2, (0.5 * fwhm) ** 2))
        ell = np.asarray(table["ellipticity"])
        refit = fit_stars(native, np.asarray(table["x"]), np.asarray(table["y"]), cfg)
        ok = np.asarray(refit["ok"], bool) & np.isfinite(refit["fwhm_px"])
        table["fwhm_px"] = np.where(ok, refit["fwhm_px"], fwhm)
        table["ellipticity"] = np.where(ok, refit["ellipticity"], ell)
        table.meta["fwhm_px_median"] = float(np.median(table["fwhm_px"]))
        table.meta["ellipticity_median"] = float(np.median(table["ellipticity"]))
    table.meta["presmooth_px"] = float(presmooth_px)
    return table
