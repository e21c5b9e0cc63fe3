"""Display stretches: the screen transfer function (auto-stretch) and a plain linear scale.

Images are float arrays (H, W) or (C, H, W) in any linear unit; outputs are float32 in [0, 1].
NaN pixels come out as 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import NightstackError

MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this = its standard deviation
LINEAR_LOW_QUANTILE = 0.001  # the linear TIFF's black point
LOW_TAIL_SAMPLE = 1_000_000  # values sampled to bound the low tail (_low_quantile)
LOW_TAIL_MARGIN = 4  # the bound is the sample's quantile at this many times q


def midtones_transfer(x, m, out=None) -> np.ndarray:
    """Midtones transfer function MTF(m, x) on [0, 1]: 0 -> 0, m -> 0.5, 1 -> 1.

    x: array in [0, 1]; m: midtones balance in (0, 1) (scalar or broadcastable).
    MTF(m, x) = (m - 1) x / ((2m - 1) x - m). float32 input gives float32 output.
    out: optional float array of x's shape to work in (may be x itself); m must then be a
    scalar.
    """
    x = np.asarray(x)
    # float32 images stay float32 and are worked on in place: a 24 MP channel is 96 MB
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    if out is not None and np.ndim(m) != 0:
        raise NightstackError("midtones_transfer: out= needs a scalar m")
    if out is not None:
        y = np.clip(x, 0.0, 1.0, out=out)
    else:
        y = np.clip(x, 0.0, 1.0).astype(dtype, copy=False)
    m = np.asarray(m, dtype=y.dtype)
    denom = y * (2.0 * m - 1.0)
    denom -= m
    with np.errstate(divide="ignore", invalid="ignore"):
        if y.ndim and np.broadcast(y, m).shape == y.shape:
            y *= m - 1.0
            y /= denom
            y[denom == 0] = 0.0
        else:
            y = np.where(denom != 0, (m - 1.0) * y / denom, 0.0).astype(dtype, copy=False)
    return np.clip(y, 0.0, 1.0, out=y) if y.ndim else np.clip(y, 0.0, 1.0)


def _channels(image) -> tuple[np.ndarray, bool]:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        return img[None], True
    if img.ndim == 3:
        return img, False
    raise NightstackError(f"stretch: expected (H, W) or (C, H, W), got shape {img.shape}")


def _median_mad(pixels: np.ndarray) -> tuple[float, float]:
    """Median and normalised MAD of the finite values of ``pixels``."""
    flat = np.ravel(pixels)
    finite = flat[np.isfinite(flat)]  # 1-D mask: no index arrays (2-D ones cost 16 B a pixel)
    if finite.size == 0:
        return 0.0, 0.0
    if finite.size > 4_000_000:  # statistics of a large frame do not need every pixel
        finite = finite[:: finite.size // 2_000_000]
    med = float(np.median(finite))
    return med, MAD_TO_SIGMA * float(np.median(np.abs(finite - med)))


def _stf_channel(x: np.ndarray, median: float, mad: float, shadows_clip_mad, target_median):
    """Apply the STF to one channel already normalised to [0, 1], in place when ``x`` is a
    float32 array (the caller's copy); returns the stretched channel."""
    black = min(max(median + shadows_clip_mad * mad, 0.0), 1.0)
    if black >= 1.0:
        return np.zeros_like(x)
    median_after_clip = (median - black) / (1.0 - black)
    x = np.asarray(x, dtype=np.float32)
    x -= np.float32(black)
    x /= np.float32(1.0 - black)
    if not 0.0 < median_after_clip < 1.0:
        # No sky above the black point (a blank frame): a plain linear ramp is the honest view.
        return np.clip(x, 0.0, 1.0, out=x)
    # MTF is its own inverse in m: choosing m = MTF(target, median) puts the median at target.
    m = float(midtones_transfer(median_after_clip, target_median))
    return midtones_transfer(x, m, out=x)


def autostretch(
    image, shadows_clip_mad: float = -2.8, target_median: float = 0.25, linked: bool = False
) -> np.ndarray:
    """Siril/PixInsight-style screen transfer function; returns float32 in [0, 1], same shape.

    The image is first scaled to [0, 1] by its finite min and max (all channels together).
    Per channel (unless ``linked``): black point = median + shadows_clip_mad * MAD (normalised
    to sigma), then the midtones transfer function that puts the median at ``target_median``.
    Unlinked channels each get their own black point, which neutralises a colour cast of the
    sky; linked channels share the mean of the channel statistics and keep their colour ratios.
    """
    chans, mono = _channels(image)
    out = np.empty(chans.shape, dtype=np.float32)
    for k, channel in enumerate(
        autostretch_channels(image, shadows_clip_mad, target_median, linked)
    ):
        out[k] = channel
    return out[0] if mono else out


def autostretch_channels(
    image, shadows_clip_mad: float = -2.8, target_median: float = 0.25, linked: bool = False
) -> Iterator[np.ndarray]:
    """``autostretch`` one channel at a time.

    Returns an iterator over the channels of ``image`` ((H, W) counts as one channel), each
    float32 (H, W) in [0, 1] with NaN -> 0, made only when reached; a caller converting each
    to 8 bits holds one channel of floats instead of the whole image (a 24 MP colour image:
    96 MB instead of 288).
    """
    if not 0.0 < target_median < 1.0:
        raise NightstackError(f"stretch: target_median must be in (0, 1), got {target_median}")
    chans, _ = _channels(image)
    if not np.isfinite(chans).any():
        return iter([np.zeros(chans.shape[1:], dtype=np.float32) for _ in chans])
    low, high = float(np.nanmin(chans)), float(np.nanmax(chans))

    def normalised(channel):  # one channel at a time: memory of one, not of the whole image
        if not high > low:
            return np.zeros_like(channel)
        scaled = channel - np.float32(low)
        scaled /= np.float32(high - low)
        return scaled

    stats = np.array([_median_mad(normalised(c)) for c in chans])
    if linked:
        stats[:] = stats.mean(axis=0)

    def stretched(k):
        med, mad = stats[k]
        channel = _stf_channel(normalised(chans[k]), med, mad, shadows_clip_mad, target_median)
        channel = channel.astype(np.float32, copy=False)
        return np.fmax(channel, np.float32(0.0), out=channel)  # in [0, 1]: NaN -> 0 only

    return (stretched(k) for k in range(len(chans)))


def linear_scale(image, low=None, high=None):
    """Map [low, high] linearly onto [0, 1] and clip; for the 16-bit linear TIFF.

    image: (H, W) or (C, H, W) float. low: default the 0.001 quantile of the finite pixels (all
    channels together, so colour ratios survive); high: default their maximum.
    Returns (scaled float32 in [0, 1] with NaN -> 0, low, high), low and high in the image unit.
    """
    img = np.asarray(image, dtype=np.float32)
    low, high = linear_limits(img, low, high)
    return scale_to_unit(img, low, high), low, high


def linear_limits(image, low=None, high=None) -> tuple[float, float]:
    """The (low, high) of ``linear_scale``, in the image unit: defaults the 0.001 quantile and
    the maximum of the finite pixels of all channels together; high > low always."""
    img = np.asarray(image, dtype=np.float32)
    if low is None or high is None:
        planes = img.reshape(-1, *img.shape[-2:]) if img.ndim >= 2 else img.reshape(1, 1, -1)
        n_finite, finite_max = 0, -np.inf
        for plane in planes:  # a plane at a time: no mask or copy of the whole image
            finite = np.isfinite(plane)
            n_finite += int(np.count_nonzero(finite))
            if finite.any():
                finite_max = max(finite_max, float(plane.max(where=finite, initial=-np.inf)))
        if n_finite == 0:
            raise NightstackError("stretch: image has no finite pixels")
        high = finite_max if high is None else float(high)
        low = _low_quantile(planes, n_finite, LINEAR_LOW_QUANTILE) if low is None else float(low)
    low, high = float(low), float(high)
    if not high > low:
        high = low + 1.0  # a flat image: any non-empty range maps it to 0
    return low, high


def scale_to_unit(image, low: float, high: float) -> np.ndarray:
    """(image - low) / (high - low) clipped to [0, 1], float32, NaN -> 0 (any shape)."""
    scaled = np.asarray(image, dtype=np.float32) - np.float32(low)  # one float32 copy
    scaled /= np.float32(high - low)
    # min then fmax: clipped to [0, 1] with NaN -> 0 in two passes and no mask (nan_to_num
    # builds three: 110 MB on a 24 MP channel)
    np.minimum(scaled, np.float32(1.0), out=scaled)
    return np.fmax(scaled, np.float32(0.0), out=scaled)


def _low_quantile(planes: np.ndarray, n_finite: int, q: float) -> float:
    """np.quantile of the finite values of ``planes`` (P, H, W) at a small ``q``, exactly, from
    the low tail alone: the values at or below a bound taken from a subsample hold every rank
    the quantile needs (else, rarely, all finite values are used). A 24 MP colour stack: 1 MB
    of candidates instead of a 288 MB copy."""
    flat = planes.reshape(-1)
    step = max(1, flat.size // LOW_TAIL_SAMPLE)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    above = min(int(np.floor(q * (n_finite - 1))) + 1, n_finite - 1)
    if sample.size:
        # + 1e-4: a few more candidates where q is so small that the margin alone takes none
        bound = np.float32(np.quantile(sample, min(1.0, LOW_TAIL_MARGIN * q + 1e-4)))
        tail = np.concatenate([plane[(plane <= bound) & np.isfinite(plane)] for plane in planes])
        if tail.size > above:  # the tail holds the values of both ranks the quantile reads
            return _quantile_ranks(tail, n_finite, q)
    return _quantile_ranks(flat[np.isfinite(flat)], n_finite, q)


def _quantile_ranks(smallest: np.ndarray, n_values: int, q: float) -> float:
    """np.quantile(values, q) (linear interpolation) of ``n_values`` values, given the
    smallest of them (at least the ranks the quantile reads); ``smallest`` is partitioned in
    place."""
    position = q * (n_values - 1)
    below = int(np.floor(position))
    above = min(below + 1, n_values - 1)
    smallest.partition([below, above])
    return float(smallest[below] + (position - below) * (smallest[above] - smallest[below]))
