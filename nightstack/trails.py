"""Star-trail mode: combine calibrated frames from a fixed camera, in time order, without registration.

Frames (float32 FITS, primary HDU (C, H, W) or (H, W), already calibrated upstream) are read one
at a time, memory-mapped, and folded into an accumulator, so memory does not grow with the
number of frames: the accumulator, the current frame, its cleaned copy and one warped channel.

Methods
-------
* ``lighten`` - per-pixel maximum. Each frame's median sky (per channel) is subtracted before
  the maximum and the mean sky of all frames is added back at the end, so the maximum follows
  the stars and not the frame whose sky happened to be brightest (twilight, passing haze).
* ``average`` - gamma-correct mean: ``(mean(x ** gamma)) ** (1 / gamma)``, for frames that are
  gamma-encoded (JPEG, sRGB). Scale cancels out of that formula, so no white level is needed;
  negative values are clipped to 0 first. Gap filling does not apply to this method.

Gap filling (lighten only)
--------------------------
Between two exposures the shutter is closed while the sky turns, so a plain maximum draws each
star as a dotted line. Blending or maximising consecutive frames fills nothing (max over a blend
of A and B is max(A, B)); the stars themselves must be moved along their trails. So:

1. the sky's motion between consecutive frames is measured from the stars: bright stars are
   detected in both (``nightstack.stars.detect_stars``, elongation allowed because each
   exposure already draws a short arc), paired by triangle matching
   (``nightstack.matching.match_coarse``) and refined on every mutual-nearest pair by a
   least-squares affine fit ``M`` (previous -> current pixel positions). An affine map holds
   the rotation about the pole (wherever it is, inside or outside the frame) plus the first
   order of the lens projection;
2. the current frame is drawn again at ``gap_steps`` instants evenly spaced inside the gap,
   ``f = s / (gap_steps + 1)`` of the way back towards the previous frame, with the fractional
   motion ``M ** f = expm(f * logm(M))``: a true fraction of the rotation, so the copies lie on
   the stars' arcs (a linear blend of positions would cut the chords). Each copy is warped
   with bilinear interpolation and maximised into the accumulator;
3. the camera is fixed, so detections that stay put between the frames (lit leaves, branch
   tips, lights; within STATIC_RADIUS_PX) are set aside first and the motion is sought among
   the moving ones; matches must be tight (most pairs within MOTION_TIGHT_RADIUS_PX), which
   refuses the chance alignments of noise detections;
4. when the stars of a pair cannot be matched, the previous pair's motion is reused (the sky
   turns at a constant rate), else that gap stays open; ``info['motions']`` says which.

When the sky moves less than STATIC_RADIUS_PX per frame, stars and foreground cannot be told
apart and the fit over all detections may follow a static foreground (seen on the Canon 40D
"trees" frames: stars drift ~0.6 px per frame, the fit says 0.1-0.5 px). Such gaps are far
narrower than a star, so nothing visible is lost.

Copies of frame k fill the gap between its exposure and that of frame k - 1: they are
continuous as long as each exposure's own arc (plus the star width) is longer than the spacing
between copies, ``motion / (gap_steps + 1)``; ``info['substep_px_max']`` reports that spacing.

Fixed features must not be dragged along by the warp. Single-pixel outliers (hot pixels left
by calibration) are removed from the copies by a vectorised 3x3 test: a pixel far above its
3x3 median whose 8 neighbours stay near the sky is replaced by that median. The frame itself
enters the maximum untouched, so a hot pixel stays the dot it is in every frame.

Landscape foreground: with a sky mask (the night's sky_mask.fits, see nightstack.landscape) the
motion is measured on stars of the sky only, and the gap copies take only sky pixels (kernel
clear of the ground) and land only on the sky, so the ground stays frozen: it is the plain
per-pixel maximum of the frames, never dragged along the sky's motion. Hot pixels of demosaiced colour
frames are 2x2..3x3 blobs, not single pixels, and are not caught by the 3x3 test; calibrate
with darks. Paths must be given in time order.

Comet fade: frame k of n (and its gap copies, at their fractional time) has its signal above
the sky multiplied by ``(1 - comet_fade) ** (n - 1 - k)``, so trails brighten towards the end.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage
from scipy.spatial import cKDTree

from .errors import FrameError, NightstackError
from .filters import median_filter
from .settings import settings_from_dict
from .io import read_fits_image
from .landscape import source_ground, star_search_mask
from .matching import match_coarse, mutual_nearest
from .stars import StarConfig, detect_stars

log = logging.getLogger("nightstack")

METHODS = ("lighten", "average")
MAD_TO_SIGMA = 1.4826
# Stars in trail frames are short arcs: allow elongation and width, keep the brightest.
MOTION_STAR_CONFIG = StarConfig(max_ellipticity=0.95, max_fwhm_px=40.0, max_stars=200)
MOTION_MATCH_RADIUS_PX = 2.5  # a pair after the coarse match must agree this well
MOTION_TIGHT_RADIUS_PX = 1.0  # ... and most pairs this well after the affine fit
MIN_TIGHT_FRACTION = 0.6
MIN_MOTION_PAIRS = 4
SKY_SAMPLE_STEP = 4  # sky median / noise from every 4th row and column: fast and plenty
QUANTISATION_NOISE_ADU = 1.0 / np.sqrt(12.0)
# Detections that stay within this distance between frames are foreground (trees, lights,
# hot pixels): the sky is what moves. See estimate_sky_motion.
STATIC_RADIUS_PX = 1.0


@dataclass
class TrailsConfig:
    """Settings of the star-trail combine (see the module docstring)."""

    method: str = "lighten"  # "lighten" (per-pixel max) | "average" (gamma-correct mean)
    gap_fill: bool = True  # lighten only: draw each frame again along the sky motion in the gap
    gap_steps: int = 4  # copies per gap, evenly spaced in time
    comet_fade: float = 0.0  # 0 = off; frame k of n is scaled by (1 - comet_fade) ** (n - 1 - k)
    gamma: float = 2.2  # method "average" only
    hot_pixel_sigma: float = 5.0  # single-pixel outliers this far above the 3x3 median (noise units)


@dataclass
class SkyMotion:
    """Apparent sky motion between two frames: ``matrix`` (3x3 affine, x/y pixels) maps the
    previous frame's pixel positions to the current frame's."""

    matrix: np.ndarray
    n_pairs: int
    rms_px: float
    moving_only: bool = False  # True: measured on the moving detections, foreground left out


# ---------------------------------------------------------------------------- settings


def trails_config_from_dict(d: dict | None) -> TrailsConfig:
    """Build a TrailsConfig from a settings dict; unknown keys or bad values -> NightstackError."""
    cfg = settings_from_dict(TrailsConfig, d, "trails")
    validate_trails_config(cfg)
    return cfg


def validate_trails_config(cfg: TrailsConfig) -> None:
    """Raise NightstackError listing every invalid setting of ``cfg``."""
    problems = []
    if cfg.method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if not 0 <= cfg.gap_steps <= 64:
        problems.append(f"gap_steps must be 0..64, got {cfg.gap_steps}")
    if not 0.0 <= cfg.comet_fade < 1.0:
        problems.append(f"comet_fade must be in [0, 1), got {cfg.comet_fade}")
    if not (np.isfinite(cfg.gamma) and cfg.gamma > 0):
        problems.append(f"gamma must be > 0, got {cfg.gamma}")
    if not cfg.hot_pixel_sigma > 0:
        problems.append(f"hot_pixel_sigma must be > 0, got {cfg.hot_pixel_sigma}")
    if problems:
        raise NightstackError("trails settings: " + "; ".join(problems))


# ---------------------------------------------------------------------------- per-frame pieces


def read_trail_frame(path, expected_shape=None) -> tuple[np.ndarray, bool]:
    """Read one calibrated frame as float32 (C, H, W) (a 2D image becomes C = 1).

    Returns (frame, whether the file held a 2D image).
    Raises FrameError when the file cannot be read, holds no 2D/3D image, or its shape
    differs from ``expected_shape``.
    """
    try:
        data, _ = read_fits_image(path, memmap=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FrameError(path, f"cannot read FITS image ({exc})") from None
    if data is None or data.ndim not in (2, 3):
        raise FrameError(path, "primary HDU holds no (H, W) or (C, H, W) image")
    frame = np.array(data, dtype=np.float32)  # copy out of the memory map
    del data
    is_2d = frame.ndim == 2
    if is_2d:
        frame = frame[None]
    if expected_shape is not None and frame.shape != tuple(expected_shape):
        raise FrameError(path, f"shape {frame.shape} differs from the first frame {expected_shape}")
    return frame, is_2d


def sky_levels(frame: np.ndarray) -> np.ndarray:
    """Median sky (ADU) of each channel of a (C, H, W) frame, from a regular subsample."""
    sample = frame[:, ::SKY_SAMPLE_STEP, ::SKY_SAMPLE_STEP].reshape(frame.shape[0], -1)
    return np.nanmedian(sample, axis=1).astype(np.float64)


def pixel_noise(image2d: np.ndarray) -> float:
    """Robust per-pixel noise (ADU) of a 2D image, from differences of horizontal neighbours
    (insensitive to sky gradients and to the few pixels stars cover)."""
    rows = image2d[::SKY_SAMPLE_STEP]
    diff = (rows[:, 1:] - rows[:, :-1]).ravel()
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


_RING_3X3 = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)


def suppress_single_pixel_outliers(image2d: np.ndarray, sigma: float,
                                   noise_floor_adu: float = 0.0) -> tuple[np.ndarray, int]:
    """Replace isolated bright pixels (hot pixels, cosmic hits) of a sky-subtracted 2D image.

    A pixel is an outlier when it stands more than ``sigma`` noise units above its 3x3 median
    and none of its 8 neighbours reaches a quarter of its height (+2 noise): a star, even a
    sharp one, lifts its neighbours, a hot pixel does not. The noise (ADU) is measured, but not
    below ``noise_floor_adu`` (smooth 8-bit data measure ~0). Returns (cleaned float32 copy,
    number of pixels replaced).
    """
    img = np.asarray(image2d, dtype=np.float32)
    noise = max(pixel_noise(img), noise_floor_adu, 1e-12)
    median = median_filter(img, 3)
    neighbour_max = ndimage.maximum_filter(img, footprint=_RING_3X3, mode="nearest")
    hot = (img - median > sigma * noise) & (neighbour_max < 0.25 * img + 2.0 * noise)
    cleaned = np.where(hot, median, img)
    return cleaned, int(np.count_nonzero(hot))


def quantisation_floor_adu(frame: np.ndarray) -> float:
    """Noise floor of a frame (ADU): that of rounding for integer-valued data (8/16-bit
    sources), else 0."""
    sample = frame[:, ::SKY_SAMPLE_STEP, ::SKY_SAMPLE_STEP]
    sample = sample[np.isfinite(sample)]
    if sample.size and np.all(sample == np.round(sample)):
        return QUANTISATION_NOISE_ADU
    return 0.0


def comet_fade_factor(time_index: float, n_frames: int, comet_fade: float) -> float:
    """Weight of the above-sky signal at (possibly fractional) frame time ``time_index``."""
    return float((1.0 - comet_fade) ** (n_frames - 1 - time_index))


# ---------------------------------------------------------------------------- sky motion


def star_positions(frame: np.ndarray, mask=None) -> np.ndarray:
    """Pixel positions (N, 2) of a frame's stars, brightest first (empty if none found).
    mask: optional (H, W) bool, True where stars may be found (the sky)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in rejected trial fits
        table = detect_stars(frame, MOTION_STAR_CONFIG, mask=mask)
    if len(table) == 0:
        return np.zeros((0, 2))
    return np.column_stack([np.asarray(table["x"]), np.asarray(table["y"])])


