"""Background noise of a stack as frames are added: the report's measured noise curve.

The stacker (``nightstack.stacking.stack_frames``) hands over the warped, normalised values
(N, C, h, w) it already holds for the tiles that cover the central region of the stack
(``probe_boxes``), so the curve costs no extra pass over the frames and no memory beyond one
tile's stack. For k = 1..N (``curve_frame_counts``: all k, or a log-spaced subset that always
holds 1 and N) it measures the noise of the weighted mean of the first k frames in time order.

Noise is measured the same way for every k, on the same pixels:

* pixels covered by every frame only (so each k averages exactly k values);
* stars masked: pixels more than ``STAR_SIGMA`` robust sigmas above the large-scale background
  in any channel of the mean of all N frames (the deepest, so faint stars are masked too),
  dilated by ``STAR_DILATE_PX``;
* the sky's structure removed: the large-scale background of that deepest mean (medians of
  its sky pixels in blocks of ``BLOCK_PX``, linearly interpolated between block centres) is
  subtracted from every k's mean, and then the k-mean's own residual background in coarser
  blocks of ``RESIDUAL_BLOCK_PX`` (gradients that differ from frame to frame);
* noise = robust sigma 1.4826 x MAD of the remaining sky pixels, per channel; channels (and
  probe regions, weighted by their sky pixel counts) are pooled as a root mean square.

Tested on synthetic frames with a gradient, a nebula and stars: the curve is within 10 % of
sigma / sqrt(k) (tests/test_noise.py).

Values are in the unit of the stack (ADU on the reference frame's flux scale).
"""

from __future__ import annotations

import numpy as np
from astropy.stats import mad_std
from scipy import ndimage

NOISE_CURVE_MAX_POINTS = 20  # more frames than this: a log-spaced subset of frame counts
PROBE_SIDE_PX = 512  # the curve is measured in the central PROBE_SIDE_PX square of the stack
MIN_PROBE_SIDE_PX = 16  # a tile's part of the probe region narrower than this is left out
BLOCK_PX = 8  # block of the sky's structure, from the deepest mean (px)
RESIDUAL_BLOCK_PX = 64  # block of each k-mean's own residual background (px)
MIN_BLOCK_PX = 8  # small probe regions use blocks of a quarter of their side, down to this
MIN_BLOCK_SKY_FRACTION = 0.25  # a block with less sky takes its nearest neighbour's level
FILL_ROUNDS = 2  # masked pixels filled with the background model, block medians taken again
STAR_SIGMA = 3.0  # pixels this many sigmas above the background are stars (not sky)
STAR_DILATE_PX = 2  # star mask grown by this many pixels (halos)
MIN_SKY_PX = 64  # fewer sky pixels than this in a region: it is not measured


def curve_frame_counts(n_frames: int, max_points: int = NOISE_CURVE_MAX_POINTS) -> np.ndarray:
    """Frame counts k at which the curve is measured: 1..N, or about ``max_points`` log-spaced
    values (always 1 and N) when N is larger. Returns int array, increasing."""
    if n_frames <= max_points:
        return np.arange(1, n_frames + 1)
    return np.unique(np.round(np.geomspace(1, n_frames, max_points)).astype(int))


