"""Master calibration frames, bad-pixel repair, calibration of one light, and demosaicing.

All calibration happens on the raw mosaic (CFA or mono, ADU) before demosaicing:

    light - bias (or camera black level) - dark current (scaled by exposure) -> / flat
    -> repair hot (master dark), cold (flat) and per-frame outlier pixels, NaN/inf
    -> demosaic (Malvar-He-Cutler 2004) -> (3, H, W); mono stays (1, H, W).

A CFA pattern is the 4-letter colour string of the top-left 2x2 cell ("RGGB", ...).
"Same-colour neighbours" are 2 pixels away in a Bayer mosaic and 1 pixel away in mono data.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import FrameError, NightstackError
from .filters import convolve, nonzero_2d
from .loading import BAYER_PATTERNS, RawFrame
from .robust import nanmedian_axis0, nanmedian_last_axis, nanmedian_rows

MASTER_KINDS = ("bias", "dark", "flat", "darkflat")
DEFAULT_CONFIG = {
    "hot_sigma": 8.0,
    "cold_threshold": 0.5,
    "outlier_sigma": 10.0,
    "repair_outliers": True,
    "dark_temperature_tolerance_c": 2.0,
}
# dark current roughly doubles every ~6 degC; at least this many hot pixels are needed to
# measure how a dark of another temperature scales onto a light
MIN_HOT_PIXELS_FOR_SCALE = 20
MAD_TO_SIGMA = 1.4826
# A lone spike must be at least this many times further above the background than its
# brightest immediate neighbour; a star core shares its light with its neighbours.
OUTLIER_PEAK_RATIO = 4.0
# Undersampled bright stars (FWHM ~1.5 px) reach peak/neighbour ratios of 5-9, so once the
# neighbour itself is clearly above the noise the spike must stand out by this much more.
OUTLIER_BRIGHT_PEAK_RATIO = 10.0
OUTLIER_NEIGHBOUR_NOISE_SIGMAS = 5.0
COMBINE_BAND_BYTES = 32 * 1024 * 1024
BACKGROUND_BLOCK_PX = 16
# rows per band of the ring median/maximum and spike search (keeps temporaries in cache;
# even, so every band starts on the same CFA row phase)
RING_BAND_ROWS = 64


# =========================================================================== data classes


@dataclass
class Master:
    """A combined calibration frame.

    ``data`` is float32 with the shape of the light mosaic. Bias, dark and darkflat masters
    are in raw ADU, offset included (a dark still contains the bias). A flat is offset-
    subtracted and normalised so each CFA colour's median is 1; ``bad_pixels`` lists the
    pixels whose flat response was zero, negative or NaN (set to 1 in ``data``).
    """

    kind: str
    data: np.ndarray
    cfa_pattern: str | None
    exptime_s: float | None
    n_frames: int
    temperature_c: float | None
    bad_pixels: np.ndarray | None = None
    # bad-pixel masks found by the master step (with_pixel_masks), by hot_mask_key/cold_mask_key
    pixel_masks: dict = field(default_factory=dict, repr=False, compare=False)
    _mask_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def cached_mask(self, key, compute) -> np.ndarray:
        """Compute a bad-pixel mask derived from this master once per ``key``."""
        if key not in self._mask_cache:
            self._mask_cache[key] = compute()
        return self._mask_cache[key]


@dataclass
class CalibratedFrame:
    """A calibrated, demosaiced light: float32 (3, H, W) colour or (1, H, W) mono."""

    data: np.ndarray
    notes: list[str]
    n_repaired: int
    meta: dict


# =========================================================================== CFA helpers


def _check_pattern(cfa_pattern: str | None) -> str | None:
    if cfa_pattern is None:
        return None
    pattern = str(cfa_pattern).strip().upper()
    if pattern not in BAYER_PATTERNS:
        raise NightstackError(
            f"unsupported CFA pattern {cfa_pattern!r} (use RGGB, BGGR, GRBG or GBRG)"
        )
    return pattern


def colour_planes(shape, cfa_pattern) -> list[tuple[str, tuple]]:
    """(colour letter, index) for each same-colour sub-image of an image of ``shape``.

    A Bayer mosaic gives its four 2x2 phases ("G" twice); mono (H, W) gives one plane "L";
    colour (C, H, W) gives one plane per channel ("R", "G", "B").
    """
    pattern = _check_pattern(cfa_pattern)
    if len(shape) == 3:
        return [("RGB"[c] if shape[0] == 3 else str(c), (c, Ellipsis)) for c in range(shape[0])]
    if pattern is None:
        return [("L", (Ellipsis,))]
    return [
        (pattern[2 * dy + dx], (slice(dy, None, 2), slice(dx, None, 2)))
        for dy in range(2)
        for dx in range(2)
    ]


def _same_colour_step(cfa_pattern) -> int:
    return 2 if cfa_pattern is not None else 1


def _size_text(shape) -> str:
    """'WxH' (FITS NAXIS1 x NAXIS2 order), with the plane count for colour data."""
    text = f"{shape[-1]}x{shape[-2]}"
    return f"{text}x{shape[0]}" if len(shape) == 3 else text


# =========================================================================== robust statistics


def _abs_deviation(band: np.ndarray, centre: np.ndarray) -> np.ndarray:
    deviation = band - centre
    return np.abs(deviation, out=deviation)


def _clipped_mean_band(band: np.ndarray, sigma: float, iterations: int) -> np.ndarray:
    """Sigma-clipped mean along axis 0 of a float32 (N, M) band (rejected values set to NaN
    in place). Centre is the median; spread is 1.4826 * MAD, or the standard deviation where
    the MAD is 0 (quantised data with few frames). At most two band-sized temporaries live
    at once.
    """
    for _ in range(iterations):
        centre = nanmedian_axis0(band)
        spread = MAD_TO_SIGMA * nanmedian_axis0(_abs_deviation(band, centre), overwrite=True)
        flat_spots = ~(spread > 0)
        if np.any(flat_spots):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                spread[flat_spots] = np.nanstd(band[:, flat_spots], axis=0)
        reject = _abs_deviation(band, centre) > sigma * spread
        if not reject.any():
            break
        band[reject] = np.nan
    return _nanmean_axis0_destructive(band)


def _nanmean_axis0_destructive(band: np.ndarray) -> np.ndarray:
    """Mean along axis 0 ignoring NaN, zeroing the NaN of ``band`` in place (no copy)."""
    missing = np.isnan(band)
    n_valid = band.shape[0] - np.count_nonzero(missing, axis=0)
    band[missing] = 0.0
    total = band.sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / n_valid).astype(np.float32)


class DiskFrame:
    """A float32 frame parked in a raw file of ``folder`` and read back band by band.

    robust_combine reads frames in bands of pixels; with the frames on disk a master needs the
    memory of a band, not of N frames (8 darks of 24 MP held 0.8 GB). Bands are read with
    np.fromfile, so the file's pages are not mapped into the process (a memory map's touched
    pages would add up to the whole file again).
    """

    def __init__(self, array: np.ndarray, folder):
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.shape, self.folder = tuple(array.shape), Path(folder)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".f32", delete=False) as handle:
            array.tofile(handle)
        self.path = Path(handle.name)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def reshape(self, *shape):
        """Only the flat view robust_combine asks for (-1): bands index the flat pixels."""
        if shape not in ((-1,), ((-1,),), (self.size,)):
            raise NightstackError(f"DiskFrame reshapes only to one dimension, not {shape}")
        return self

    def __getitem__(self, band: slice) -> np.ndarray:
        start, stop, step = band.indices(self.size)
        if step != 1:
            raise NightstackError("DiskFrame reads contiguous bands only")
        return np.fromfile(self.path, dtype=np.float32, count=stop - start, offset=4 * start)

    def read(self) -> np.ndarray:
        """The whole frame, (shape) float32."""
        return np.fromfile(self.path, dtype=np.float32).reshape(self.shape)

    def astype(self, dtype, copy=True):
        return self.read().astype(dtype, copy=False)


def robust_combine(stack, sigma: float = 3.0, iterations: int = 3) -> np.ndarray:
    """Sigma-clipped mean along axis 0 of N equal-shape frames -> float32 array of one frame.

    ``stack`` is an (N, ...) array or a sequence of N equal-shape arrays (e.g. memory maps),
    so callers need not hold one big copy. Work runs in bands of pixels so the extra memory
    stays within a few times one band (~32 MB) whatever N and the frame size. NaN inputs
    are ignored; a pixel NaN in every frame stays NaN.
    """
    if not isinstance(stack, np.ndarray):
        frames = [f if isinstance(f, DiskFrame) else np.asarray(f) for f in stack]
    else:
        frames = stack
    n_frames = len(frames)
    if n_frames == 0:
        raise NightstackError("robust_combine needs at least one frame")
    shape = tuple(frames[0].shape)
    if any(tuple(f.shape) != shape for f in frames):
        raise NightstackError("robust_combine: frames differ in shape")
    flat_views = [f.reshape(-1) for f in frames]
    n_pixels = flat_views[0].size
    result = np.empty(n_pixels, dtype=np.float32)
    band_px = max(1024, COMBINE_BAND_BYTES // (4 * n_frames))
    for start in range(0, n_pixels, band_px):
        stop = min(start + band_px, n_pixels)
        band = np.empty((n_frames, stop - start), dtype=np.float32)
        for i, view in enumerate(flat_views):
            band[i] = view[start:stop]
        if n_frames >= 3:
            result[start:stop] = _clipped_mean_band(band, sigma, iterations)
        else:  # too few frames to tell an outlier from the rest
            result[start:stop] = _nanmean_axis0_destructive(band)
    return result.reshape(shape)


def _robust_sigma(values: np.ndarray) -> float:
    """1.4826 * MAD of the finite values, falling back to their std when the MAD is 0."""
    return _median_and_sigma(values)[1]


def _median_and_sigma(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of the finite values; sigma falls back to their std when the
    MAD is 0; (nan, 0.0) when none is finite.

    Works on one copy of the finite values, partially sorted in place twice (the median,
    then the median of the absolute deviations), so no other full-size temporary is made.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), 0.0
    centre = np.median(finite, overwrite_input=True)
    deviation = np.abs(np.subtract(finite, centre, out=finite), out=finite)
    mad = float(np.median(deviation, overwrite_input=True))
    if mad > 0:
        return float(centre), MAD_TO_SIGMA * mad
    return float(centre), float(np.std(values[np.isfinite(values)]))


def _block_background(plane: np.ndarray, block: int = BACKGROUND_BLOCK_PX) -> np.ndarray:
    """Smooth background of a 2D plane: medians of block x block tiles, bilinearly upsampled.

    Follows gradients, vignetting and amp glow while ignoring single pixels and small stars.
    """
    height, width = plane.shape
    block = max(1, min(block, height, width))
    n_y, n_x = height // block, width // block
    tiles = plane[: n_y * block, : n_x * block].reshape(n_y, block, n_x, block)
    # one contiguous row of block*block values per tile, sorted to find its median
    tiles = np.array(tiles.transpose(0, 2, 1, 3), copy=True).reshape(n_y, n_x, block * block)
    grid = nanmedian_last_axis(tiles)
    del tiles
    known = np.isfinite(grid)
    if not known.all():  # tiles without a single usable pixel take the overall level
        grid = np.where(known, grid, np.median(grid[known]) if known.any() else 0.0)
    return _upsample_bilinear(grid, (height, width), block).astype(np.float32, copy=False)


def _bilinear_matrix(n_out: int, n_grid: int, block: int) -> np.ndarray:
    """(n_out, n_grid) float32 weights: row i interpolates pixel i from the tile centres."""
    pos = np.clip((np.arange(n_out) + 0.5) / block - 0.5, 0, n_grid - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_grid - 1)
    frac = pos - i0
    weights = np.zeros((n_out, n_grid), dtype=np.float64)
    np.add.at(weights, (np.arange(n_out), i0), 1 - frac)
    np.add.at(weights, (np.arange(n_out), i1), frac)
    return weights.astype(np.float32)


def _upsample_bilinear(grid: np.ndarray, shape, block: int) -> np.ndarray:
    """Bilinear interpolation of tile centres (tile i covers pixels i*block..) to ``shape``.

    Written as two small matrix products (rows, then columns): the same numbers as indexing
    the grid per pixel, at a fraction of the cost on large frames. Returns float32.
    """
    rows = _bilinear_matrix(shape[0], grid.shape[0], block) @ np.asarray(grid, np.float32)
    return rows @ _bilinear_matrix(shape[1], grid.shape[1], block).T


# =========================================================================== masters


def _frame_temperature(frame: RawFrame) -> float | None:
    value = frame.header.get("temperature_c") if frame.header else None
    return float(value) if value is not None else None


def _check_same_geometry(frames: list[RawFrame], kind: str) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if frame.data.shape != first.data.shape:
            raise NightstackError(
                f"master {kind}: {frame.source} is {_size_text(frame.data.shape)} but "
                f"{first.source} is {_size_text(first.data.shape)}"
            )
        if frame.cfa_pattern != first.cfa_pattern:
            raise NightstackError(
                f"master {kind}: {frame.source} has CFA pattern {frame.cfa_pattern} but "
                f"{first.source} has {first.cfa_pattern}"
            )


def _median_or_none(values) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.median(known)) if known else None


def make_master(frames: list[RawFrame], kind: str, bias: Master | None = None,
                dark: Master | None = None) -> Master:  # fmt: skip
    """Combine raw calibration frames into a :class:`Master` (sigma-clipped mean).

    ``kind`` is "bias", "dark", "darkflat" or "flat". Bias, dark and darkflat masters keep
    the raw offset (dark current is taken as dark - bias at calibration time). A flat has
    ``dark`` (a darkflat, or a dark of the flats' exposure) subtracted, else ``bias``, else
    the camera black level; each flat is scaled to median 1 before combining, and the result
    is normalised per CFA colour (each colour's median -> 1) so it corrects vignetting and
    dust but leaves colour balance alone. Zero, negative or NaN flat pixels become 1 and are
    listed in ``bad_pixels``.
    """
    if kind not in MASTER_KINDS:
        raise NightstackError(
            f"unknown master kind {kind!r} (use one of {', '.join(MASTER_KINDS)})"
        )
    if not frames:
        raise NightstackError(f"master {kind}: no frames given")
    _check_same_geometry(frames, kind)
    first = frames[0]
    for master in (bias, dark):
        if master is not None:
            _check_master_fits(first.source, first.data.shape, first.cfa_pattern, master)
    if kind == "flat":
        data, bad = _combine_flats(frames, bias, dark)
    else:
        data, bad = robust_combine([f.data for f in frames]), None
    return Master(
        kind=kind,
        data=data.astype(np.float32, copy=False),
        cfa_pattern=first.cfa_pattern,
        exptime_s=_median_or_none(f.exptime_s for f in frames),
        n_frames=len(frames),
        temperature_c=_median_or_none(_frame_temperature(f) for f in frames),
        bad_pixels=bad,
    )


def _flat_offset(frame: RawFrame, bias: Master | None, dark: Master | None):
    if dark is not None:
        return dark.data
    if bias is not None:
        return bias.data
    return np.float32(frame.black_level)


def _normalised_flat_frames(frames, bias, dark):
    """Offset-subtracted flats scaled to median 1, generated one at a time."""
    for frame in frames:
        signal = frame.data.astype(np.float32) - _flat_offset(frame, bias, dark)
        level = float(np.nanmedian(signal))
        if not level > 0:
            raise NightstackError(
                f"master flat: {frame.source} has no signal above the offset "
                f"(median {level:.3g} ADU)"
            )
        yield signal / np.float32(level)


def _combine_flats(frames, bias, dark) -> tuple[np.ndarray, np.ndarray]:
    normalised = [
        DiskFrame(flat, frame.data.folder) if isinstance(frame.data, DiskFrame) else flat
        for frame, flat in zip(frames, _normalised_flat_frames(frames, bias, dark))
    ]
    combined = robust_combine(normalised)
    return normalise_flat(combined, frames[0].cfa_pattern)


def normalise_flat(flat: np.ndarray, cfa_pattern) -> tuple[np.ndarray, np.ndarray]:
    """Scale each CFA colour of ``flat`` to median 1; bad (<=0, NaN) pixels -> 1.

    Returns (normalised float32 flat, bool mask of the pixels that were bad).
    """
    flat = np.array(flat, dtype=np.float32)
    bad = ~(flat > 0)  # also catches NaN
    flat[bad] = np.nan
    planes = colour_planes(flat.shape, cfa_pattern)
    for colour in dict.fromkeys(letter for letter, _ in planes):
        same = [index for letter, index in planes if letter == colour]
        values = np.concatenate([flat[index].ravel() for index in same])
        level = float(np.nanmedian(values)) if np.isfinite(values).any() else np.nan
        if not level > 0:
            raise NightstackError(f"master flat: colour {colour} has no positive signal")
        for letter, index in planes:
            if letter == colour:
                flat[index] /= np.float32(level)
    flat[bad] = 1.0
    return flat, bad


def master_to_fits_header(master: Master) -> dict:
    """FITS header cards describing ``master`` (for nightstack.io.write_fits_image)."""
    header = {
        "IMAGETYP": f"Master {master.kind.capitalize()}",
        "NSKIND": master.kind,
        "NCOMBINE": int(master.n_frames),
    }
    if master.cfa_pattern:
        header["BAYERPAT"] = master.cfa_pattern
    if master.exptime_s is not None:
        header["EXPTIME"] = float(master.exptime_s)
    if master.temperature_c is not None:
        header["CCD-TEMP"] = float(master.temperature_c)
    if master.bad_pixels is not None:
        header["NBADPIX"] = int(np.count_nonzero(master.bad_pixels))
    return header


def write_master(path, master: Master) -> None:
    """Write ``master`` as FITS: data in the primary HDU, bad pixels (if any) in HDU 'BADPIX'."""
    from astropy.io import fits

    from .io import write_fits_image

    extra = []
    if master.bad_pixels is not None and master.bad_pixels.any():
        extra.append(fits.ImageHDU(master.bad_pixels.astype(np.uint8), name="BADPIX"))
    for key, mask in master.pixel_masks.items():
        extra.append(_pixel_mask_hdu(key, mask))
    write_fits_image(path, master.data, master_to_fits_header(master), extra_hdus=extra)


PIXEL_MASK_HDU = "PIXMASK"


def _pixel_mask_hdu(key: tuple, mask: np.ndarray):
    """One stored bad-pixel mask as an extension: the flat indices (int64) of its pixels."""
    from astropy.io import fits

    hdu = fits.ImageHDU(np.flatnonzero(mask).astype(np.int64), name=PIXEL_MASK_HDU)
    kind, value = key[0], key[1]
    hdu.header["MASKKIND"] = (kind, "hot (from the dark) or cold (from the flat)")
    hdu.header["MASKPAR"] = (value, "hot_sigma or cold_threshold it was found with")
    if kind == "hot":
        hdu.header["WITHBIAS"] = (key[2], "found on dark - bias")
    hdu.header["NPIX"] = int(np.count_nonzero(mask))
    return hdu


def _read_pixel_masks(hdul, shape) -> dict:
    """{key: (H, W) bool} of a master file's PIXMASK extensions."""
    masks = {}
    for hdu in hdul[1:]:
        if hdu.name != PIXEL_MASK_HDU:
            continue
        header = hdu.header
        if header["MASKKIND"] == "hot":
            key = hot_mask_key(header["MASKPAR"], header["WITHBIAS"])
        else:
            key = cold_mask_key(header["MASKPAR"])
        mask = np.zeros(shape, dtype=bool)
        if int(header["NPIX"]):
            mask.flat[np.asarray(hdu.data, dtype=np.int64)] = True
        masks[key] = mask
    return masks


def master_from_fits(path) -> Master:
    """Read a master written with ``master_to_fits_header`` (or :func:`write_master`).

    The image is memory-mapped and converted to native float32 in one pass (a 24 MP master
    is 96 MB: reading it into memory first and then byte-swapping a copy took twice as long).
    """
    from astropy.io import fits

    from .io import image_hdu

    try:
        with fits.open(path, memmap=True) as hdul:
            header = hdul[0].header.copy()
            mapped = image_hdu(hdul).data
            data = None if mapped is None else mapped.astype(np.float32)
            del mapped
            bad = np.array(hdul["BADPIX"].data, dtype=bool) if "BADPIX" in hdul else None
            masks = {} if data is None else _read_pixel_masks(hdul, data.shape)
    except (OSError, ValueError, TypeError) as exc:
        raise NightstackError(f"cannot read master frame {path}: {exc}") from exc
    kind = str(header.get("NSKIND", "")).strip().lower()
    if data is None or kind not in MASTER_KINDS:
        raise NightstackError(f"{path} is not a nightstack master frame (no NSKIND card)")
    pattern = header.get("BAYERPAT")
    return Master(
        kind=kind,
        data=data,
        cfa_pattern=str(pattern).strip().upper() if pattern else None,
        exptime_s=float(header["EXPTIME"]) if "EXPTIME" in header else None,
        n_frames=int(header.get("NCOMBINE", 0)),
        temperature_c=float(header["CCD-TEMP"]) if "CCD-TEMP" in header else None,
        bad_pixels=bad,
        pixel_masks=masks,
    )


# =========================================================================== bad pixels


def find_hot_pixels(master_dark: np.ndarray, cfa_pattern, sigma: float = 8.0) -> np.ndarray:
    """Hot pixels of a (master) dark: bool mask, True where a pixel is > sigma robust sigmas
    above its colour plane's local level (median + k * 1.4826 MAD of the residual).

    The local level is the median of the 8 nearest same-colour pixels, so amp glow and
    gradients, however steep, are not flagged.
    """
    dark = np.asarray(master_dark, dtype=np.float32)
    hot = np.zeros(dark.shape, dtype=bool)
    for _, index in colour_planes(dark.shape, cfa_pattern):
        plane = dark[index]
        residual = plane - _ring_median(plane)
        centre, spread = _median_and_sigma(residual)
        if not np.isfinite(residual).all():  # NaN ignored, but +-inf counted in the centre
            centre = float(np.nanmedian(residual))
        if spread > 0:
            hot[index] = residual > centre + sigma * spread
        else:  # a perfectly flat dark: anything above it is hot
            hot[index] = residual > centre
    return hot


def find_cold_pixels(master_flat: np.ndarray, cfa_pattern, threshold: float = 0.5) -> np.ndarray:
    """Cold/dead pixels of a flat: bool mask, True where the response is below ``threshold``
    times the median of the 8 nearest same-colour neighbours (or is not finite)."""
    flat = np.asarray(master_flat, dtype=np.float32)
    cold = ~np.isfinite(flat)
    for _, index in colour_planes(flat.shape, cfa_pattern):
        plane = np.where(np.isfinite(flat[index]), flat[index], 0.0).astype(np.float32)
        cold[index] |= plane < threshold * _ring_median(plane)
    return cold


def _ring_median(plane: np.ndarray) -> np.ndarray:
    """Median of each pixel's 8 neighbours in a same-colour plane (borders mirrored): the
    upper middle value (5th smallest of 8), as ndimage.median_filter with a ring footprint.

    Rows are handled in bands of RING_BAND_ROWS: each band's 8 shifted neighbour images are
    sorted in two groups of four by comparator networks and the 5th smallest is picked from
    the two sorted groups, all with np.minimum/np.maximum, so the values are exactly those of
    the rank filter at a fraction of its cost. float32 in, float32 out.
    """
    plane = np.asarray(plane, dtype=np.float32)
    if plane.ndim != 2 or min(plane.shape) < 2:
        ring = np.ones((3, 3), dtype=bool)
        ring[1, 1] = False
        return ndimage.median_filter(plane, footprint=ring, mode="mirror")
    height, width = plane.shape
    out = np.empty_like(plane)
    cols = _mirror_index(np.arange(-1, width + 1), width)
    for start in range(0, height, RING_BAND_ROWS):
        stop = min(start + RING_BAND_ROWS, height)
        rows = _mirror_index(np.arange(start - 1, stop + 1), height)
        padded = plane[rows][:, cols]
        out[start:stop] = _fifth_of_eight(_ring_views(padded))
    return out


def _mirror_index(index: np.ndarray, n: int) -> np.ndarray:
    """Indices outside 0..n-1 reflected about the edge pixels (ndimage mode 'mirror')."""
    period = 2 * n - 2
    folded = np.mod(index, period)
    return np.where(folded >= n, period - folded, folded)


def _ring_views(padded: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbour images (views) of the interior of a 1-pixel padded array."""
    height, width = padded.shape[0] - 2, padded.shape[1] - 2
    return [
        padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    ]


def _sorted_four(a, b, c, d) -> list[np.ndarray]:
    """Four arrays sorted elementwise (5-comparator network); new arrays, inputs untouched."""
    a, b = np.minimum(a, b), np.maximum(a, b)
    c, d = np.minimum(c, d), np.maximum(c, d)
    a, c = np.minimum(a, c), np.maximum(a, c)
    b, d = np.minimum(b, d), np.maximum(b, d)
    b, c = np.minimum(b, c), np.maximum(b, c)
    return [a, b, c, d]


def _fifth_of_eight(values: list[np.ndarray]) -> np.ndarray:
    """Elementwise 5th smallest of 8 equal-shape arrays.

    With each half sorted (a1 <= .. <= a4, b1 <= .. <= b4), the k-th smallest of the union is
    min over i + j = k of max(a_i, b_j); for k = 5: min(max(a1,b4), max(a2,b3), max(a3,b2),
    max(a4,b1)).
    """
    a = _sorted_four(*values[:4])
    b = _sorted_four(*values[4:])
    result = np.maximum(a[0], b[3])
    for i in range(1, 4):
        np.minimum(result, np.maximum(a[i], b[3 - i]), out=result)
    return result


def _neighbour_offsets(step: int) -> np.ndarray:
    """The 8 offsets (dy, dx) of the same-colour ring at distance ``step``."""
    return np.array(
        [(dy * step, dx * step) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    )


def _neighbour_index(shape, ys, xs, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, inside): (n, 8) indices of the same-colour ring around (ys, xs), clipped
    into the image, and whether each neighbour really lies inside it."""
    height, width = shape
    offsets = _neighbour_offsets(step)
    ny = ys[:, None] + offsets[None, :, 0]
    nx = xs[:, None] + offsets[None, :, 1]
    inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    return np.clip(ny, 0, height - 1), np.clip(nx, 0, width - 1), inside


def _gather_neighbours(image2d: np.ndarray, ys, xs, step: int,
                       exclude: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(n, 8) float32 values of the same-colour ring around (ys, xs); NaN outside the image
    and where the bool image ``exclude`` is True."""
    rows, cols, inside = _neighbour_index(image2d.shape, ys, xs, step)
    values = image2d[rows, cols].astype(np.float32)
    unusable = ~inside
    if exclude is not None:
        unusable |= exclude[rows, cols]
    values[unusable] = np.nan
    return values


def _repair_plane(image2d: np.ndarray, bad2d: np.ndarray, step: int, passes: int = 6) -> None:
    """Replace bad pixels of a 2D image (in place) by the median of good same-colour neighbours.

    Pixels whose neighbours are all bad get repaired in later passes from already repaired
    pixels; any left after ``passes`` take the median of all good pixels. Only the bad
    pixels' neighbourhoods are read: no full-size copy of the image is made.
    """
    bad = bad2d.copy()
    for _ in range(passes):
        ys, xs = nonzero_2d(bad)
        if ys.size == 0:
            return
        median = nanmedian_rows(_gather_neighbours(image2d, ys, xs, step, exclude=bad))
        fixed = np.isfinite(median)
        image2d[ys[fixed], xs[fixed]] = median[fixed]
        bad[ys[fixed], xs[fixed]] = False
        if not fixed.any():
            break
    if bad.any():
        good = image2d[~bad & np.isfinite(image2d)]
        image2d[bad] = np.median(good) if good.size else 0.0


def repair_pixels(mosaic: np.ndarray, bad_mask: np.ndarray, cfa_pattern) -> np.ndarray:
    """Copy of ``mosaic`` (H, W) or (C, H, W) with ``bad_mask`` pixels replaced by the median
    of their good same-colour neighbours (2 px away in a CFA mosaic, 1 px in mono/colour)."""
    image = np.array(mosaic, dtype=np.float32)
    _repair_in_place(image, bad_mask, cfa_pattern)
    return image


def _repair_in_place(image: np.ndarray, bad_mask: np.ndarray, cfa_pattern) -> None:
    """:func:`repair_pixels` on a float32 array the caller owns, without copying it."""
    bad = np.asarray(bad_mask, dtype=bool)
    if bad.shape != image.shape:
        raise NightstackError(
            f"bad-pixel mask is {_size_text(bad.shape)} but the image is {_size_text(image.shape)}"
        )
    step = _same_colour_step(_check_pattern(cfa_pattern))
    planes = [image[c] for c in range(image.shape[0])] if image.ndim == 3 else [image]
    masks = [bad[c] for c in range(bad.shape[0])] if image.ndim == 3 else [bad]
    for plane, mask in zip(planes, masks):
        if mask.any():
            _repair_plane(plane, mask, step if image.ndim == 2 else 1)


def _plane_noise(plane: np.ndarray) -> float:
    """Pixel noise (ADU) of one colour plane from differences of horizontal neighbours,
    which cancels gradients and nebulosity: sigma = 1.4826 MAD(diff) / sqrt(2)."""
    sample = plane[::2] if plane.shape[0] > 64 else plane
    diffs = np.diff(sample, axis=1)
    return _robust_sigma(diffs) / np.sqrt(2.0)


def _spike_neighbour_limit(height_above: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Largest excess the brightest immediate neighbour of a spike of ``height_above`` may have.

    1/4 of the spike for faint ones (where a neighbour at noise level could reach it), but
    never more than what noise explains (5 sigma) unless the spike is 10x brighter still.
    """
    return np.minimum(
        height_above / OUTLIER_PEAK_RATIO,
        np.maximum(
            height_above / OUTLIER_BRIGHT_PEAK_RATIO, OUTLIER_NEIGHBOUR_NOISE_SIGMAS * noise
        ),
    )


def find_outlier_pixels(mosaic: np.ndarray, cfa_pattern, sigma: float = 10.0,
                        ignore: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Single-pixel spikes (hot pixels, cosmic rays) of one frame: bool mask.

    A pixel is an outlier when it is (a) brighter than every one of its 8 immediate
    neighbours (any colour), (b) more than ``sigma`` noise sigmas above the median of its 8
    same-colour neighbours, and (c) at least 4x further above that median than its
    brightest immediate neighbour -- and 10x when that neighbour is more than 5 noise sigmas
    up, as in the core of a bright undersampled star. Stars spread light over their
    neighbours, so (c) keeps their cores. Colour offsets of a CFA mosaic are removed first by
    subtracting each colour plane's smooth background. ``ignore`` (bool, same shape) marks
    pixels to treat as unusable, like NaN: never outliers, never hiding a neighbour's spike.

    (b) and (c) together imply (brightest neighbour) < (pixel) - 0.75 * sigma * noise
    whatever the same-colour median is, so only pixels passing that cheap test (with a
    margin, 0.5 instead of 0.75, for float32 rounding) get the per-pixel median: the mask is
    the one the full test on every local maximum gives.
    """
    image = np.asarray(mosaic, dtype=np.float32)
    pattern = _check_pattern(cfa_pattern)
    if image.ndim == 3:
        outliers = np.empty(image.shape, dtype=bool)
        for c in range(image.shape[0]):
            skip = None if ignore is None else ignore[c]
            outliers[c] = find_outlier_pixels(image[c], None, sigma, skip)
        return outliers
    step = _same_colour_step(pattern)
    excess, noise = _excess_and_noise(image, pattern, ignore)
    brightest_neighbour = _ring_maximum(excess)
    ys, xs = _spike_candidates(excess, brightest_neighbour, noise, sigma)
    noise_at = noise[ys % step, xs % step]
    local = nanmedian_rows(_gather_neighbours(excess, ys, xs, step))
    height_above = excess[ys, xs] - local
    neighbour_above = brightest_neighbour[ys, xs] - local
    is_spike = (height_above > sigma * noise_at) & (
        neighbour_above <= _spike_neighbour_limit(height_above, noise_at)
    )
    outliers = np.zeros(image.shape, dtype=bool)
    outliers[ys[is_spike], xs[is_spike]] = True
    return outliers


def _excess_and_noise(image: np.ndarray, pattern, ignore) -> tuple[np.ndarray, np.ndarray]:
    """Per colour plane of a 2D mosaic: the excess over the plane's smooth background
    (float32, NaN where unusable: non-finite or ``ignore``d) and the pixel noise (ADU).

    Noise comes back as a float32 (step, step) array indexed by (y % step, x % step), one
    value per CFA phase (one value in all for mono data).
    """
    step = _same_colour_step(pattern)
    excess = np.empty_like(image)
    noise = np.zeros((step, step), dtype=np.float32)
    for _, index in colour_planes(image.shape, pattern):
        if step == 1:  # mono: work in the output itself
            np.copyto(excess, image)
            plane = excess
        else:  # a contiguous copy of this CFA phase: faster than strided views
            plane = np.array(image[index], dtype=np.float32, copy=True)
        unusable = ~np.isfinite(plane)
        if ignore is not None:
            unusable |= ignore[index]
        plane[unusable] = np.nan
        phase = (0, 0) if step == 1 else (index[0].start, index[1].start)
        noise[phase] = _plane_noise(plane)
        plane -= _block_background(plane)
        if step != 1:
            excess[index] = plane
    return excess, noise


def _ring_maximum(image: np.ndarray) -> np.ndarray:
    """Largest of each pixel's 8 immediate neighbours (borders mirrored); NaN neighbours are
    ignored, -inf where all 8 are NaN. float32 (H, W).

    Separable, in bands of RING_BAND_ROWS rows: the left/right neighbours, then the 3-wide
    row maxima of the rows above and below, combined with np.fmax. Exact: the values of
    ndimage.maximum_filter with a ring footprint on the image with NaN set to -inf.
    """
    height, width = image.shape
    if min(height, width) < 2:
        footprint = np.ones((3, 3), dtype=bool)
        footprint[1, 1] = False
        finite_or_low = np.where(np.isnan(image), -np.inf, image)
        return ndimage.maximum_filter(finite_or_low, footprint=footprint, mode="mirror")
    ring = np.empty_like(image)
    for start in range(0, height, RING_BAND_ROWS):
        stop = min(start + RING_BAND_ROWS, height)
        padded = image[_mirror_index(np.arange(start - 1, stop + 1), height)]
        sides = np.empty_like(padded)  # max of the left and right neighbours
        np.fmax(padded[:, :-2], padded[:, 2:], out=sides[:, 1:-1])
        sides[:, 0] = padded[:, 1]
        sides[:, -1] = padded[:, -2]
        row_max = np.fmax(sides, padded)  # max over x-1, x, x+1
        band = ring[start:stop]
        np.fmax(sides[1:-1], row_max[:-2], out=band)
        np.fmax(band, row_max[2:], out=band)
        band[np.isnan(band)] = -np.inf
    return ring


def _spike_candidates(excess, brightest_neighbour, noise, sigma) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels that can pass find_outlier_pixels' tests: above their brightest
    immediate neighbour by more than half of ``sigma`` noise sigmas (and by more than 0).

    ``noise`` is the (step, step) per-CFA-phase noise; the differences are taken in bands of
    RING_BAND_ROWS rows (even, so each band starts on the same CFA row phase).
    """
    step = noise.shape[0]
    thresholds = [[max(0.0, 0.5 * float(sigma) * float(n)) for n in row] for row in noise]
    candidate = np.empty(excess.shape, dtype=bool)
    for start in range(0, excess.shape[0], RING_BAND_ROWS):
        stop = min(start + RING_BAND_ROWS, excess.shape[0])
        gap = np.subtract(excess[start:stop], brightest_neighbour[start:stop])
        band = candidate[start:stop]
        for dy in range(step):
            for dx in range(step):
                cells = (slice(dy, None, step), slice(dx, None, step))
                np.greater(gap[cells], thresholds[dy][dx], out=band[cells])
    return nonzero_2d(candidate)


# =========================================================================== calibration


def _check_master_fits(source, shape, cfa_pattern, master: Master) -> None:
    """FrameError when a master's size or CFA pattern does not match the frame's."""
    if tuple(master.data.shape) != tuple(shape):
        raise FrameError(
            source,
            f"master {master.kind} is {_size_text(master.data.shape)} but this frame is "
            f"{_size_text(shape)}",
        )
    if (master.cfa_pattern or None) != (cfa_pattern or None):
        raise FrameError(
            source,
            f"master {master.kind} has CFA pattern {master.cfa_pattern or 'none'} but this "
            f"frame has {cfa_pattern or 'none'}",
        )


def _format_seconds(value: float) -> str:
    return f"{value:g} s"


def _subtract_offset_and_dark(data, raw: RawFrame, bias, dark, notes, settings=None) -> None:
    """In place: remove bias (or black level) and dark current, recording what was done.

    Dark current is scaled by the exposure ratio; when the dark's temperature differs from
    the light's by more than ``dark_temperature_tolerance_c`` (and a bias isolates the dark
    current) the scale is measured instead on the hot pixels the two share.
    """
    settings = {**DEFAULT_CONFIG, **(settings or {})}
    if bias is not None:
        data -= bias.data
        notes.append(f"bias subtracted (master of {bias.n_frames})")
    elif dark is None and raw.black_level:
        data -= np.float32(raw.black_level)
        notes.append(f"camera black level {raw.black_level:g} ADU subtracted")
    if dark is None:
        return
    light_s, dark_s = raw.exptime_s, dark.exptime_s
    differ = light_s and dark_s and abs(light_s / dark_s - 1.0) > 0.01
    warm = _temperature_mismatch(raw, dark, float(settings["dark_temperature_tolerance_c"]))
    if bias is None:
        data -= dark.data
        if warm:
            notes.append(f"{warm}: dark subtracted unscaled (no master bias to scale it)")
        if differ:
            notes.append(
                f"dark subtracted unscaled: no master bias to scale it "
                f"({_format_seconds(dark_s)} dark, {_format_seconds(light_s)} frame)"
            )
        elif not warm:
            notes.append(f"dark subtracted (master of {dark.n_frames}, includes the offset)")
        return
    scale = light_s / dark_s if differ else 1.0
    current = _dark_current(dark, bias)
    if warm:
        sigma = float(settings["hot_sigma"])
        pattern = _check_pattern(raw.cfa_pattern)
        hot = _hot_mask(dark, bias, pattern, sigma)
        measured = dark_scale_from_hot_pixels(data, current, pattern, sigma, hot=hot)
        if measured is None:
            notes.append(f"{warm}: dark current may not match (too few hot pixels to scale it)")
        else:
            notes.append(
                f"{warm}: dark current scaled x{measured:.3g} to match the frame's hot pixels "
                f"(exposure ratio alone: x{scale:.3g})"
            )
            scale = measured
    if scale != 1.0:
        current *= np.float32(scale)  # a fresh array (dark - bias): scaled without a copy
    data -= current
    if warm:
        return
    if differ:
        notes.append(
            f"dark scaled x{scale:.3g} ({_format_seconds(dark_s)} -> {_format_seconds(light_s)})"
        )
    else:
        notes.append(f"dark current subtracted (master of {dark.n_frames})")


def _temperature_mismatch(raw: RawFrame, dark: Master, tolerance_c: float) -> str:
    """A note when the dark and the light were taken at temperatures further apart than
    ``tolerance_c``; '' when they match or either temperature is unknown."""
    light_c, dark_c = _frame_temperature(raw), dark.temperature_c
    if light_c is None or dark_c is None or abs(light_c - dark_c) <= tolerance_c:
        return ""
    return f"dark taken at {dark_c:g} degC but this frame at {light_c:g} degC"


def dark_scale_from_hot_pixels(offset_free: np.ndarray, dark_current: np.ndarray, cfa_pattern,
                               sigma: float = 8.0, hot: np.ndarray | None = None) -> float | None:  # fmt: skip
    """Scale that best fits ``dark_current`` (ADU) onto a bias-subtracted light mosaic.

    Both are taken on the dark's hot pixels (``hot``, else found in ``dark_current`` at
    ``sigma``), each minus the median of its same-colour ring, so sky, stars and gradients
    cancel; the scale is the median ratio (light / dark). None when fewer than
    MIN_HOT_PIXELS_FOR_SCALE hot pixels are usable.
    """
    light = np.asarray(offset_free, dtype=np.float32)
    current = np.asarray(dark_current, dtype=np.float32)
    if light.ndim != 2:
        return None
    if hot is None:
        hot = find_hot_pixels(current, cfa_pattern, sigma)
    ys, xs = nonzero_2d(np.asarray(hot, dtype=bool))
    if ys.size < MIN_HOT_PIXELS_FOR_SCALE:
        return None
    step = _same_colour_step(_check_pattern(cfa_pattern))
    light_excess = light[ys, xs] - nanmedian_rows(_gather_neighbours(light, ys, xs, step))
    dark_excess = current[ys, xs] - nanmedian_rows(_gather_neighbours(current, ys, xs, step))
    usable = np.isfinite(light_excess) & np.isfinite(dark_excess) & (dark_excess > 0)
    if np.count_nonzero(usable) < MIN_HOT_PIXELS_FOR_SCALE:
        return None
    return float(max(np.median(light_excess[usable] / dark_excess[usable]), 0.0))


def hot_mask_key(sigma: float, with_bias: bool) -> tuple:
    """Key of a dark's stored hot-pixel mask: found at ``sigma`` on dark - bias or on the dark."""
    return ("hot", float(sigma), bool(with_bias))


def cold_mask_key(threshold: float) -> tuple:
    """Key of a flat's stored cold-pixel mask, found at ``threshold``."""
    return ("cold", float(threshold))


def with_pixel_masks(master: Master, bias: Master | None, config: dict | None = None) -> Master:
    """``master`` with its bad-pixel mask found once, for every light to reuse (about 1 s a
    24 MP light): a dark's hot pixels (on dark - ``bias``, the bias the lights will use),
    a flat's cold pixels. ``config``: hot_sigma, cold_threshold (DEFAULT_CONFIG)."""
    settings = {**DEFAULT_CONFIG, **(config or {})}
    pattern = _check_pattern(master.cfa_pattern)
    if master.kind == "dark":
        sigma = float(settings["hot_sigma"])
        master.pixel_masks[hot_mask_key(sigma, bias is not None)] = find_hot_pixels(
            _dark_current(master, bias), pattern, sigma)
    elif master.kind == "flat":
        threshold = float(settings["cold_threshold"])
        master.pixel_masks[cold_mask_key(threshold)] = find_cold_pixels(
            master.data, pattern, threshold)
    return master


def _hot_mask(dark: Master, bias: Master | None, cfa_pattern, sigma: float) -> np.ndarray:
    """The master dark's hot pixels: stored with the master, else found once per master.

    A stored mask was found against the night's bias master, the one its lights use; only
    whether there is a bias is checked."""
    stored = dark.pixel_masks.get(hot_mask_key(sigma, bias is not None))
    if stored is not None:
        return stored
    return dark.cached_mask(
        ("hot", sigma, id(bias)),
        lambda: find_hot_pixels(_dark_current(dark, bias), cfa_pattern, sigma),
    )


def _dark_current(dark: Master, bias: Master | None) -> np.ndarray:
    return dark.data - bias.data if bias is not None else dark.data


def calibrate(raw: RawFrame, bias: Master | None, dark: Master | None, flat: Master | None,
              config: dict | None = None) -> CalibratedFrame:  # fmt: skip
    """Calibrate one light frame and demosaic it: ``demosaic_frame(calibrate_mosaic(...))``.

    Returns the frame as float32 (C, H, W). Raises FrameError when a master's size or CFA
    pattern differs from the frame's.
    """
    return demosaic_frame(calibrate_mosaic(raw, bias, dark, flat, config))


def calibrate_mosaic(raw: RawFrame, bias: Master | None, dark: Master | None,
                     flat: Master | None, config: dict | None = None) -> CalibratedFrame:  # fmt: skip
    """Calibrate one light frame on its raw mosaic, without demosaicing.

    Order: subtract bias (or the camera black level when there is no bias; a dark without a
    bias carries the offset itself), subtract dark current (scaled by exposure ratio when a
    bias exists), divide by the flat, repair hot (from the dark), cold (from the flat),
    per-frame outlier and non-finite pixels. ``config`` keys: hot_sigma, cold_threshold,
    outlier_sigma, repair_outliers (defaults in DEFAULT_CONFIG). Returns the calibrated mosaic,
    float32 (H, W) (or the frame's own shape when it has no CFA), its pattern in
    ``meta["cfa_pattern"]``; the caller may free the raw frame and the masters before
    ``demosaic_frame`` (they are not referenced). Raises FrameError when a master's size or CFA
    pattern differs from the frame's.
    """
    settings = {**DEFAULT_CONFIG, **(config or {})}
    pattern = _check_pattern(raw.cfa_pattern)
    for master in (bias, dark, flat):
        if master is not None:
            _check_master_fits(raw.source, raw.data.shape, pattern, master)
    notes: list[str] = []
    data = np.array(raw.data, dtype=np.float32)
    _subtract_offset_and_dark(data, raw, bias, dark, notes, settings)
    if flat is not None:
        data /= flat.data
        notes.append(f"flat-fielded (master of {flat.n_frames})")
    bad, n_repaired = _bad_pixel_mask(data, pattern, bias, dark, flat, settings, notes)
    if n_repaired:
        _repair_in_place(data, bad, pattern)
    return CalibratedFrame(data=data, notes=notes, n_repaired=n_repaired,
                           meta=_frame_meta(raw, pattern))  # fmt: skip


def demosaic_frame(frame: CalibratedFrame) -> CalibratedFrame:
    """A calibrated mosaic (``calibrate_mosaic``) as float32 (C, H, W): demosaiced when it has
    a CFA pattern (the note says so), else the frame with a channel axis."""
    pattern = frame.meta.get("cfa_pattern")
    data, notes = frame.data, list(frame.notes)
    if pattern is not None:
        image = demosaic(data, pattern)
        notes.append(f"demosaiced ({pattern}, Malvar-He-Cutler)")
    else:
        image = data if data.ndim == 3 else data[None]
    return CalibratedFrame(data=image.astype(np.float32, copy=False), notes=notes,
                           n_repaired=frame.n_repaired, meta=frame.meta)  # fmt: skip


def _bad_pixel_mask(data, pattern, bias, dark, flat, settings, notes) -> tuple[np.ndarray, int]:
    """Union of all bad pixels of this frame, with one note per cause."""
    bad = np.zeros(data.shape, dtype=bool)

    def add(mask, label):
        new = mask & ~bad
        count = int(np.count_nonzero(new))
        if count:
            bad[new] = True
            notes.append(f"{count} {label} repaired")

    if dark is not None:
        sigma = float(settings["hot_sigma"])
        add(_hot_mask(dark, bias, pattern, sigma), "hot pixels")
    if flat is not None:
        threshold = float(settings["cold_threshold"])
        cold = flat.pixel_masks.get(cold_mask_key(threshold))
        if cold is None:
            cold = flat.cached_mask(
                ("cold", threshold), lambda: find_cold_pixels(flat.data, pattern, threshold)
            )
        if flat.bad_pixels is not None:
            cold = cold | flat.bad_pixels
        add(cold, "cold pixels")
    add(~np.isfinite(data), "non-finite pixels")
    if settings["repair_outliers"]:
        sigma = float(settings["outlier_sigma"])
        outliers = find_outlier_pixels(data, pattern, sigma, ignore=bad)
        add(outliers, "outlier pixels (hot pixels/cosmic rays)")
    return bad, int(np.count_nonzero(bad))


def _frame_meta(raw: RawFrame, pattern) -> dict:
    return {
        "exptime_s": raw.exptime_s,
        "date_obs": raw.date_obs,
        "instrument": raw.instrument,
        "gain": raw.gain,
        "iso": raw.iso,
        "cfa_pattern": pattern,
        "source": raw.source,
        "focal_mm": raw.focal_mm,
        "pixel_um": raw.pixel_um,
    }


# =========================================================================== demosaic

# Malvar, He & Cutler (2004), "High-quality linear interpolation for demosaicing of
# Bayer-patterned color images", ICASSP. Bilinear interpolation corrected by the Laplacian
# of the known channel at that pixel; 5x5 kernels, all scaled by 1/8.
_G_AT_RB = np.array(
    [[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]],
    dtype=np.float32,
) / 8
# R (or B) at a green pixel whose row holds R (or B): horizontal neighbours are the target.
_RB_AT_G_SAME_ROW = np.array(
    [[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]],
    dtype=np.float32,
) / 8
_RB_AT_G_SAME_COLUMN = _RB_AT_G_SAME_ROW.T.copy()
# R at B and B at R: diagonal neighbours.
_RB_AT_BR = np.array(
    [
        [0, 0, -1.5, 0, 0],
        [0, 2, 0, 2, 0],
        [-1.5, 0, 6, 0, -1.5],
        [0, 2, 0, 2, 0],
        [0, 0, -1.5, 0, 0],
    ],
    dtype=np.float32,
) / 8


def demosaic(mosaic: np.ndarray, cfa_pattern: str) -> np.ndarray:
    """Bayer mosaic (H, W) -> float32 (3, H, W) R, G, B by Malvar-He-Cutler (2004).

    Gradient-corrected linear interpolation with the paper's 5x5 kernels, borders mirrored
    (mode 'mirror' keeps the CFA phase at the edges). Any of RGGB, BGGR, GRBG, GBRG.
    """
    pattern = _check_pattern(cfa_pattern)
    if pattern is None:
        raise NightstackError("demosaic needs a CFA pattern")
    cfa = np.asarray(mosaic, dtype=np.float32)
    if cfa.ndim != 2:
        raise NightstackError(f"demosaic needs a 2D mosaic, got shape {cfa.shape}")
    out = np.empty((3,) + cfa.shape, dtype=np.float32)
    channel = {"R": 0, "G": 1, "B": 2}
    phases = [(dy, dx, pattern[2 * dy + dx]) for dy in range(2) for dx in range(2)]
    # Known samples first.
    for dy, dx, colour in phases:
        out[channel[colour], dy::2, dx::2] = cfa[dy::2, dx::2]
    # Each kernel is applied once to the whole mosaic and used at the phases that need it.
    green = convolve(cfa, _G_AT_RB, mode="mirror")
    for dy, dx, colour in phases:
        if colour != "G":
            out[1, dy::2, dx::2] = green[dy::2, dx::2]
    del green
    row_colour = {dy: next(c for ry, _, c in phases if ry == dy and c != "G") for dy in range(2)}
    for kernel, wanted in (
        (_RB_AT_G_SAME_ROW, "row"),
        (_RB_AT_G_SAME_COLUMN, "column"),
        (_RB_AT_BR, "diagonal"),
    ):
        estimate = convolve(cfa, kernel, mode="mirror")
        for dy, dx, colour in phases:
            if colour == "G":
                same_row = row_colour[dy]  # R or B sits beside this green in its row
                other = "B" if same_row == "R" else "R"
                target = same_row if wanted == "row" else other if wanted == "column" else None
            else:
                target = ("B" if colour == "R" else "R") if wanted == "diagonal" else None
            if target is not None:
                out[channel[target], dy::2, dx::2] = estimate[dy::2, dx::2]
        del estimate
    return out


__all__ = [
    "Master",
    "CalibratedFrame",
    "DEFAULT_CONFIG",
    "robust_combine",
    "make_master",
    "normalise_flat",
    "master_to_fits_header",
    "master_from_fits",
    "write_master",
    "find_hot_pixels",
    "find_cold_pixels",
    "repair_pixels",
    "find_outlier_pixels",
    "calibrate",
    "calibrate_mosaic",
    "demosaic_frame",
    "demosaic",
    "colour_planes",
]
