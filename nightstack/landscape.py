"""Landscape nights: which pixels are sky and which are the fixed foreground (ground).

A tripod camera sees the sky turn while the ground (hills, trees, buildings) stays put on the
sensor. The sky is registered and stacked; the ground must not be: it is stacked frozen, on the
lights' own pixel grid, and the two are joined along a feathered seam. This module finds the
sky mask of a night and does the per-tile composition; the stack step calls it through a small
hook (``LandscapeStack``) so the registered stack itself is untouched.

Sky mask sources (config ``landscape.ground``):

* ``none`` - all sky (no landscape);
* ``horizon`` - the bottom ``horizon_fraction`` of the frame is ground;
* a path - an image the size of the lights, white (>= 128 of 255) = sky;
* ``auto`` - found from the night's calibrated frames (``find_sky_mask``).

How ``auto`` finds the ground
-----------------------------
The frames' light-pollution model (removed at calibration) is added back first, since it
lifts a dark foreground to the sky's level. The time-median of the frames' luminance is then
split in two by Otsu's threshold (a 3x3 median first, so stars and noise do not decide the
split); small islands of either class are given to the other (stars, gaps between leaves).
The darker class is ground only when it looks like a foreground and not like the sky's own
structure (a gradient, a nebula, a dark cloud or the vignetted corners):

* its contrast to the sky is at least ``MIN_CONTRAST_SIGMA`` noise sigmas;
* its edges are silhouettes: the contrast divided by the median gradient on a component's
  boundary (the *edge width*, px) is at most ``MAX_EDGE_WIDTH_PX``; a gradient or a nebula's
  edge is tens to hundreds of pixels wide; and that boundary gradient is at least
  ``MIN_EDGE_SNR`` times the median gradient inside the sky (noise), so the ragged, noise-made
  boundary of a threshold laid across a smooth gradient (vignetting) does not count;
* at least one such component touches the frame border (a foreground enters the frame) and
  the ground is not nearly all the frame (``MAX_GROUND_FRACTION``: the sky is what is left).

On deep-sky nights nothing passes, so the mask is all sky and the results are unchanged. The
kept ground is then traced to the pixel by a local threshold, midway between the sky's and
the ground's smooth local levels, on the lightly smoothed median (thin branches survive).
The ground is assumed darker than the sky (a lit foreground: give a mask image).

The frozen stack combines every frame at its own sensor pixels (the reference's pose for all),
with the stack's rejection and weights; on the ground each frame's own calibrated values are
used (``ground_values``: the sky's per-frame level normalisation does not apply to the ground;
pixels on a silhouette get it in proportion to their sky fraction, stored with the mask).

Per-frame light pollution (``frame_sky``, ``sky_model_only``): at calibration each frame's
gradient is fitted on its sky and applied to the sky only (the ground loses only the model's
median level), so the ground keeps the same level in every frame.

Composition, per output tile of the stack (``LandscapeStack``): every frame's warped sky value
gets a weight ``sky_taper`` of its source position's distance from the ground (0 within the
kernel's reach + SKY_EDGE_MARGIN_PX, rising to 1 over ``feather_px``); weight-0 values are
dropped, so ground never smears into the sky, and frames fade in and out smoothly, so the
changing set of frames near the ground leaves no seams. The registered sky and the frozen
stack are then joined, ``w * sky + (1 - w) * frozen`` (``compose``), with ``w`` the same taper
of the reference pixel's own distance from the ground (``feather_weight``): 0 on the ground,
so no ground pixel takes a registered-sky value.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .background import interp_matrix
from .errors import NightstackError
from .filters import median_filter
from .settings import settings_from_dict

log = logging.getLogger("nightstack")

GROUND_KEYWORDS = ("auto", "none", "horizon")
MASK_WHITE_LEVEL = 128  # mask image pixels at or above this (of 255) are sky
MAX_MASK_FRAMES = 15  # the time-median uses at most this many frames, evenly spread
MIN_CONTRAST_SIGMA = 10.0  # ground is at least this many noise sigmas darker than the sky
MAX_EDGE_WIDTH_PX = 6.0  # silhouettes: contrast / boundary gradient at most this wide
MIN_EDGE_SNR = 8.0  # ... and that gradient this many times the sky's typical (noise) gradient
MAX_GROUND_FRACTION = 0.85  # a darker class covering more than this is sky, not ground
MIN_ISLAND_FRACTION = 2e-4  # islands smaller than this fraction of the frame change class
MIN_ISLAND_PX = 16
LEVEL_SMOOTH_FRACTION = 1.0 / 16  # Gaussian sigma of the local level maps, of the short side
STAR_EDGE_MARGIN_PX = 4  # stars are sought this far from the ground (its edges excite the DoG)
SKY_EDGE_MARGIN_PX = 1  # sky pixels next to the ground are mixed; the registered sky skips them
MAD_TO_SIGMA = 1.4826
FRAME_MASK_MAX_SIDE_PX = 2000  # per-frame masks (for the light-pollution fit) on frames binned to this


@dataclass
class LandscapeConfig:
    """Settings of the landscape foreground (see the module docstring)."""

    ground: str = "auto"  # auto | none | horizon | path to a mask image (white = sky)
    horizon_fraction: float = 0.3  # ground = this bottom fraction of the frame (ground: horizon)
    feather_px: float = 8.0  # width of the seam between registered sky and frozen ground


def landscape_config_from_dict(d: dict | None) -> LandscapeConfig:
    """LandscapeConfig from a settings dict; bad values -> NightstackError. A mask path keeps its
    case (settings_from_dict lower-cases words)."""
    d = dict(d or {})
    ground = d.get("ground", "auto")
    cfg = settings_from_dict(LandscapeConfig, {k: v for k, v in d.items() if k != "ground"},
                             "landscape")
    if not isinstance(ground, str) or not ground.strip():
        raise NightstackError(f"landscape setting ground: expected auto, none, horizon or a mask "
                              f"image path, got {ground!r}")
    ground = ground.strip()
    cfg.ground = ground.lower() if ground.lower() in GROUND_KEYWORDS else ground
    if not 0 <= cfg.horizon_fraction < 1:
        raise NightstackError(f"landscape setting horizon_fraction must be in [0, 1), got "
                              f"{cfg.horizon_fraction}")
    if not cfg.feather_px >= 0:
        raise NightstackError(f"landscape setting feather_px must be >= 0, got {cfg.feather_px}")
    return cfg


# ---------------------------------------------------------------------------- fixed sources


def horizon_sky_mask(height_px: int, width_px: int, horizon_fraction: float) -> np.ndarray:
    """Sky mask (H, W) bool, True = sky: the bottom ``horizon_fraction`` of the rows is ground
    (rounded to whole rows)."""
    n_ground = round(float(horizon_fraction) * height_px)
    sky = np.ones((height_px, width_px), dtype=bool)
    if n_ground:
        sky[height_px - n_ground:] = False
    return sky


def read_mask_image(path, height_px: int, width_px: int) -> np.ndarray:
    """Sky mask (H, W) bool from an image file (any format Pillow reads; colour is averaged),
    white (>= MASK_WHITE_LEVEL of 255, or of the image's maximum for 16-bit) = sky.

    Raises NightstackError naming the file when it is missing, unreadable, or not the size
    of the lights (width x height px).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise NightstackError(f"landscape mask {path}: no such file")
    try:
        with Image.open(path) as im:
            size = im.size
            arr = np.asarray(im.convert("I") if im.mode.startswith("I;16") else im.convert("L"),
                             dtype=np.float64)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise NightstackError(f"landscape mask {path}: cannot read it as an image ({exc})") from None
    if size != (width_px, height_px):
        raise NightstackError(
            f"landscape mask {path} is {size[0]}x{size[1]} px but the lights are "
            f"{width_px}x{height_px} px (the mask must be drawn on a light, same size)")
    full = 65535.0 if arr.max() > 255 else 255.0
    return arr >= MASK_WHITE_LEVEL * full / 255.0


# ---------------------------------------------------------------------------- automatic mask


def restore_light_pollution(luminance2d: np.ndarray, model_binned2d: np.ndarray,
                            factor: int, bin_px: int = 1) -> np.ndarray:
    """Add a frame's binned light-pollution model (h, w) back to its luminance (H, W), ADU.

    The model is block-averaged by ``factor`` (nightstack.outputs.bin_image) and is smooth, so
    bilinear interpolation between block centres restores it; its median is taken off again
    (the calibration kept that level). ``bin_px``: the luminance itself is a block mean by this
    factor (bin_mean), so its pixel k covers frame pixels k*bin_px ... (k+1)*bin_px - 1.
    Returns float32 (H, W).
    """
    height, width = luminance2d.shape
    f, b = float(factor), float(bin_px)
    yy = (np.arange(height) * b + (b - 1) / 2 - (f - 1) / 2) / f
    xx = (np.arange(width) * b + (b - 1) / 2 - (f - 1) / 2) / f
    # bilinear weights along each axis as matrices: two small products, no per-pixel gather
    rows_y = interp_matrix(yy, np.arange(model_binned2d.shape[0])).astype(np.float32)
    rows_x = interp_matrix(xx, np.arange(model_binned2d.shape[1])).astype(np.float32)
    model = rows_y @ model_binned2d.astype(np.float32) @ rows_x.T
    return (luminance2d + model - np.median(model_binned2d)).astype(np.float32)


def sky_mask_bin_factor(height: int, width: int) -> int:
    """Binning of the first, cheap look for ground on large frames (1 = none): the same as the
    per-frame masks of frame_sky (longer side about FRAME_MASK_MAX_SIDE_PX)."""
    return max(1, round(max(height, width) / FRAME_MASK_MAX_SIDE_PX))


def otsu_threshold(values: np.ndarray, n_bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample: the split maximising the between-class variance,
    over the 0.5-99 percentile range (stars, a satellite trail or black pixels neither stretch
    the bins nor become a class of their own)."""
    values = values[np.isfinite(values)]
    lo, hi = np.percentile(values, [0.5, 99.0])
    if not hi > lo:
        return float(hi)
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=n_bins, range=(lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * centres)[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = w0 * w1 * (s0 / w0 - (np.sum(counts * centres) - s0) / w1) ** 2
    return float(edges[1:-1][np.nanargmax(between)])


def pixel_noise(image2d: np.ndarray) -> float:
    """Robust per-pixel noise (ADU) of a 2D image from differences of horizontal neighbours."""
    diff = np.diff(image2d, axis=1).ravel()
    diff = diff[np.isfinite(diff)]
    return float(MAD_TO_SIGMA * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def drop_islands(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` (H, W) bool without its connected components (8-neighbour) under ``min_px``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of ``mask``: its pixels with a 4-neighbour outside (the frame edge is not
    a boundary)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def _local_level(image2d: np.ndarray, where: np.ndarray, sigma_px: float) -> np.ndarray:
    """Smooth level map (H, W): Gaussian-weighted mean of ``image2d`` over pixels ``where``
    (normalised convolution; far from any such pixel it takes the nearest ones' level)."""
    # a wide Gaussian is slow at full size: blur block sums (blocks of a quarter sigma) and
    # interpolate back; the level map is smooth on that scale anyway
    b = max(1, int(sigma_px // 4))
    height, width = image2d.shape
    pad = ((0, -height % b), (0, -width % b))
    sums = np.pad(np.where(where, image2d, 0.0), pad).reshape(
        (height + pad[0][1]) // b, b, (width + pad[1][1]) // b, b).sum(axis=(1, 3))
    counts = np.pad(where.astype(np.float64), pad).reshape(sums.shape[0], b, sums.shape[1], b).sum(axis=(1, 3))
    num = ndimage.gaussian_filter(sums, sigma_px / b, mode="nearest")
    den = ndimage.gaussian_filter(counts, sigma_px / b, mode="nearest") / (b * b)
    num /= b * b
    if b > 1:
        yy = (np.arange(height) - (b - 1) / 2) / b
        xx = (np.arange(width) - (b - 1) / 2) / b
        coords = np.meshgrid(yy, xx, indexing="ij")
        num = ndimage.map_coordinates(num, coords, order=1, mode="nearest")
        den = ndimage.map_coordinates(den, coords, order=1, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        level = num / den
    if np.isfinite(level).all() and den.min() > 1e-6:
        return level
    ok = den > 1e-6
    if not ok.any():
        return np.full(image2d.shape, np.median(image2d[where]) if where.any() else 0.0)
    _, (iy, ix) = ndimage.distance_transform_edt(~ok, return_indices=True)
    return np.where(ok, level, level[iy, ix])


def find_sky_mask(median2d: np.ndarray) -> tuple[np.ndarray, dict]:
    """Sky mask of a fixed camera's night from the time-median of its frames' luminance.

    median2d: (H, W) float, ADU, light pollution not removed. Returns (sky (H, W) bool,
    True = sky; info dict: ``contrast_sigma`` (sky minus ground level in noise sigmas),
    ``edge_width_px`` and ``edge_snr`` (medians over the passing components, or over all when
    none passes),
    ``reason`` (why there is no ground, '' when there is), and with ground ``sky_fraction``:
    (H, W) float32 in [0, 1], how much of each pixel's light is sky, from its level between the
    local ground and sky levels (mixed pixels along silhouettes lie between)). See the module
    docstring.
    """
    img = np.asarray(median2d, dtype=np.float64)
    finite = np.isfinite(img)
    if not finite.all():
        img = np.where(finite, img, np.median(img[finite]) if finite.any() else 0.0)
    height, width = img.shape
    all_sky = np.ones(img.shape, dtype=bool)
    noise = max(pixel_noise(img), 1e-6)
    smooth = median_filter(img, 3).astype(np.float64)
    min_px = max(MIN_ISLAND_PX, int(MIN_ISLAND_FRACTION * img.size))
    dark = smooth < otsu_threshold(smooth[::2, ::2].ravel())
    dark = drop_islands(dark, min_px)
    dark = ~drop_islands(~dark, min_px)
    info = {"noise_adu": noise, "contrast_sigma": 0.0, "edge_width_px": None}
    if not dark.any() or dark.all():
        return all_sky, {**info, "reason": "the frame has one level (no darker foreground)"}
    contrast = float(np.median(smooth[~dark]) - np.median(smooth[dark]))
    info["contrast_sigma"] = contrast / noise
    labels, n = ndimage.label(dark, structure=np.ones((3, 3)))
    grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0
    edge = _boundary(dark)
    index = np.arange(1, n + 1)
    # on the edge pixels alone: ndimage.median sorts every pixel it is given
    edge_grad = np.asarray(ndimage.median(grad[edge], labels[edge], index), float)
    noise_grad = max(float(np.median(grad[~dark])), 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        width_px = np.where(edge_grad > 0, contrast / edge_grad, np.inf)
    edge_snr = np.nan_to_num(edge_grad / noise_grad)
    border = np.zeros(n + 1, dtype=bool)
    border[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    sharp = (np.nan_to_num(width_px, nan=np.inf) <= MAX_EDGE_WIDTH_PX) & (edge_snr >= MIN_EDGE_SNR)
    passing = sharp & (info["contrast_sigma"] >= MIN_CONTRAST_SIGMA)
    info["edge_width_px"] = float(np.median(width_px[passing] if passing.any() else width_px))
    info["edge_snr"] = float(np.median(edge_snr[passing] if passing.any() else edge_snr))
    if info["contrast_sigma"] < MIN_CONTRAST_SIGMA:
        return all_sky, {**info, "reason": f"darker class only {info['contrast_sigma']:.1f} "
                                           f"noise sigmas below the sky"}
    if not (passing & border[1:]).any():
        return all_sky, {**info, "reason": "no sharp-edged dark region enters the frame "
                                           "(gradients, nebulae and clouds have soft edges)"}
    keep = np.concatenate([[False], passing])
    ground0 = keep[labels]
    if ground0.mean() > MAX_GROUND_FRACTION:
        return all_sky, {**info, "reason": f"the darker class covers {ground0.mean():.0%} of "
                                           f"the frame: that is sky"}
    # trace the kept ground to the pixel: local midpoint between sky and ground levels
    sigma_px = max(2.0, LEVEL_SMOOTH_FRACTION * min(height, width))
    midpoint = 0.5 * (_local_level(smooth, ~dark, sigma_px) + _local_level(smooth, ground0, sigma_px))
    fine = ndimage.gaussian_filter(img, 0.5, mode="nearest") < midpoint
    labels_f, _ = ndimage.label(fine, structure=np.ones((3, 3)))
    touched = np.unique(labels_f[ground0 & fine])
    ground = np.isin(labels_f, touched[touched > 0]) | (ground0 & ~drop_islands(~fine, min_px))
    sky = drop_islands(~ground, min_px)  # sky seen through small gaps stays with the ground
    sky_level = _local_level(smooth, sky, sigma_px)
    ground_level = _local_level(smooth, ~sky, sigma_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = (img - ground_level) / (sky_level - ground_level)
    fraction = np.clip(np.nan_to_num(fraction, nan=1.0), 0.0, 1.0).astype(np.float32)
    return sky, {**info, "reason": "", "sky_fraction": fraction}


def sky_mask_from_frames(luminances, models=None) -> tuple[np.ndarray, dict]:
    """Automatic sky mask of frames from a fixed camera.

    luminances: sequence of (H, W) float frames (ADU, calibrated). models: optional sequence of
    (binned model (h, w), factor) of the light pollution removed from each, added back first.
    Returns find_sky_mask's (sky, info) of their time-median, with ``n_frames``.
    """
    frames = []
    for k, lum in enumerate(luminances):
        lum = np.asarray(lum, dtype=np.float32)
        if models is not None and models[k] is not None:
            lum = restore_light_pollution(lum, *models[k])
        frames.append(lum)
    if not frames:
        raise NightstackError("no frame to find the sky mask from")
    med = np.median(np.stack(frames), axis=0) if len(frames) > 1 else frames[0]
    sky, info = find_sky_mask(med)
    return sky, {**info, "n_frames": len(frames)}


def frame_sky(luminance2d: np.ndarray, cfg: LandscapeConfig):
    """(sky (H, W) bool, sky fraction (H, W) float32) of one frame before its light pollution
    is removed, or None when it is all sky. The calibration fits the light-pollution model on
    the sky only (a dark foreground would pull it down and leave a bright rim along the
    silhouette) and applies it to the sky only (``sky_model_only``). ``auto`` runs
    find_sky_mask on the frame alone, binned when large (the night's mask comes later)."""
    height, width = luminance2d.shape
    if cfg.ground == "none":
        return None
    fraction = None
    if cfg.ground == "horizon":
        sky = horizon_sky_mask(height, width, cfg.horizon_fraction)
    elif cfg.ground == "auto":
        factor = max(1, round(max(height, width) / FRAME_MASK_MAX_SIDE_PX))
        sky, info = find_sky_mask(bin_mean(luminance2d, factor) if factor > 1 else luminance2d)
        fraction = info.get("sky_fraction")
        if sky.all():
            return None
        if factor > 1:
            sky, fraction = (_unbin(a, factor, height, width) for a in (sky, fraction))
    else:
        sky = read_mask_image(cfg.ground, height, width)
    if sky.all():
        return None
    return sky, (sky.astype(np.float32) if fraction is None else fraction)


def sky_model_only(model: np.ndarray, sky_fraction: np.ndarray) -> np.ndarray:
    """The light-pollution model (C, H, W) as applied to a landscape frame: the fitted model on
    the sky, only its median level on the ground (whose light does not follow the sky's glow;
    a model carried into the ground would differ from frame to frame), mixed pixels in
    proportion to their sky fraction (H, W). float32."""
    level = np.median(model.reshape(len(model), -1), axis=1)[:, None, None]
    return (level + sky_fraction[None] * (model - level)).astype(np.float32)


def _unbin(image2d: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """A block-binned map back to (height, width): blocks repeated, edges padded."""
    up = np.repeat(np.repeat(image2d, factor, 0), factor, 1)
    pad = [(0, max(0, height - up.shape[0])), (0, max(0, width - up.shape[1]))]
    return np.pad(up, pad, mode="edge")[:height, :width]


def bin_mean(image2d: np.ndarray, factor: int) -> np.ndarray:
    """Block mean of (H, W) by ``factor`` (trailing rows/columns that do not fill a block are
    dropped)."""
    h, w = (image2d.shape[0] // factor) * factor, (image2d.shape[1] // factor) * factor
    return image2d[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def mask_frame_indices(n_frames: int, max_frames: int = MAX_MASK_FRAMES) -> np.ndarray:
    """Indices of at most ``max_frames`` frames spread evenly over a night of ``n_frames``."""
    return np.unique(np.linspace(0, n_frames - 1, min(n_frames, max_frames)).round().astype(int))


def star_search_mask(sky: np.ndarray, margin_px: int = STAR_EDGE_MARGIN_PX) -> np.ndarray:
    """Where stars may be detected (H, W) bool: the sky, ``margin_px`` away from the ground
    (a silhouette's edge and sky gaps in foliage look like stars to a blob detector)."""
    sky = np.asarray(sky, dtype=bool)
    if sky.all() or margin_px <= 0:
        return sky.copy()
    return ndimage.binary_erosion(sky, structure=np.ones((3, 3)), iterations=int(margin_px),
                                  border_value=1)


# ---------------------------------------------------------------------------- composition


def sky_taper(distance_px, reach_px: float, taper_px: float) -> np.ndarray:
    """Weight of a sky value by the distance (px) of its source position from the ground: 0
    within the kernel's reach plus SKY_EDGE_MARGIN_PX (the kernel would read ground or mixed
    pixels), rising linearly to 1 over ``taper_px`` (0: a hard cut). Any shape, float32."""
    d = np.asarray(distance_px, dtype=np.float32) - (float(reach_px) + SKY_EDGE_MARGIN_PX)
    if taper_px <= 0:
        return (d > 0).astype(np.float32)
    return np.clip(d / np.float32(taper_px), 0.0, 1.0)


def feather_weight(sky: np.ndarray, feather_px: float, reach_px: float = 0.0) -> np.ndarray:
    """Weight (H, W) float32 of the registered sky in the final image: ``sky_taper`` of each
    pixel's distance from the ground, i.e. 0 on the ground and its first reach + margin px of
    sky, rising to 1 over ``feather_px``. The reference frame's own sky values have exactly
    this weight, so wherever the seam gives the sky any weight, the sky stack has a value."""
    sky = np.asarray(sky, dtype=bool)
    if sky.all():
        return np.ones(sky.shape, dtype=np.float32)
    return sky_taper(ndimage.distance_transform_edt(sky), reach_px, feather_px)


def source_ground(sky: np.ndarray, reach_px: int) -> np.ndarray:
    """Source-frame pixels (H, W) bool an interpolated sky value must not touch: the ground
    grown by the kernel's reach plus SKY_EDGE_MARGIN_PX (mixed pixels along the silhouette)."""
    ground = ~np.asarray(sky, dtype=bool)
    grow = int(reach_px) + SKY_EDGE_MARGIN_PX
    if grow > 0 and ground.any():
        ground = ndimage.binary_dilation(ground, structure=np.ones((3, 3)), iterations=grow)
    return ground


def compose(sky_stack: np.ndarray, ground_stack: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Join the registered sky (C, h, w) and the frozen ground (C, h, w) with weight (h, w) of
    the sky; where the sky stack has no value (NaN) the ground stack is used. float32."""
    w = np.where(np.isfinite(sky_stack), weight[None], 0.0)
    out = w * np.nan_to_num(sky_stack) + (1.0 - w) * ground_stack
    return out.astype(np.float32)


def ground_values(tile: np.ndarray, warp, sky_fraction: np.ndarray) -> np.ndarray:
    """A frozen tile (C, h, w), normalised like the sky (stacking.normalise_tile), with the
    normalisation undone in proportion to how much of each pixel is ground (sky_fraction
    (h, w) in [0, 1]): the sky's level and transparency change from frame to frame (twilight,
    haze), the ground's light does not follow them, and a pixel on a silhouette holds some of
    each. float32."""
    offset = np.asarray(warp.offset, np.float32).reshape(-1, 1, 1)
    scale = np.asarray(warp.scale, np.float32).reshape(-1, 1, 1)
    target = np.asarray(warp.target_level, np.float32).reshape(-1, 1, 1)
    raw = (tile - target) * scale + offset
    return (raw + sky_fraction[None] * (tile - raw)).astype(np.float32)


def kernel_reach_px(interpolation: str) -> int:
    """How far (px) from a sample position the interpolation kernel reads: taps of Lanczos-4
    within 4 px, of Lanczos-3 and cubic within 3 px, of linear within 1 px."""
    return {"linear": 1, "lanczos4": 4}.get(interpolation, 3)


def reference_window(plane: np.ndarray, tile, fill: float) -> np.ndarray:
    """plane[y0:y1, x0:x1] for a tile in reference pixels that may reach beyond the plane
    (``stacking.framing: maximize``); pixels outside take ``fill``."""
    y0, y1, x0, x1 = tile
    height, width = plane.shape
    out = np.full((y1 - y0, x1 - x0), fill, dtype=np.float32)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, height), max(x0, 0), min(x1, width)
    if sy0 < sy1 and sx0 < sx1:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = plane[sy0:sy1, sx0:sx1]
    return out


@dataclass
class LandscapeStack:
    """What the stack step needs to keep a foreground frozen.

    ``sky``: (H, W) bool sky mask on the lights' pixel grid (= the reference's);
    ``feather_px``: seam width, also the taper of each frame's sky values near its ground;
    ``frozen_path``: the reference frame's file, whose pose every frame takes for the frozen
    (unregistered) stack.
    """

    sky: np.ndarray
    feather_px: float
    frozen_path: str
    sky_fraction: np.ndarray | None = None  # (H, W) in [0, 1]; None: the mask itself

    def __post_init__(self):
        self.sky = np.asarray(self.sky, dtype=bool)
        if self.sky_fraction is None or np.shape(self.sky_fraction) != self.sky.shape:
            self.sky_fraction = self.sky.astype(np.float32)
        self._distance = ndimage.distance_transform_edt(self.sky).astype(np.float32)
        self._frozen = None

    def for_warps(self, warps: list) -> LandscapeStack:
        """Check the mask fits the frames; the frozen pose is the reference frame's."""
        cam = warps[0].ref_camera
        if self.sky.shape != (cam.height_px, cam.width_px):
            raise NightstackError(
                f"sky mask is {self.sky.shape[1]}x{self.sky.shape[0]} px but the frames are "
                f"{cam.width_px}x{cam.height_px} px")
        ref = next((w for w in warps if w.path == self.frozen_path), None)
        if ref is None:
            raise NightstackError(f"reference frame {self.frozen_path} is not among the frames "
                                  "to stack: the frozen ground has no pose")
        self._frozen = [dataclasses.replace(w, frame_camera=ref.frame_camera, rotation=ref.rotation)
                        for w in warps]
        return self

    def sky_weights(self, stack: np.ndarray, warps: list, tile, interpolation: str) -> np.ndarray:
        """Per-value weights (N, 1, h, w) float32 of the warped tile stack (N, C, h, w) of tile
        (y0, y1, x0, x1): ``sky_taper`` of the source position's distance from the ground
        (the same fixed mask in every frame). Values of weight 0 are set to NaN in ``stack``, so
        the registered sky is made of sky alone; the taper makes every frame fade in and out
        smoothly, so the changing set of frames near the ground leaves no seams."""
        from .stacking import _frame_coordinates

        y0, y1, x0, x1 = tile
        height, width = self.sky.shape
        reach = kernel_reach_px(interpolation)
        out = np.zeros((len(warps), 1, y1 - y0, x1 - x0), dtype=np.float32)
        for i, warp in enumerate(warps):
            xy, inside = _frame_coordinates(tile, warp, width, height)
            dist = ndimage.map_coordinates(self._distance, [xy[:, 1], xy[:, 0]], order=1,
                                           mode="nearest")
            taper = np.zeros(inside.shape, dtype=np.float32)
            taper[inside] = sky_taper(dist, reach, self.feather_px)
            out[i, 0] = taper.reshape(y1 - y0, x1 - x0)
            stack[i][:, out[i, 0] <= 0] = np.nan
        return out

    def join_ground(self, sky_combined: np.ndarray, warps: list, tile, cfg, weights) -> np.ndarray:
        """The tile's final values (C, h, w): the registered sky joined to the frozen ground
        (every frame at its own sensor position, same rejection and weights) with
        ``feather_weight`` (see ``compose``)."""
        from .stacking import combine_with_rejection, read_warped_tile

        y0, y1, x0, x1 = tile
        reach = kernel_reach_px(cfg.interpolation)
        weight = sky_taper(reference_window(self._distance, tile, np.inf), reach, self.feather_px)
        if weight.min() >= 1.0:
            return sky_combined
        fraction = reference_window(self.sky_fraction, tile, 1.0)
        frozen = np.stack([ground_values(read_warped_tile(w, y0, y1, x0, x1, cfg.interpolation),
                                         w, fraction) for w in self._frozen])
        ground, _, _ = combine_with_rejection(frozen, cfg, weights)
        return compose(sky_combined, ground, weight)
