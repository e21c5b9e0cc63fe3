"""Stack step: warp every accepted frame onto the reference pixel grid and combine.

Memory stays bounded whatever the number of frames: the output is built tile by tile.
For one tile, each frame's calibrated FITS file is opened memory-mapped, only the box of
frame pixels the tile needs (plus a margin for the interpolation kernel) is read, warped
into the tile, normalised, and put in a stack buffer of shape (N, C, tile_h, tile_w); the
buffer is combined along the frame axis and the file is closed again, so no frame is ever
fully in memory and mapped pages are released after every tile.

Missing values (a frame that does not cover a pixel) are NaN throughout. Combine methods:

* ``mean`` - weighted mean of all values;
* ``median`` - median of all values (weights ignored);
* ``sigma`` - kappa-sigma clipping: centre = median, sigma = std of the kept values, reject
  values outside [centre - sigma_low*sigma, centre + sigma_high*sigma], iterate until nothing
  changes; weighted mean of the kept values;
* ``winsorized`` - Siril's winsorized sigma clipping: sigma from the stack winsorized at
  median +- 1.5 sigma (iterated until it settles, each time sigma *= 1.134), then rejection as
  in kappa-sigma; weighted mean of the kept values;
* ``max`` - per-pixel maximum (lighten, star trails).

Clipping needs some values to judge from: at a pixel with fewer than
``min_frames_for_clipping`` values the clipping methods give the plain (weighted) mean.

Because every kappa-sigma style rejection removes the values below one threshold and above
another, the kept values are always a contiguous run of the per-pixel sorted stack; clipping
therefore sorts once and moves two indices, and only pixels that changed in the previous
iteration are iterated again.
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .camera import Camera, homography
from .clipping import clipped_mean_into
from .errors import FrameError, NightstackError
from .io import OpenFrames, open_fits_data, open_frames_limit
from .noise import (
    curve_frame_counts,
    growing_mean_noise,
    pool_region_noise,
    probe_boxes,
)
from .settings import settings_from_dict
from .tile_mapping import camera_terms, map_tile

log = logging.getLogger("nightstack")

METHODS = ("mean", "median", "sigma", "winsorized", "max")
CLIPPING_METHODS = ("sigma", "winsorized")
INTERPOLATIONS = ("lanczos4", "lanczos3", "cubic", "linear")
WEIGHTINGS = ("none", "noise", "quality", "sharpness")

READ_MARGIN_PX = 8  # spline prefilter edge effects decay as 0.27^n: 8 px -> ~3e-5
COVERAGE_TOLERANCE_PX = 1e-3  # round-off of an exact mapping must not lose the last column
MIN_TILE_PX = 32
# Memory model of one tile, fitted with tracemalloc (benchmarks/bench_stack_memory.py):
WORK_ARRAYS = 3  # sorted copy, rejection mask, pixel weights (landscape) while combining
BYTES_PER_PIXEL_VALUE = 48  # per pixel and channel: counts, ranks, centre, sigma, sums
WARP_BYTES_PER_PX = 512  # coordinates (float64), read box, Lanczos accumulators per tile px
# a frame held open across tiles (io.OpenFrames): astropy's HDU objects and, for a compressed
# frame, its tile table (measured 0.22 MB; 500 frames of 24 MP took the stack job to 1.04 GB)
OPEN_FRAME_MB = 0.25
MIN_THREAD_BLOCK_PX = 16384  # smaller stacks are clipped on the calling thread
LANCZOS_A = 3


@dataclass
class FrameWarp:
    """How one calibrated frame maps onto the reference grid and how to normalise it.

    ``rotation`` (3x3) turns reference-camera directions into this frame's camera directions
    (see nightstack.camera.map_ref_to_frame). Normalised value per channel c:
    ``(v - offset[c]) / scale[c] + target_level[c]``. ``weight`` is 1/variance after
    normalisation, used when weighting is "noise". ``date_obs`` (ISO time or None) orders the
    frames of the measured noise curve.
    """

    path: str
    ref_camera: Camera
    frame_camera: Camera
    rotation: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    target_level: np.ndarray
    weight: float = 1.0
    date_obs: str | None = None


@dataclass
class StackConfig:
    """Settings of the stack step."""

    method: str = "winsorized"  # "mean" | "median" | "sigma" | "winsorized" | "max"
    sigma_low: float = 4.0  # rejection threshold below the centre, in sigmas
    sigma_high: float = 3.0  # rejection threshold above the centre, in sigmas
    iterations: int = 5  # maximum clipping iterations
    weighting: str = "none"  # "none" | "noise" (FrameWarp.weight in the final mean)
    interpolation: str = "cubic"  # "lanczos4" (OpenCV) | "lanczos3" | "cubic" | "linear"
    memory_mb: int = 512  # budget for the combine buffers; sets the tile size
    min_frames_for_clipping: int = 3  # fewer values at a pixel: clipping methods use the mean


@dataclass(frozen=True)
class TilePlan:
    """Tile size chosen for a stack, and what it costs in memory (MB)."""

    tile_h: int
    tile_w: int
    n_tiles_y: int
    n_tiles_x: int
    buffer_mb: float  # the N x C x tile stack buffer alone
    peak_mb: float  # buffer + combine work arrays + warping temporaries (estimate)
    over_budget: bool  # even the minimum tile breaks memory_mb

    @property
    def n_tiles(self) -> int:
        return self.n_tiles_y * self.n_tiles_x


# ---------------------------------------------------------------------------- settings


def stack_config_from_dict(d: dict | None) -> StackConfig:
    """Build a StackConfig from a settings dict; unknown keys or bad values -> NightstackError."""
    cfg = settings_from_dict(StackConfig, d, "stack")
    validate_stack_config(cfg)
    return cfg


def validate_stack_config(cfg: StackConfig) -> None:
    """Raise NightstackError listing every invalid setting of ``cfg``."""
    problems = []
    if cfg.method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)} (got {cfg.method!r})")
    if cfg.interpolation not in INTERPOLATIONS:
        problems.append(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)} (got {cfg.interpolation!r})"
        )
    if cfg.weighting not in WEIGHTINGS:
        problems.append(f"weighting must be one of {', '.join(WEIGHTINGS)} (got {cfg.weighting!r})")
    if not (cfg.sigma_low > 0 and cfg.sigma_high > 0):
        problems.append("sigma_low and sigma_high must be > 0")
    if cfg.iterations < 1:
        problems.append("iterations must be >= 1")
    if cfg.memory_mb < 1:
        problems.append("memory_mb must be >= 1")
    if cfg.min_frames_for_clipping < 2:
        problems.append("min_frames_for_clipping must be >= 2")
    if problems:
        raise NightstackError("stack settings: " + "; ".join(problems))


# ---------------------------------------------------------------------------- tiling


def plan_tiles(n_frames: int, out_shape, memory_mb: float, read_ahead: bool = False,
               open_frames: int = 0) -> TilePlan:
    """Square-ish tile size keeping N x C x tile buffers and work arrays below ``memory_mb``.

    Cost per tile pixel: the float32 stack buffer (N*C*4 bytes) plus WORK_ARRAYS copies of it
    while combining, per-pixel statistics, and the warping temporaries of one frame; with
    ``read_ahead`` a second stack buffer (the next tile, read while this one is combined).
    The ``open_frames`` files held open from tile to tile take OPEN_FRAME_MB each first.
    Tiles are at least MIN_TILE_PX on a side; ``over_budget`` says when even that exceeds the
    budget. The output image and coverage map (C*H*W*4 + H*W*2 bytes) are not part of it.
    """
    n_channels, height, width = (int(v) for v in out_shape)
    stack_copies = 1 + WORK_ARRAYS + (1 if read_ahead else 0)
    bytes_per_px = (n_channels * (n_frames * 4 * stack_copies + BYTES_PER_PIXEL_VALUE)
                    + WARP_BYTES_PER_PX)
    files_mb = open_frames * OPEN_FRAME_MB
    budget_px = int(max(memory_mb - files_mb, 0) * 2**20 // bytes_per_px)
    side = math.isqrt(budget_px)
    over_budget = side < MIN_TILE_PX
    if over_budget:
        tile_h, tile_w = min(height, MIN_TILE_PX), min(width, MIN_TILE_PX)
    else:
        tile_h = min(height, side)
        tile_w = min(width, max(side, budget_px // tile_h))
        tile_h = min(height, max(tile_h, budget_px // tile_w))
    tile_px = tile_h * tile_w
    return TilePlan(
        tile_h=tile_h,
        tile_w=tile_w,
        n_tiles_y=-(-height // tile_h),
        n_tiles_x=-(-width // tile_w),
        buffer_mb=n_frames * n_channels * 4 * tile_px / 2**20,
        peak_mb=bytes_per_px * tile_px / 2**20 + files_mb,
        over_budget=over_budget,
    )


def tile_bounds(plan: TilePlan, height: int, width: int):
    """Yield (y0, y1, x0, x1) of every tile, row by row."""
    for y0 in range(0, height, plan.tile_h):
        for x0 in range(0, width, plan.tile_w):
            yield y0, min(y0 + plan.tile_h, height), x0, min(x0 + plan.tile_w, width)


# ---------------------------------------------------------------------------- warping


def _frame_coordinates(tile, warp: FrameWarp, width: int, height: int):
    """Frame pixel positions (n, 2) of the reference pixels of tile (y0, y1, x0, x1), row-major,
    and a mask (n,) of those inside the frame.

    Inside means in front of the frame camera (the homography alone cannot tell: a ray behind
    the camera projects to a plausible pixel) and between the first and last pixel centres
    (interpolation never extrapolates); positions of inside points are clamped onto that range
    to absorb round-off. Mapped pixel by pixel (nightstack.tile_mapping).
    """
    ref, frame = warp.ref_camera, warp.frame_camera
    h = homography(ref, frame, warp.rotation)
    ray_z_row = np.asarray(warp.rotation, float)[2] @ np.linalg.inv(ref.intrinsic())
    y0, y1, x0, x1 = (int(v) for v in tile)
    xy, inside = map_tile(y0, y1, x0, x1, np.ascontiguousarray(h, dtype=np.float64),
                          np.ascontiguousarray(ray_z_row, dtype=np.float64), camera_terms(ref),
                          camera_terms(frame), int(width), int(height), COVERAGE_TOLERANCE_PX)
    if not inside.all():  # a tile wholly inside the frame (most of them) needs no compaction
        xy = xy[inside]
    np.clip(xy[:, 0], 0, width - 1, out=xy[:, 0])
    np.clip(xy[:, 1], 0, height - 1, out=xy[:, 1])
    return xy, inside


def _read_box(data: np.ndarray, xy: np.ndarray, margin_px: int):
    """Copy the frame region (C, h, w) around positions xy (n, 2) plus a margin.

    Returns (box, bx0, by0): the float32 copy and the frame pixel of its top-left corner.
    """
    _, height, width = data.shape
    bx0 = max(int(np.floor(xy[:, 0].min())) - margin_px, 0)
    by0 = max(int(np.floor(xy[:, 1].min())) - margin_px, 0)
    bx1 = min(int(np.floor(xy[:, 0].max())) + margin_px + 2, width)
    by1 = min(int(np.floor(xy[:, 1].max())) + margin_px + 2, height)
    box = np.asarray(data[:, by0:by1, bx0:bx1], dtype=np.float32)  # native byte order copy
    return box, bx0, by0


LANCZOS_CHUNK_PX = 1 << 16  # output pixels gathered at once: 36 taps x C x 4 bytes each


LANCZOS_TABLE_STEPS = 1 << 14  # fractions quantised to 1/16384 px (position error <= 3.1e-5 px)


def _exact_lanczos_weights(frac: np.ndarray) -> np.ndarray:
    """Normalised Lanczos-3 weights (n, 6) for taps at floor(x) - 2 .. floor(x) + 3."""
    taps = np.arange(-LANCZOS_A + 1, LANCZOS_A + 1)
    t = np.asarray(frac, np.float64)[:, None] - taps[None, :]
    w = np.sinc(t) * np.sinc(t / LANCZOS_A)
    return w / w.sum(axis=1, keepdims=True)


_LANCZOS_TABLE = _exact_lanczos_weights(np.arange(LANCZOS_TABLE_STEPS + 1) / LANCZOS_TABLE_STEPS)
_LANCZOS_TABLE = _LANCZOS_TABLE.astype(np.float32)


def _lanczos_weights(frac: np.ndarray) -> np.ndarray:
    """Lanczos-3 weights (n, 6) float32 of fractions frac (n,) in [0, 1), from a table.

    The sines cost more than the whole gather; a table of LANCZOS_TABLE_STEPS fractions is
    exact to float32 rounding at its nodes, and the nearest node moves a sample by at most
    half a step, far below any centroid error.
    """
    index = np.rint(np.asarray(frac) * LANCZOS_TABLE_STEPS).astype(np.intp)
    return _LANCZOS_TABLE[index]


def _interpolate_lanczos3(box: np.ndarray, x_abs, y_abs, bx0: int, by0: int) -> np.ndarray:
    """Separable Lanczos-3 gather of box (C, h, w) at absolute frame positions -> (C, n).

    Floor and fraction come from the absolute positions, so the result does not depend on
    where the box starts (tiled and untiled stacks agree bit for bit). Taps beyond the box
    edge (only at the frame edge, the box has a margin elsewhere) repeat the edge pixel.
    The 6x6 neighbourhoods are gathered in one indexing of a sliding-window view, in chunks
    of LANCZOS_CHUNK_PX positions so the gathered taps stay small.
    """
    x_floor, y_floor = np.floor(x_abs), np.floor(y_abs)
    ix0 = x_floor.astype(np.int64) - bx0
    iy0 = y_floor.astype(np.int64) - by0
    before, after = LANCZOS_A - 1, LANCZOS_A
    padded = np.pad(np.asarray(box, np.float32), ((0, 0), (before, after), (before, after)),
                    mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * LANCZOS_A, 2 * LANCZOS_A),
                                                       axis=(1, 2))
    out = np.empty((box.shape[0], x_abs.size), dtype=np.float32)
    for lo in range(0, x_abs.size, LANCZOS_CHUNK_PX):
        sl = slice(lo, lo + LANCZOS_CHUNK_PX)
        wx = _lanczos_weights(x_abs[sl] - x_floor[sl])
        wy = _lanczos_weights(y_abs[sl] - y_floor[sl])
        taps = windows[:, iy0[sl], ix0[sl]]  # (C, n, 6, 6): rows dy, columns dx
        rows = np.matmul(taps, wx[:, :, None])[..., 0]  # (C, n, 6)
        out[:, sl] = np.einsum("cnj,nj->cn", rows, wy)
    return out


REMAP_COLUMNS = 4096  # OpenCV's remap takes maps under 32767 px a side: positions in rows
REMAP_SUBPIXELS = 32  # OpenCV's INTER_TAB_SIZE: remap interpolates at 1/32 px steps


def _interpolate_lanczos4(box: np.ndarray, x_abs, y_abs, bx0: int, by0: int) -> np.ndarray:
    """Lanczos-4 (8x8 taps) of box (C, h, w) at absolute frame positions -> (C, n) float32.

    OpenCV's remap, 7x faster than the numpy Lanczos-3 gather on one core (measured on
    1536x1024x3: 0.10 s against 0.75 s); it places samples to 1/32 px, which moves star
    centroids by 0.016 px rms against 0.021 px for the exact Lanczos-3 (the centroid of a
    sampled star moves that much anyway). Taps beyond the box repeat its edge pixel.
    """
    import cv2

    n = x_abs.size
    if n == 0:
        return np.empty((box.shape[0], 0), np.float32)
    rows = -(-n // REMAP_COLUMNS)
    cols = min(n, REMAP_COLUMNS)
    maps = np.zeros((2, rows * cols), np.float32)
    # remap places samples on a 1/32 px grid; rounding the absolute positions to it first makes
    # the map values exact in float32, so the result does not depend on where the box starts
    # (tiled, cropped and padded stacks agree bit for bit)
    maps[0, :n] = np.rint(np.asarray(x_abs) * REMAP_SUBPIXELS) / REMAP_SUBPIXELS - bx0
    maps[1, :n] = np.rint(np.asarray(y_abs) * REMAP_SUBPIXELS) / REMAP_SUBPIXELS - by0
    image = np.ascontiguousarray(np.moveaxis(np.asarray(box, np.float32), 0, -1))
    if image.shape[-1] == 1:
        image = image[..., 0]
    out = cv2.remap(image, maps[0].reshape(rows, cols), maps[1].reshape(rows, cols),
                    cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(rows * cols, -1)[:n].T.astype(np.float32, copy=False)


def _fill_missing(box: np.ndarray):
    """Replace NaN/inf pixels of box (C, h, w) by the channel median -> (box, bad (h, w) or None).

    A single NaN would otherwise spread through the spline prefilter over the whole box.
    """
    finite = np.isfinite(box)
    if finite.all():
        return box, None
    bad = ~finite.all(axis=0)
    filled = box.copy()
    for channel, ok in zip(filled, finite):
        channel[~ok] = np.median(channel[ok]) if ok.any() else 0.0
    return filled, bad


def _touches_missing(bad: np.ndarray, xy, bx0: int, by0: int, method: str) -> np.ndarray:
    """True (n,) where the interpolation kernel at xy reaches a missing pixel of the box."""
    reach_px = {"linear": 0, "lanczos4": 3}.get(method, LANCZOS_A - 1)
    if reach_px:
        bad = ndimage.binary_dilation(bad, iterations=reach_px, structure=np.ones((3, 3)))
    coords = np.stack([xy[:, 1] - by0, xy[:, 0] - bx0])
    return ndimage.map_coordinates(bad.astype(np.float32), coords, order=1, mode="nearest") > 0


def _interpolate(box: np.ndarray, xy: np.ndarray, bx0: int, by0: int, method: str) -> np.ndarray:
    """Values (C, n) of box (C, h, w) at absolute frame positions xy (n, 2).

    Positions whose kernel reaches a NaN pixel of the frame come out NaN (missing).
    """
    box, bad = _fill_missing(box)
    values = _interpolate_finite(box, xy, bx0, by0, method)
    if bad is not None:
        values[:, _touches_missing(bad, xy, bx0, by0, method)] = np.nan
    return values


def _interpolate_finite(box: np.ndarray, xy: np.ndarray, bx0: int, by0: int,
                        method: str) -> np.ndarray:
    """Values (C, n) of a NaN-free box (C, h, w) at absolute frame positions xy (n, 2)."""
    if method == "lanczos4":
        return _interpolate_lanczos4(box, xy[:, 0], xy[:, 1], bx0, by0)
    if method == "lanczos3":
        return _interpolate_lanczos3(box, xy[:, 0], xy[:, 1], bx0, by0)
    # Subtracting an integer origin is exact, so linear results do not depend on the box.
    coords = np.stack([xy[:, 1] - by0, xy[:, 0] - bx0])
    order = {"cubic": 3, "linear": 1}[method]
    return np.stack(
        [
            ndimage.map_coordinates(channel, coords, order=order, mode="mirror", prefilter=True)
            for channel in box
        ]
    )


def warp_tile(data_memmap, warp: FrameWarp, y0: int, y1: int, x0: int, x1: int,
              interpolation: str = "cubic") -> np.ndarray:
    """Frame values on the reference pixels [y0:y1, x0:x1]: float32 (C, y1-y0, x1-x0).

    ``data_memmap`` is the frame's (C, H, W) (or (H, W)) data, memory-mapped; only the box of
    frame pixels the tile maps into, plus READ_MARGIN_PX, is read. NaN where the frame does
    not cover a reference pixel. Values are not normalised (see normalise_tile).
    """
    if interpolation not in INTERPOLATIONS:
        raise NightstackError(f"unknown interpolation {interpolation!r}")
    data = data_memmap if data_memmap.ndim == 3 else data_memmap[None]
    n_channels, height, width = data.shape
    xy, inside = _frame_coordinates((y0, y1, x0, x1), warp, width, height)
    if inside.any():
        box, bx0, by0 = _read_box(data, xy, READ_MARGIN_PX)
        values = _interpolate(box, xy, bx0, by0, interpolation)
    if inside.all():  # most tiles: the values are the tile, no NaN fill and scatter
        out = values.astype(np.float32, copy=False)
    else:
        out = np.full((n_channels, (y1 - y0) * (x1 - x0)), np.nan, dtype=np.float32)
        if inside.any():
            out[:, inside] = values
    return out.reshape(n_channels, y1 - y0, x1 - x0)


def normalise_tile(tile: np.ndarray, warp: FrameWarp) -> np.ndarray:
    """Apply the frame's additive/multiplicative normalisation to a (C, h, w) tile -> float32.

    A float32 ``tile`` is normalised in place (three float32 passes, no float64 copies: the
    rounding, 1e-7 of a value, is far below any noise)."""
    out = tile if tile.dtype == np.float32 else tile.astype(np.float32)
    offset = np.asarray(warp.offset, np.float64).reshape(-1, 1, 1)
    scale = np.asarray(warp.scale, np.float64).reshape(-1, 1, 1)
    target = np.asarray(warp.target_level, np.float64).reshape(-1, 1, 1)
    out -= offset.astype(np.float32)
    out *= (1.0 / scale).astype(np.float32)
    out += target.astype(np.float32)
    return out


def read_warped_tile(warp: FrameWarp, y0, y1, x0, x1, interpolation: str,
                     frames: OpenFrames | None = None) -> np.ndarray:
    """Warp and normalise one tile of the frame: (C, h, w) float32.

    A float32 frame is memory-mapped; of a tile-compressed one only the compression tiles
    the read box touches are decompressed (io.open_fits_data). ``frames`` keeps the file
    open for the next tile (io.OpenFrames); without it the file is opened and closed here.
    """
    try:
        if frames is None:
            frames = OpenFrames(max_open=0)
        with frames.reading(warp.path) as data:
            tile = warp_tile(data, warp, y0, y1, x0, x1, interpolation)
    except (OSError, ValueError, TypeError) as exc:  # astropy: TypeError for a truncated file
        raise FrameError(warp.path, f"cannot read calibrated frame: {exc}") from exc
    return normalise_tile(tile, warp)


# ---------------------------------------------------------------------------- combining


def _median_of_run(sorted_values, lo, n) -> np.ndarray:
    """Median (P,) float64 of the sorted run [lo, lo + n) of each pixel; NaN where n == 0."""
    last = sorted_values.shape[0] - 1
    i1 = np.clip(lo + (n - 1) // 2, 0, last)
    i2 = np.clip(lo + n // 2, 0, last)
    a = np.take_along_axis(sorted_values, i1[None], axis=0)[0].astype(np.float64)
    b = np.take_along_axis(sorted_values, i2[None], axis=0)[0].astype(np.float64)
    return np.where(n > 0, 0.5 * (a + b), np.nan)


def _mean_of_kept(values, kept, weights) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean (P,) float32 and count (P,) of the kept values; NaN where none is kept."""
    num = np.zeros(values.shape[1], dtype=np.float64)
    den = np.zeros(values.shape[1], dtype=np.float64)
    for i in range(values.shape[0]):
        num += np.where(kept[i], values[i], 0.0) * weights[i]
        den += kept[i] * weights[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(den > 0, num / den, np.nan)
    return mean.astype(np.float32), kept.sum(axis=0, dtype=np.int32)


def _check_weights(weights, n_frames: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_frames, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).ravel()
    if weights.shape != (n_frames,):
        raise NightstackError(f"need one weight per frame ({n_frames}), got {weights.size}")
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
        raise NightstackError("frame weights must be finite, >= 0 and not all zero")
    return weights


def combine_with_rejection(values, cfg: StackConfig, weights=None, pixel_weights=None,
                           threads: int = 1):
    """Combine a stack along its first axis, also saying which values were rejected.

    values: (N, ...) array, NaN = missing. weights: (N,) or None, used by the means.
    pixel_weights: optional (N, ...) >= 0 (broadcast to values), multiplying ``weights`` value
    by value in the means (rejection statistics stay unweighted). threads: the clipping
    methods sort and clip blocks of pixels on that many threads (same result).
    Returns (combined (...) float32, NaN where no value; n_used (...) int32 = values that
    entered the result; rejected (N, ...) bool = finite values that clipping removed).
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim < 1 or values.shape[0] == 0:
        raise NightstackError("nothing to combine: the stack has no frames")
    n_frames, pixel_shape = values.shape[0], values.shape[1:]
    flat = values.reshape(n_frames, -1)
    weights = _check_weights(weights, n_frames)
    if pixel_weights is not None:
        pixel_weights = np.broadcast_to(np.asarray(pixel_weights, np.float32), values.shape)
        weights = weights[:, None] * pixel_weights.reshape(n_frames, -1)
    if cfg.method in CLIPPING_METHODS:
        per_value = weights if weights.ndim == 2 else np.broadcast_to(weights[:, None], flat.shape)
        combined, n_used, rejected = _clipped_mean_threaded(flat, per_value, cfg, threads)
        return combined.reshape(pixel_shape), n_used.reshape(pixel_shape), rejected.reshape(values.shape)
    finite = np.isfinite(flat)
    no_rejection = np.zeros_like(finite)
    if cfg.method == "max":
        combined = np.fmax.reduce(flat, axis=0)
        n_used, rejected = finite.sum(axis=0, dtype=np.int32), no_rejection
    elif cfg.method == "median":
        sorted_values = np.sort(flat, axis=0)
        n_used = finite.sum(axis=0, dtype=np.int32)
        combined = _median_of_run(sorted_values, np.zeros_like(n_used), n_used).astype(np.float32)
        rejected = no_rejection
    elif cfg.method == "mean":
        combined, n_used = _mean_of_kept(flat, finite, weights)
        rejected = no_rejection
    else:
        raise NightstackError(f"unknown stack method {cfg.method!r}")
    return (
        combined.reshape(pixel_shape),
        n_used.reshape(pixel_shape),
        rejected.reshape(values.shape),
    )


def _clipped_mean_threaded(flat, weights, cfg: StackConfig, threads: int):
    """clipping.clipped_mean_into of (N, P) values and weights, its P pixels cut into
    ``threads`` blocks, each sorted and clipped on its own thread (numpy's sort and the kernel
    release the GIL): (combined (P,), n_used (P,), rejected (N, P)), the same as in one block."""
    n_frames, n_pixels = flat.shape
    combined = np.empty(n_pixels, dtype=np.float32)
    n_used = np.zeros(n_pixels, dtype=np.int32)
    rejected = np.zeros((n_frames, n_pixels), dtype=bool)
    settings = (cfg.method == "winsorized", float(cfg.sigma_low), float(cfg.sigma_high),
                int(cfg.iterations), int(cfg.min_frames_for_clipping))

    def clip_block(block: slice) -> None:
        values = flat[:, block]
        clipped_mean_into(values, np.sort(values, axis=0), weights[:, block], *settings,
                          combined[block], n_used[block], rejected[:, block])

    n_blocks = max(1, min(int(threads), n_pixels // MIN_THREAD_BLOCK_PX))
    edges = np.linspace(0, n_pixels, n_blocks + 1).astype(int)
    blocks = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if n_blocks == 1:
        clip_block(blocks[0])
    else:
        with ThreadPoolExecutor(n_blocks, thread_name_prefix="clip") as pool:
            list(pool.map(clip_block, blocks))  # list(): a block's exception is raised here
    return combined, n_used, rejected


def combine(values, cfg: StackConfig, weights=None):
    """Combine a stack (N, ...) along the frame axis -> (combined (...) float32, n_used (...)).

    NaN marks missing values; see the module docstring for the methods. n_used counts the
    values that entered each result (after rejection for the clipping methods).
    """
    combined, n_used, _ = combine_with_rejection(values, cfg, weights)
    return combined, n_used


# ---------------------------------------------------------------------------- stacking


def _check_frame(warp: FrameWarp, n_channels: int) -> None:
    """Raise FrameError if the frame's file, shape or normalisation cannot be stacked."""
    try:
        hdul, data = open_fits_data(warp.path)
    except (OSError, ValueError) as exc:
        raise FrameError(warp.path, f"cannot open calibrated frame: {exc}") from exc
    try:
        if data is None:
            raise FrameError(warp.path, "calibrated frame has no image data")
        shape = data.shape if data.ndim == 3 else (1, *data.shape)
    finally:
        del data
        hdul.close()
    expected = (n_channels, warp.frame_camera.height_px, warp.frame_camera.width_px)
    if len(shape) != 3 or shape != expected:
        raise FrameError(warp.path, f"data shape {shape} does not match expected {expected}")
    for name in ("offset", "scale", "target_level"):
        arr = np.asarray(getattr(warp, name), dtype=float)
        if arr.shape != (n_channels,) or not np.all(np.isfinite(arr)):
            raise FrameError(warp.path, f"{name} must be {n_channels} finite numbers")
    if np.any(np.asarray(warp.scale, dtype=float) <= 0):
        raise FrameError(warp.path, "normalisation scale must be > 0")
    if not (np.isfinite(warp.weight) and warp.weight > 0):
        raise FrameError(warp.path, f"noise weight must be a positive number, got {warp.weight}")


def usable_warps(warps: list[FrameWarp], out_shape, reference_grid: bool = True
                 ) -> tuple[list[FrameWarp], dict]:
    """Split frames into those that can be stacked and {path: reason} for the others.

    With ``reference_grid`` the stack must be the reference camera's size (no framing).
    """
    n_channels, height, width = out_shape
    good, skipped = [], {}
    for warp in warps:
        ref = warp.ref_camera
        if reference_grid and (ref.height_px, ref.width_px) != (height, width):
            raise NightstackError(
                f"reference camera is {ref.width_px}x{ref.height_px} px but the stack is "
                f"{width}x{height} px"
            )
        try:
            _check_frame(warp, n_channels)
        except FrameError as exc:
            log.warning("skipping %s", exc)
            skipped[warp.path] = exc.reason
            continue
        good.append(warp)
    return good, skipped


def _fallback_note(cfg: StackConfig, coverage: np.ndarray, n_frames: int) -> str | None:
    """Say where a clipping method fell back to the mean for want of frames."""
    if cfg.method not in CLIPPING_METHODS:
        return None
    if n_frames < cfg.min_frames_for_clipping:
        return (f"only {n_frames} frame(s), fewer than min_frames_for_clipping="
                f"{cfg.min_frames_for_clipping}: {cfg.method} fell back to the mean everywhere")
    thin = np.count_nonzero((coverage > 0) & (coverage < cfg.min_frames_for_clipping))
    if thin:
        return (f"{thin} pixel(s) covered by fewer than {cfg.min_frames_for_clipping} frames "
                f"use the mean instead of {cfg.method}")
    return None


def time_order(warps: list[FrameWarp]) -> np.ndarray:
    """Frame indices sorted by DATE-OBS; frames without one keep their place, last."""
    return np.array(sorted(range(len(warps)), key=lambda i: (
        warps[i].date_obs is None, warps[i].date_obs or "")), dtype=int)


def _probe_noise(stack, combined, origin, box, warps, weights):
    """Noise curve of one probe region: growing_mean_noise on the box (y0, y1, x0, x1,
    absolute px) of a tile whose top-left pixel is ``origin`` (y0, x0)."""
    by0, by1 = box[0] - origin[0], box[1] - origin[0]
    bx0, bx1 = box[2] - origin[1], box[3] - origin[1]
    return growing_mean_noise(stack[:, :, by0:by1, bx0:bx1], time_order(warps),
                              curve_frame_counts(len(warps)), weights,
                              combined=combined[:, by0:by1, bx0:bx1])


def _noise_curve_info(pooled, n_frames: int, probes: dict) -> dict | None:
    """The stack info's ``noise_curve`` entry (None when no probe region could be measured)."""
    if pooled is None:
        return None
    return {
        "n_frames": [int(k) for k in curve_frame_counts(n_frames)],
        "noise_adu": [float(v) for v in pooled["noise_adu"]],
        "stack_noise_adu": pooled["stack_noise_adu"],
        "n_sky_px": pooled["n_sky_px"],
        "regions": [list(box) for box in probes.values()],
        "measure": "robust sigma of star-masked sky, large-scale background removed, of the "
                   "weighted mean of the first n frames in DATE-OBS order (RMS over channels)",
    }


def _tile_view(buffer: np.ndarray, n_frames: int, n_channels: int, bounds) -> np.ndarray:
    """The front of the flat float32 ``buffer`` as one tile's (N, C, h, w) stack."""
    y0, y1, x0, x1 = bounds
    return buffer[: n_frames * n_channels * (y1 - y0) * (x1 - x0)].reshape(
        n_frames, n_channels, y1 - y0, x1 - x0)


def _read_tile_stack(warps: list[FrameWarp], bounds, origin_px, interpolation: str,
                     stack: np.ndarray, frames: OpenFrames, indices) -> None:
    """Warp the frames ``indices`` onto one tile (y0, y1, x0, x1) of the output, into their
    slots of ``stack`` (N, C, h, w). origin_px: (x0, y0) of the output in reference pixels."""
    y0, y1, x0, x1 = bounds
    ox, oy = origin_px
    for i in indices:
        stack[i] = read_warped_tile(warps[i], y0 + oy, y1 + oy, x0 + ox, x1 + ox, interpolation,
                                    frames)


def _tile_stacks(warps: list[FrameWarp], tiles: list, origin_px, n_channels: int,
                 interpolation: str, buffers: list, readers: int = 1):
    """Yield (bounds, stack) for every tile: stack (N, C, h, w) holds every frame warped onto
    the tile (``_read_tile_stack``).

    buffers: one or two flat float32 arrays, each large enough for the largest tile. With two,
    the next tile is read and warped in the background while the caller combines the current
    one, by ``readers`` threads that each take every readers-th frame (decompressing, warping
    and numpy release the interpreter lock for most of their time: on 500 compressed frames
    one reader was busy all the time and the combining 15 % of it); a stack yielded stays
    untouched until the caller asks for the next one. Each reader keeps its frames open from
    tile to tile (io.OpenFrames) and closes them when the last tile is read or the caller
    stops early. The stacks do not depend on ``readers``.
    """
    n_frames = len(warps)
    readers = max(1, min(readers, n_frames)) if len(buffers) > 1 else 1
    shares = [range(r, n_frames, readers) for r in range(readers)]
    with contextlib.ExitStack() as open_files:
        share = open_frames_limit() // readers  # of the file descriptors, for each reader
        frames = [open_files.enter_context(OpenFrames(max_open=share)) for _ in range(readers)]

        def start(k, pool):
            stack = _tile_view(buffers[k % len(buffers)], n_frames, n_channels, tiles[k])
            jobs = [pool.submit(_read_tile_stack, warps, tiles[k], origin_px, interpolation,
                                stack, frames[r], shares[r]) for r in range(readers)]
            return stack, jobs

        if len(buffers) == 1:
            for bounds in tiles:
                stack = _tile_view(buffers[0], n_frames, n_channels, bounds)
                _read_tile_stack(warps, bounds, origin_px, interpolation, stack, frames[0],
                                 shares[0])
                yield bounds, stack
            return
        with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="read-ahead") as pool:
            pending = start(0, pool)
            for k, bounds in enumerate(tiles):
                stack, jobs = pending
                for job in jobs:
                    job.result()
                if k + 1 < len(tiles):
                    pending = start(k + 1, pool)
                yield bounds, stack


