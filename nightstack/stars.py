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
   enough pixels. Saturated pixels get no weight, so flat-topped stars are centred on their wings.
3. Pruning: failed fits, fits that wandered more than ~1 FWHM from their candidate, low SNR,
   implausible width or elongation, and duplicates (two fits within ~1 px: keep the brighter).

Conventions: pixel centres at integers, x = column, y = row; intensities in the image's ADU.
``snr`` is background-limited: ``flux / (noise * sqrt(pi) * fwhm_px)``, i.e. flux over the
sky noise summed in a circular aperture of radius one FWHM (which holds ~94 % of a Gaussian).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import NightstackError

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
MAD_TO_SIGMA = 1.4826
DOG_RATIO = 1.6  # outer / inner sigma of each DoG level, and the step between levels
QUANTISATION_NOISE_ADU = 1.0 / np.sqrt(12.0)  # noise floor of integer-valued data
STAR_COLUMNS = ("x", "y", "flux", "fwhm_px", "ellipticity", "snr", "peak")
N_PARAMS = 6  # A, x0, y0, a, b, c


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
    if d is None:
        return StarConfig()
    if not isinstance(d, dict):
        raise NightstackError(f"star settings must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(StarConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise NightstackError(
            f"unknown star setting(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    values = {}
    for key, value in d.items():
        default = fields[key].default
        try:
            if value is None and key == "stamp_radius_px":
                values[key] = None
            elif isinstance(default, int) or key == "stamp_radius_px":
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError
                values[key] = int(value)
            else:
                values[key] = float(value)
        except (TypeError, ValueError):
            raise NightstackError(f"star setting {key}: expected a number, got {value!r}") from None
    cfg = StarConfig(**values)
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

    A pixel is hot when it stands more than ``threshold_sigma`` * ``noise_adu`` above its
    7x7 mean while none of its 4 direct neighbours carries even 20 % of that excess: even a
    star of FWHM 1.5 px puts ~35 % of its peak into the next pixel. Returns
    (repaired float32 copy (H, W), number of pixels replaced).
    """
    img = np.asarray(image2d, dtype=np.float32)
    local = ndimage.uniform_filter(img, 7, mode="nearest")
    padded = np.pad(img, 1, mode="edge")
    neighbour_max = np.maximum.reduce(
        [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    )
    excess = img - local
    hot = (excess > threshold_sigma * noise_adu) & (neighbour_max - local < 0.2 * excess)
    rows, cols = np.nonzero(hot)
    if rows.size == 0:
        return img, 0
    d = np.array([-1, 0, 1])
    nr = (rows[:, None, None] + d[None, :, None]).repeat(3, axis=2).reshape(len(rows), 9)
    nc = (cols[:, None, None] + d[None, None, :]).repeat(3, axis=1).reshape(len(rows), 9)
    ring = np.delete(np.arange(9), 4)
    values = padded[nr[:, ring] + 1, nc[:, ring] + 1]
    img = img.copy()
    img[rows, cols] = np.median(values, axis=1)
    return img, int(rows.size)


# --------------------------------------------------------------------------- candidates


def dog_sigmas_px(cfg: StarConfig) -> np.ndarray:
    """Inner sigma (px) of every DoG level."""
    return cfg.dog_sigma_px * DOG_RATIO ** np.arange(cfg.dog_levels)


def _dog_snr_map(img: np.ndarray, cfg: StarConfig, noise_floor: float):
    """Best DoG signal-to-noise over the levels per pixel, and the level that gave it."""
    sigmas = cfg.dog_sigma_px * DOG_RATIO ** np.arange(cfg.dog_levels + 1)
    blurred = ndimage.gaussian_filter(img, sigmas[0], mode="nearest")
    best = level = None
    for k in range(cfg.dog_levels):
        # Each coarser blur is built from the previous one: smaller kernels, same result.
        coarser = ndimage.gaussian_filter(
            blurred, np.sqrt(sigmas[k + 1] ** 2 - sigmas[k] ** 2), mode="nearest"
        )
        dog = blurred - coarser
        noise = max(
            _robust_sigma(dog[::3, ::3]),
            noise_floor * _dog_white_noise_gain(sigmas[k], sigmas[k + 1]),
        )
        dog /= noise
        if best is None:
            best, level = dog, np.zeros(img.shape, dtype=np.int8)
        else:
            better = dog > best
            level[better] = k
            np.maximum(best, dog, out=best)
        blurred = coarser
    return best, level


def find_candidates(image2d, cfg: StarConfig = StarConfig(), mask=None):
    """Star candidates in a 2D image: local maxima of the multi-scale DoG response.

    Returns ``(x, y, scale_px, dog_peak)``: integer pixel positions (float64), the inner DoG
    sigma (px) of the level that responded best, and that response in noise sigmas.
    Strongest first, at most ``2 * max_stars``. ``mask`` (bool (H, W), True = may hold
    stars) drops candidates outside it.
    """
    img = _finite_image(image2d)
    return _find_candidates(img, cfg, _noise_floor_adu(img), mask)


def _find_candidates(img, cfg, noise_floor, mask=None):
    snr, level = _dog_snr_map(img, cfg, noise_floor)
    size = 2 * max(2, int(round(cfg.dog_sigma_px))) + 1
    peaks = (snr > cfg.detect_sigma) & (snr >= ndimage.maximum_filter(snr, size=size))
    if mask is not None:
        peaks &= mask
    ys, xs = np.nonzero(peaks)
    strength = snr[ys, xs]
    order = np.argsort(-strength, kind="stable")[: 4 * cfg.max_stars]
    ys, xs, strength = ys[order], xs[order], strength[order]
    scale = dog_sigmas_px(cfg)[level[ys, xs]]
    keep = _suppress_weaker_neighbours(xs, ys, scale)[: 2 * cfg.max_stars]
    return (
        xs[keep].astype(np.float64),
        ys[keep].astype(np.float64),
        scale[keep].astype(np.float64),
        strength[keep].astype(np.float64),
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
) -> dict:
    """Fit an elliptical Gaussian to the star near each (x0, y0) (pixels), all at once.

    ``scale_px`` (per star, px) is the first guess of the Gaussian sigma and sets the stamp
    size (default ``cfg.dog_sigma_px``); pixels at or above ``saturation_adu`` get no weight.
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
    # One batch per stamp size (a handful: one per DoG level).
    for r in np.unique(radius):
        sel = np.flatnonzero(radius == r)
        part = _fit_batch(img, x0[sel], y0[sel], int(r), scale[sel], cfg, saturation_adu,
                          noise_floor_adu)
        for key, values in part.items():
            out[key][sel] = values
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
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rings of off-frame stamps
        bg = np.nanmedian(values, axis=1)
        noise = MAD_TO_SIGMA * np.nanmedian(np.abs(values - bg[:, None]), axis=1)
    bg = np.where(np.isfinite(bg), bg, 0.0)
    noise = np.where(np.isfinite(noise), np.maximum(noise, noise_floor), np.inf)
    return bg, noise


def _gaussian_model(p, dx_grid, dy_grid, with_jacobian):
    """Star model A exp(-q/2) (N, M) over stamp offsets, and its Jacobian (N, 6, M)."""
    amp, x0, y0, a, b, c = (p[:, i, None] for i in range(N_PARAMS))
    dx = dx_grid[None, :] - x0
    dy = dy_grid[None, :] - y0
    q = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy
    e = np.exp(-0.5 * np.clip(q, -50.0, 700.0))  # trial steps may be non-definite
    model = amp * e
    if not with_jacobian:
        return model, q, None
    jac = np.stack(
        [
            e,
            model * (a * dx + b * dy),
            model * (b * dx + c * dy),
            -0.5 * model * dx * dx,
            -model * dx * dy,
            -0.5 * model * dy * dy,
        ],
        axis=1,
    )
    return model, q, jac


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
    n = len(p)
    lam = np.full(n, 1e-2)
    model, _, _ = _gaussian_model(p, dx_grid, dy_grid, False)
    chi2 = np.sum(weight * (target - model) ** 2, axis=1)
    eye = np.eye(N_PARAMS)
    for _ in range(iterations):
        model, _, jac = _gaussian_model(p, dx_grid, dy_grid, True)
        jw = jac * weight[:, None, :]
        hess = jw @ jac.transpose(0, 2, 1)
        grad = jw @ (target - model)[:, :, None]
        # Scale to a unit diagonal so A (thousands of ADU) and a, b, c (~1/px^2) share one damping.
        d = np.sqrt(np.diagonal(hess, axis1=1, axis2=2))
        d = np.where(d > 0, d, 1.0)
        hs = hess / (d[:, :, None] * d[:, None, :]) + lam[:, None, None] * eye
        step = np.linalg.solve(hs, grad / d[:, :, None])[:, :, 0] / d
        step[:, 1:3] = np.clip(step[:, 1:3], -1.0, 1.0)  # at most 1 px per iteration
        trial = p + step
        trial_model, _, _ = _gaussian_model(trial, dx_grid, dy_grid, False)
        trial_chi2 = np.sum(weight * (target - trial_model) ** 2, axis=1)
        better = _params_valid(trial, r) & (trial_chi2 < chi2)
        p = np.where(better[:, None], trial, p)
        chi2 = np.where(better, trial_chi2, chi2)
        lam = np.clip(np.where(better, lam / 3.0, lam * 4.0), 1e-7, 1e7)
    return p, _params_valid(p, r)


def _fit_batch(img, x0, y0, r, sigma0, cfg, saturation_adu, noise_floor):
    """Fit stars whose stamps share half-size r; returns the fit_stars dict for them."""
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
    p, valid = _levenberg_marquardt(p, target, weight.astype(float), dx_grid, dy_grid, r,
                                    cfg.fit_iterations)
    # Passes 2-3: the same rule applied to the fitted star (no noise-selection bias).
    for _ in range(2):
        _, q, _ = _gaussian_model(p, dx_grid, dy_grid, False)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_cut = 2.0 * np.log(p[:, 0] / (k * noise)) if k > 0 else np.full(n, np.inf)
        q_cut = np.clip(np.nan_to_num(q_cut, nan=4.0), 4.0, 25.0)
        near_centre = (dx_grid - p[:, 1:2]) ** 2 + (dy_grid - p[:, 2:3]) ** 2 <= 4.0
        weight = usable & ((q <= q_cut[:, None]) | near_centre)
        p, valid = _levenberg_marquardt(p, target, weight.astype(float), dx_grid, dy_grid, r,
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
    x0, y0, scale, _ = _find_candidates(img, cfg, floor, mask)
    fits = fit_stars(img, x0, y0, cfg, scale_px=scale, saturation_adu=saturation,
                     noise_floor_adu=floor)
    keep = prune_fits(fits, x0, y0, cfg, width, height)
    table = Table({name: np.asarray(fits[name][keep], dtype=np.float64) for name in STAR_COLUMNS})
    table.meta.update(
        {
            "n_candidates": int(len(x0)),
            "n_hot_pixels": n_hot,
            "n_stars": int(len(table)),
            "fwhm_px_median": float(np.median(table["fwhm_px"])) if len(table) else float("nan"),
            "ellipticity_median": (
                float(np.median(table["ellipticity"])) if len(table) else float("nan")
            ),
            "background_adu": background,
            "noise_adu": max(noise, floor),
            "saturation_adu": float("nan") if saturation is None else float(saturation),
            "width_px": int(width),
            "height_px": int(height),
        }
    )
    return table