def probe_boxes(tiles, height: int, width: int, side_px: int = PROBE_SIDE_PX) -> dict:
    """Where each stack tile meets the central ``side_px`` square of a (height, width) stack.

    tiles: iterable of (y0, y1, x0, x1). Returns {tile: (y0, y1, x0, x1) of the intersection,
    absolute pixels}; parts narrower than MIN_PROBE_SIDE_PX on either side are left out.
    """
    cy0 = max((height - side_px) // 2, 0)
    cx0 = max((width - side_px) // 2, 0)
    cy1, cx1 = min(cy0 + side_px, height), min(cx0 + side_px, width)
    boxes = {}
    for tile in tiles:
        y0, y1, x0, x1 = (int(v) for v in tile)
        box = (max(y0, cy0), min(y1, cy1), max(x0, cx0), min(x1, cx1))
        if min(box[1] - box[0], box[3] - box[2]) >= MIN_PROBE_SIDE_PX:
            boxes[(y0, y1, x0, x1)] = box
    return boxes


def robust_sigma(values) -> float:
    """1.4826 x median absolute deviation of ``values`` (any shape); NaN if empty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(mad_std(v)) if v.size else float("nan")


def _block_px(shape, largest_px: int = BLOCK_PX) -> int:
    """Background block side (px) for a region: largest_px, or a quarter of a small region."""
    return int(np.clip(min(shape) // 4, MIN_BLOCK_PX, largest_px))


def _interp_index(n_px: int, block_px: int):
    """Linear interpolation between the centres of block_px blocks (the last one maybe
    partial), extrapolated beyond the outer centres: (j0 (n_px,) int, frac (n_px,) float) so
    that a pixel's value is (1 - frac) * v[j0] + frac * v[j0 + 1]."""
    starts = np.arange(0, n_px, block_px)
    if len(starts) == 1:
        return np.zeros(n_px, dtype=int), np.zeros(n_px)
    centres = 0.5 * (starts + np.minimum(starts + block_px, n_px)) - 0.5
    pos = np.arange(n_px, dtype=np.float64)
    j0 = np.clip(np.searchsorted(centres, pos) - 1, 0, len(starts) - 2)
    return j0, (pos - centres[j0]) / (centres[j0 + 1] - centres[j0])


def _interpolate_blocks(values, shape, block_px: int) -> np.ndarray:
    """Block values (ny, nx) linearly interpolated to every pixel of ``shape`` (h, w): float32."""
    jy, fy = _interp_index(shape[0], block_px)
    jx, fx = _interp_index(shape[1], block_px)
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] > 1:
        v = (1 - fy)[:, None] * v[jy] + fy[:, None] * v[jy + 1]
    else:
        v = np.repeat(v, shape[0], axis=0)
    if v.shape[1] > 1:
        v = (1 - fx) * v[:, jx] + fx * v[:, jx + 1]
    else:
        v = np.repeat(v, shape[1], axis=1)
    return v.astype(np.float32)


def _block_medians(image2d, block_px: int):
    """Medians (ny, nx) of the finite pixels of block_px blocks (the last ones maybe partial)
    and the number of finite pixels (ny, nx) of each; NaN median where a block has none."""
    h, w = image2d.shape
    ny, nx = -(-h // block_px), -(-w // block_px)
    padded = np.full((ny * block_px, nx * block_px), np.nan, dtype=np.float32)
    padded[:h, :w] = image2d
    blocks = padded.reshape(ny, block_px, nx, block_px).transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    blocks.sort(axis=2)  # NaN last: the finite values of a block are its first n
    n = np.isfinite(blocks).sum(axis=2)
    lo = np.take_along_axis(blocks, np.maximum(n - 1, 0)[..., None] // 2, axis=2)[..., 0]
    hi = np.take_along_axis(blocks, (n // 2)[..., None], axis=2)[..., 0]
    return np.where(n > 0, 0.5 * (lo.astype(np.float64) + hi), np.nan), n


def large_scale_background(image2d, sky, block_px: int = BLOCK_PX) -> np.ndarray:
    """Smooth background (h, w) float32 of image2d: sky-pixel medians of block_px blocks,
    linearly interpolated between block centres (separably; extrapolated at the borders).

    sky: (h, w) bool, True = usable background pixel. Blocks under MIN_BLOCK_SKY_FRACTION sky
    take the median of the nearest block that has enough. The sky pixels of a masked block are
    off its centre, which biases its median on a slope; so the masked pixels are then filled
    with the model and the medians taken again (FILL_ROUNDS times). Same unit as the image.
    """
    img = np.asarray(image2d, dtype=np.float32)
    sky = np.asarray(sky, dtype=bool)
    h, w = img.shape
    medians, n_sky = _block_medians(np.where(sky, img, np.nan), block_px)
    starts_y, starts_x = np.arange(0, h, block_px), np.arange(0, w, block_px)
    block_size = np.outer(np.minimum(starts_y + block_px, h) - starts_y,
                          np.minimum(starts_x + block_px, w) - starts_x)
    empty = n_sky < MIN_BLOCK_SKY_FRACTION * block_size
    if empty.all():
        return np.full_like(img, np.median(img[sky]) if sky.any() else 0.0)
    model = _interpolate_blocks(_from_nearest(medians, empty), (h, w), block_px)
    for _ in range(FILL_ROUNDS):
        medians, _ = _block_medians(np.where(sky, img, model), block_px)
        model = _interpolate_blocks(_from_nearest(medians, empty), (h, w), block_px)
    return model


def _from_nearest(values, empty) -> np.ndarray:
    """values (ny, nx) with each ``empty`` cell replaced by its nearest non-empty cell's value."""
    if not empty.any():
        return values
    nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
    return values[tuple(nearest)]


def sky_mask(image, usable, block_px: int | None = None) -> np.ndarray:
    """True (h, w) on sky pixels of image (C, h, w): usable and not near a star in any channel.

    Stars are pixels more than STAR_SIGMA robust sigmas above the large-scale background,
    grown by STAR_DILATE_PX; the background is fitted twice, the second time without them.
    """
    image = np.asarray(image, dtype=np.float32)
    usable = np.asarray(usable, dtype=bool)
    block_px = block_px or _block_px(usable.shape)
    sky = usable.copy()
    for _ in range(2):
        bright = np.zeros_like(usable)
        for channel in image:
            resid = channel - large_scale_background(channel, sky, block_px)
            bright |= resid > STAR_SIGMA * robust_sigma(resid[sky])
        grown = ndimage.binary_dilation(bright, structure=np.ones((3, 3), bool),
                                        iterations=STAR_DILATE_PX)
        sky = usable & ~grown
    return sky


def channel_noise_adu(image, sky, block_px: int | None = None) -> np.ndarray:
    """Robust sigma (C,) of each channel of image (C, h, w) on the sky pixels (h, w) after the
    large-scale background (blocks of block_px, default RESIDUAL_BLOCK_PX) is removed; same
    unit as the image."""
    image = np.asarray(image, dtype=np.float32)
    block_px = block_px or _block_px(sky.shape, RESIDUAL_BLOCK_PX)
    return np.array([robust_sigma((ch - large_scale_background(ch, sky, block_px))[sky])
                     for ch in image])


def growing_mean_noise(values, order, counts, weights=None, combined=None):
    """Noise of the weighted mean of the first k frames, for every k in ``counts``.

    values: (N, C, h, w) frame values of one region on the stack grid, NaN = not covered.
    order: frame indices in time order (N,). counts: frame counts k (increasing, <= N).
    weights: (N,) frame weights of the mean, None = equal. combined: optional (C, h, w) final
    stack of the region, measured on the same pixels.
    Returns None when the region has under MIN_SKY_PX sky pixels covered by every frame, else
    {"noise_adu": (K, C), "stack_noise_adu": (C,) or None, "n_sky_px": int}.
    """
    values = np.asarray(values)
    order = np.asarray(order, dtype=int)
    weights = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    covered = np.ones(values.shape[2:], dtype=bool)
    total = np.zeros(values.shape[1:], dtype=np.float64)
    for i in order:  # frame by frame: no (N, C, h, w) temporary
        covered &= np.isfinite(values[i]).all(axis=0)
        total += weights[i] * np.nan_to_num(values[i])
    if covered.sum() < MIN_SKY_PX:
        return None
    deepest = total / weights[order].sum()
    block_px = _block_px(covered.shape)
    sky = sky_mask(deepest, covered, block_px)
    if sky.sum() < MIN_SKY_PX:
        return None
    structure = np.stack([large_scale_background(ch, sky, block_px) for ch in deepest])
    wanted = {int(k) for k in counts}
    noise, running, weight_sum = [], np.zeros_like(total), 0.0
    for k, i in enumerate(order, start=1):
        running += weights[i] * np.nan_to_num(values[i])
        weight_sum += weights[i]
        if k in wanted:
            noise.append(channel_noise_adu(running / weight_sum - structure, sky))
    stack_noise = None if combined is None else channel_noise_adu(combined - structure, sky)
    return {"noise_adu": np.array(noise), "stack_noise_adu": stack_noise,
            "n_sky_px": int(sky.sum())}


def pool_region_noise(results) -> dict | None:
    """Pool the growing_mean_noise results of several regions into one curve.

    Per channel, the variance is averaged over regions weighted by their sky pixel counts; the
    channels are then pooled as a root mean square. Returns {"noise_adu": (K,),
    "stack_noise_adu": float or None, "n_sky_px": int}, or None if no region was measured.
    """
    results = [r for r in results if r is not None]
    if not results:
        return None
    n_px = np.array([r["n_sky_px"] for r in results], dtype=np.float64)

    def pooled(arrays):
        var = np.tensordot(n_px, np.square(np.stack(arrays)), axes=1) / n_px.sum()
        return np.sqrt(var.mean(axis=-1))  # RMS over channels

    finals = [r["stack_noise_adu"] for r in results]
    return {
        "noise_adu": pooled([r["noise_adu"] for r in results]),
        "stack_noise_adu": None if any(f is None for f in finals) else float(pooled(finals)),
        "n_sky_px": int(n_px.sum()),
    }