def stack_frames(warps: list[FrameWarp], out_shape, cfg: StackConfig | None = None,
                 progress=None, origin_px=None, fill_value: float = 0.0, landscape=None,
                 threads: int = 1):
    """Warp all frames onto the reference grid and combine them, tile by tile.

    warps: one FrameWarp per accepted frame. out_shape: (C, H, W) of the reference grid, or
    of the output box when ``origin_px`` = (x0, y0), whole reference pixels: output pixel
    (row i, column j) is then reference pixel (x0 + j, y0 + i) (nightstack.framing).
    progress: optional callable, called with 1 after each tile; one with an ``expect`` method
    (nightstack.logs.Progress) is first given the number of tiles.
    landscape: optional nightstack.landscape.LandscapeStack: the sky is combined from sky
    source pixels only and joined to the frozen (unregistered) ground along a feathered seam.
    Returns (image (C, H, W) float32, ``fill_value`` where no frame covers; coverage (H, W) int16 = number
    of frames covering each pixel; info dict with the tile plan, rejected-pixel fraction per
    frame, skipped frames, notes and ``noise_curve``: the background noise (ADU) of the
    weighted mean of the first n frames in time order, measured on the tiles' own warped
    values in the central region (nightstack.noise), None if that region has no sky).
    threads: with 2 or more, the next tile is read and warped, by that many threads, while one
    is combined, also on that many threads (a second stack buffer, within ``cfg.memory_mb``);
    the result is the same.
    """
    cfg = cfg or StackConfig()
    validate_stack_config(cfg)
    n_channels, height, width = (int(v) for v in out_shape)
    warps, skipped = usable_warps(list(warps), (n_channels, height, width),
                                  reference_grid=origin_px is None)
    ox, oy = (0, 0) if origin_px is None else (int(v) for v in origin_px)
    if not warps:
        raise NightstackError("no frame left to stack" + (
            f" ({len(skipped)} unreadable)" if skipped else ""))
    n_frames = len(warps)
    weights = np.array([w.weight for w in warps]) if cfg.weighting != "none" else None
    if landscape is not None:  # frame indices may have shifted by skipped frames
        landscape = landscape.for_warps(warps)
    # a landscape night holds a second (frozen) stack per tile
    read_ahead = threads > 1
    plan = plan_tiles(n_frames * (1 if landscape is None else 2), (n_channels, height, width),
                      cfg.memory_mb, read_ahead=read_ahead, open_frames=n_frames)
    notes = []
    if weights is not None and cfg.method in ("median", "max"):
        notes.append(f"noise weights are not used by the {cfg.method} method")
    if plan.over_budget:
        notes.append(f"{n_frames} frames need about {plan.peak_mb:.0f} MB even with "
                     f"{MIN_TILE_PX}x{MIN_TILE_PX} px tiles, above memory_mb={cfg.memory_mb}")
        log.warning(notes[-1])

    image = np.zeros((n_channels, height, width), dtype=np.float32)
    coverage = np.zeros((height, width), dtype=np.int16)
    rejected_count = np.zeros(n_frames, dtype=np.int64)
    valid_count = np.zeros(n_frames, dtype=np.int64)
    buffers = [np.empty(n_frames * n_channels * plan.tile_h * plan.tile_w, dtype=np.float32)
               for _ in range(2 if read_ahead else 1)]
    tiles = list(tile_bounds(plan, height, width))
    if hasattr(progress, "expect"):
        progress.expect(len(tiles))
    probes = probe_boxes(tiles, height, width)
    probe_noise = []
    for (y0, y1, x0, x1), stack in _tile_stacks(warps, tiles, (ox, oy), n_channels,
                                                cfg.interpolation, buffers, readers=threads):
        finite = np.isfinite(stack)
        coverage[y0:y1, x0:x1] = finite.sum(axis=0, dtype=np.int16).max(axis=0)
        valid_count += finite.reshape(n_frames, -1).sum(axis=1)
        del finite
        ref_tile = (y0 + oy, y1 + oy, x0 + ox, x1 + ox)  # the tile in reference pixels
        sky_weights = None if landscape is None else landscape.sky_weights(
            stack, warps, ref_tile, cfg.interpolation)
        combined, _, rejected = combine_with_rejection(stack, cfg, weights, sky_weights, threads)
        rejected_count += rejected.reshape(n_frames, -1).sum(axis=1)
        joined = combined if landscape is None else landscape.join_ground(
            combined, warps, ref_tile, cfg, weights)
        image[:, y0:y1, x0:x1] = np.nan_to_num(joined, nan=fill_value)
        if (y0, y1, x0, x1) in probes:
            probe_noise.append(_probe_noise(stack, combined, (y0, x0), probes[(y0, y1, x0, x1)],
                                            warps, weights))
        if progress is not None:
            progress(1)

    fallback = _fallback_note(cfg, coverage, n_frames)
    if fallback:
        notes.append(fallback)
        log.info(fallback)
    with np.errstate(invalid="ignore", divide="ignore"):
        rejected_fraction = np.where(valid_count > 0, rejected_count / valid_count, 0.0)
    info = {
        "method": cfg.method,
        "interpolation": cfg.interpolation,
        "weighting": cfg.weighting,
        "n_frames": n_frames,
        "tile_h": plan.tile_h,
        "tile_w": plan.tile_w,
        "n_tiles": plan.n_tiles,
        "buffer_mb": round(plan.buffer_mb, 3),
        "peak_buffer_mb": round(plan.peak_mb, 3),
        "memory_mb": cfg.memory_mb,
        "over_budget": plan.over_budget,
        "uncovered_fraction": float(np.mean(coverage == 0)),
        "rejected_fraction": {w.path: float(f) for w, f in zip(warps, rejected_fraction)},
        "weights": None if weights is None else {w.path: float(w.weight) for w in warps},
        "skipped_frames": skipped,
        "notes": notes,
        "noise_curve": _noise_curve_info(pool_region_noise(probe_noise), n_frames, probes),
    }
    return image, coverage, info