def chance_pairs_limit(prev_xy: np.ndarray, cur_xy: np.ndarray, radius_px: float) -> int:
    """Pairs within ``radius_px`` that unrelated detections scattered over the same area would
    hardly reach (expected + 5 sigma + 3, at least MIN_MOTION_PAIRS): noise detections of a
    busy foreground otherwise pair up with some transform that means nothing."""
    both = np.vstack([prev_xy, cur_xy])
    span = np.ptp(both, axis=0)
    area = max(float(span[0] * span[1]), 1.0)
    expected = len(prev_xy) * len(cur_xy) * np.pi * radius_px**2 / area
    return int(max(MIN_MOTION_PAIRS, np.ceil(expected + 5 * np.sqrt(expected) + 3)))


def fit_affine(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
    """Least-squares 3x3 affine (x/y pixels) mapping (N, 2) ``src_xy`` onto ``dst_xy``, N >= 3."""
    design = np.column_stack([src_xy, np.ones(len(src_xy))])
    coef, *_ = np.linalg.lstsq(design, dst_xy, rcond=None)
    matrix = np.eye(3)
    matrix[:2, :] = coef.T
    return matrix


def _apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def estimate_sky_motion(prev_xy: np.ndarray, cur_xy: np.ndarray) -> SkyMotion | None:
    """Sky motion previous -> current from two detection lists (N, 2), brightest first.

    The camera is fixed, so detections that stay put (within STATIC_RADIUS_PX) are foreground:
    lit leaves, branch tips, distant lights, hot pixels. The motion is first sought among the
    moving detections only; when they do not give a motion larger than that radius (the sky
    barely moved, or nothing is static), all detections are used. Returns None when fewer
    than MIN_MOTION_PAIRS detections pair up.
    """
    prev_xy, cur_xy = np.asarray(prev_xy, dtype=float), np.asarray(cur_xy, dtype=float)
    moving_prev, moving_cur = _drop_static(prev_xy, cur_xy)
    moving = _match_motion(moving_prev, moving_cur)
    if moving is not None and _max_displacement(moving.matrix, moving_prev) > STATIC_RADIUS_PX:
        return dataclasses.replace(moving, moving_only=True)
    return _match_motion(prev_xy, cur_xy)


def _drop_static(prev_xy: np.ndarray, cur_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both lists without the detections that have a partner within STATIC_RADIUS_PX."""
    if len(prev_xy) == 0 or len(cur_xy) == 0:
        return prev_xy, cur_xy
    d_prev, _ = cKDTree(cur_xy).query(prev_xy, distance_upper_bound=STATIC_RADIUS_PX)
    d_cur, _ = cKDTree(prev_xy).query(cur_xy, distance_upper_bound=STATIC_RADIUS_PX)
    return prev_xy[~np.isfinite(d_prev)], cur_xy[~np.isfinite(d_cur)]


def _max_displacement(matrix: np.ndarray, xy: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(_apply_affine(matrix, xy) - xy, axis=1))) if len(xy) else 0.0


def _match_motion(prev_xy: np.ndarray, cur_xy: np.ndarray) -> SkyMotion | None:
    """Triangle matching for a first similarity, then affine fits on every mutual-nearest pair
    within MOTION_MATCH_RADIUS_PX (twice), and a last fit on the pairs within
    MOTION_TIGHT_RADIUS_PX. Real stars agree to a fraction of a pixel; pairs that a wrong
    transform collects among noise detections spread evenly over the match radius, so most
    of the pairs must be tight (MIN_TIGHT_FRACTION), else the match is refused (None)."""
    if len(prev_xy) < MIN_MOTION_PAIRS or len(cur_xy) < MIN_MOTION_PAIRS:
        return None
    coarse = match_coarse(prev_xy, cur_xy)
    if coarse is None:
        return None
    matrix = coarse.transform.matrix()
    for _ in range(2):
        ia, ib = mutual_nearest(_apply_affine(matrix, prev_xy), cur_xy, MOTION_MATCH_RADIUS_PX)
        if len(ia) < chance_pairs_limit(prev_xy, cur_xy, MOTION_MATCH_RADIUS_PX):
            return None
        # an affine needs 3 points; with few pairs a similarity is the safer model
        matrix = fit_affine(prev_xy[ia], cur_xy[ib]) if len(ia) >= 6 else matrix
    ja, jb = mutual_nearest(_apply_affine(matrix, prev_xy), cur_xy, MOTION_TIGHT_RADIUS_PX)
    if (len(ja) < MIN_TIGHT_FRACTION * len(ia)
            or len(ja) < chance_pairs_limit(prev_xy, cur_xy, MOTION_TIGHT_RADIUS_PX)):
        return None
    matrix = fit_affine(prev_xy[ja], cur_xy[jb]) if len(ja) >= 6 else matrix
    residual = _apply_affine(matrix, prev_xy[ja]) - cur_xy[jb]
    rms = float(np.sqrt(np.mean(np.sum(residual**2, axis=1))))
    return SkyMotion(matrix, int(len(ja)), rms)


def motion_logarithm(matrix: np.ndarray) -> np.ndarray | None:
    """Real matrix logarithm of a 3x3 affine near the identity, or None if it has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_m = linalg.logm(matrix)
    if np.all(np.isfinite(log_m)) and np.max(np.abs(np.imag(log_m))) < 1e-9:
        return np.real(log_m)
    return None


def fractional_motion(matrix: np.ndarray, fraction: float, log_matrix=None) -> np.ndarray:
    """``matrix ** fraction`` for a 3x3 affine near the identity: a true fraction of the rotation,
    ``expm(fraction * logm(matrix))`` (pass ``log_matrix`` from motion_logarithm to reuse it);
    falls back to linear interpolation when the logarithm is not real."""
    if log_matrix is None:
        log_matrix = motion_logarithm(matrix)
    if log_matrix is not None:
        result = linalg.expm(fraction * log_matrix)
    else:
        result = np.eye(3) + fraction * (matrix - np.eye(3))
    result[2] = (0.0, 0.0, 1.0)
    return result


def motion_extent_px(matrix: np.ndarray, height_px: int, width_px: int) -> float:
    """Largest displacement (px) the motion gives to the frame's corners and centre."""
    xy = np.array(
        [[0, 0], [width_px - 1, 0], [0, height_px - 1], [width_px - 1, height_px - 1],
         [(width_px - 1) / 2, (height_px - 1) / 2]], dtype=float,
    )
    return float(np.max(np.linalg.norm(_apply_affine(matrix, xy) - xy, axis=1)))


def warp_by_affine(image2d: np.ndarray, matrix: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out(x) = image2d(matrix @ x)`` (x/y pixels, bilinear), NaN outside the input."""
    # ndimage works in (row, col): swap the x/y roles of the matrix
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    m_rc = swap @ matrix @ swap
    ndimage.affine_transform(
        image2d, m_rc[:2, :2], offset=m_rc[:2, 2], output=out, order=1,
        mode="constant", cval=np.nan, prefilter=False,
    )
    return out


def add_gap_copies(acc: np.ndarray, cleaned: np.ndarray, motion: np.ndarray, cfg: TrailsConfig,
                   frame_index: int, n_frames: int, ground=None) -> None:
    """Maximise ``gap_steps`` copies of the (sky-subtracted, cleaned) current frame into ``acc``.

    ``motion`` maps the previous frame's pixels to this frame's; copy s sits at the fraction
    f = s / (gap_steps + 1) of the way back to the previous frame and is faded as at time
    ``frame_index - f`` (``cleaned`` already carries the fade of ``frame_index``).
    acc and cleaned: (C, H, W) float32. ground: optional (H, W) bool, True on the fixed
    foreground: copies neither read from it (grown by the bilinear reach and a margin) nor
    land on it.
    """
    warped = np.empty(cleaned.shape[1:], dtype=np.float32)
    if ground is not None and ground.any():
        cleaned = np.where(source_ground(~ground, 1)[None], np.nan, cleaned).astype(np.float32)
    log_motion = motion_logarithm(motion)
    for step in range(1, cfg.gap_steps + 1):
        fraction = step / (cfg.gap_steps + 1)
        # a star at q now was at M^-f q at time -f: the copy samples the frame at M^f x
        sample_matrix = fractional_motion(motion, fraction, log_motion)
        fade = (comet_fade_factor(frame_index - fraction, n_frames, cfg.comet_fade)
                / comet_fade_factor(frame_index, n_frames, cfg.comet_fade))
        for channel in range(cleaned.shape[0]):
            warp_by_affine(cleaned[channel], sample_matrix, warped)
            if fade != 1.0:
                warped *= fade
            if ground is not None:
                warped[ground] = np.nan  # fmax keeps the accumulator there
            np.fmax(acc[channel], warped, out=acc[channel])


# ---------------------------------------------------------------------------- the combine


def stack_trails(paths: list[str], cfg: TrailsConfig, progress=None,
                 sky=None) -> tuple[np.ndarray, dict]:
    """Combine calibrated frames, given in time order, into a star-trail image.

    paths: FITS files, primary HDU float (C, H, W) or (H, W), all the same shape.
    progress: optional callable, called with 1 after each frame (nightstack.logs.Progress).
    sky: optional (H, W) bool sky mask (True = sky) of the frames: the ground stays frozen.
    Returns (image float32 with the frames' shape, info). info: n_frames (used), skipped
    ([{path, reason}] of unusable frames, which are left out), method, mean_sky (per channel,
    ADU), gap_fill (effective), gaps_filled, gaps_unfilled, substep_px_max, hot_pixels_suppressed,
    motions ([{frame, source: stars|previous|none, n_pairs, rms_px, moving_only, motion_px,
    angle_deg}]: the motion from frame - 1 to frame).
    Raises NightstackError when there are no paths or no usable frame.
    """
    validate_trails_config(cfg)
    paths = [str(p) for p in paths]
    if not paths:
        raise NightstackError("star trails: no frames to combine")
    n_frames = len(paths)
    gap_fill = cfg.method == "lighten" and cfg.gap_fill and cfg.gap_steps > 0
    info = {
        "method": cfg.method, "gap_fill": gap_fill, "gap_steps": cfg.gap_steps,
        "comet_fade": cfg.comet_fade, "skipped": [], "motions": [], "gaps_filled": 0,
        "gaps_unfilled": 0, "substep_px_max": 0.0, "hot_pixels_suppressed": 0,
    }
    acc, shape, sky_sum, n_used, is_2d = None, None, None, 0, False
    prev_xy, last_motion = None, None
    ground = None if sky is None or np.all(sky) else ~np.asarray(sky, dtype=bool)
    for index, path in enumerate(paths):
        try:
            frame, is_2d = read_trail_frame(path, shape)
        except FrameError as exc:
            log.warning("star trails: skipping %s", exc)
            info["skipped"].append({"path": exc.path, "reason": exc.reason})
            if progress is not None:
                progress(1)
            continue
        shape = frame.shape
        if ground is not None and ground.shape != shape[1:]:
            raise NightstackError(f"star trails: sky mask is {ground.shape[1]}x{ground.shape[0]} px "
                                  f"but {path} is {shape[2]}x{shape[1]} px")
        sky_adu = sky_levels(frame)
        noise_floor = quantisation_floor_adu(frame)
        sky_sum = sky_adu if sky_sum is None else sky_sum + sky_adu
        n_used += 1
        fade = comet_fade_factor(index, n_frames, cfg.comet_fade)
        if cfg.method == "average":
            acc = _accumulate_gamma(acc, frame, sky_adu, fade, cfg.gamma)
        else:
            frame -= sky_adu[:, None, None].astype(np.float32)
            if fade != 1.0:
                frame *= fade  # only the above-sky signal fades: the sky is already removed
            acc = frame.copy() if acc is None else np.fmax(acc, frame, out=acc)
            if gap_fill:
                prev_xy, last_motion = _fill_gap(acc, frame, index, n_frames, prev_xy,
                                                 last_motion, cfg, info, noise_floor * fade, ground)
        del frame
        if progress is not None:
            progress(1)
    if acc is None:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in info["skipped"][:3])
        raise NightstackError(f"star trails: no usable frame ({reasons})")
    mean_sky = sky_sum / n_used
    if cfg.method == "average":
        result = (acc / n_used) ** (1.0 / cfg.gamma)
    else:
        result = acc + mean_sky[:, None, None]
    result = result.astype(np.float32)
    if is_2d:
        result = result[0]
    info.update({"n_frames": n_used, "mean_sky": mean_sky.tolist()})
    return result, info


def _accumulate_gamma(acc, frame, sky, fade, gamma) -> np.ndarray:
    """Add ``max(x, 0) ** gamma`` of a frame (its above-sky signal faded) to a float64 sum."""
    if fade != 1.0:
        sky32 = sky[:, None, None].astype(np.float32)
        frame -= sky32
        frame *= fade
        frame += sky32
    np.maximum(frame, 0.0, out=frame)
    linear = frame.astype(np.float64) ** gamma
    return linear if acc is None else np.add(acc, linear, out=acc)


def _fill_gap(acc, frame, index, n_frames, prev_xy, last_motion, cfg, info, noise_floor_adu,
              ground=None):
    """Clean the current (sky-subtracted) frame, measure the motion since the previous one and
    maximise the gap copies into ``acc``. Returns (this frame's star positions, motion used)."""
    cleaned = np.empty_like(frame)
    for channel in range(frame.shape[0]):
        cleaned[channel], n_hot = suppress_single_pixel_outliers(
            frame[channel], cfg.hot_pixel_sigma, noise_floor_adu)
        info["hot_pixels_suppressed"] += n_hot
    cur_xy = star_positions(cleaned, None if ground is None else star_search_mask(~ground))
    if prev_xy is None:
        return cur_xy, last_motion
    measured = estimate_sky_motion(prev_xy, cur_xy)
    record = {"frame": index, "source": "none", "n_pairs": 0, "rms_px": None}
    if measured is not None:
        motion = measured.matrix
        record.update(source="stars", n_pairs=measured.n_pairs, rms_px=measured.rms_px,
                      moving_only=measured.moving_only)
    else:
        motion = last_motion
        if motion is not None:
            record["source"] = "previous"
    if motion is None:
        info["gaps_unfilled"] += 1
        info["motions"].append(record)
        return cur_xy, None
    extent = motion_extent_px(motion, frame.shape[1], frame.shape[2])
    record.update(motion_px=extent,
                  angle_deg=float(np.degrees(np.arctan2(motion[1, 0], motion[0, 0]))))
    info["motions"].append(record)
    info["substep_px_max"] = max(info["substep_px_max"], extent / (cfg.gap_steps + 1))
    add_gap_copies(acc, cleaned, motion, cfg, index, n_frames, ground)
    info["gaps_filled"] += 1
    return cur_xy, motion
