"""Reading and writing nightstack's artifacts: FITS images, star catalogs, JSON.

Every writer goes through a temporary file in the destination folder and an atomic
rename, so a killed job never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from . import compressed_boxes
from .errors import NightstackError


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NightstackError(f"cannot create output folder {path.parent}: {exc.strerror}") from exc
    suffix = suffix if suffix is not None else "".join(path.suffixes) or ".tmp"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise NightstackError(f"cannot write in {path.parent}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs are ordinary
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise NightstackError(f"cannot write {path}: {os_reason(exc)}") from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def os_reason(exc: OSError) -> str:
    """Why a file operation failed, in words; a full disk always reads the same way (astropy
    reports it without an errno)."""
    if exc.errno == errno.ENOSPC or "space on disk" in str(exc):
        return "no space left on device (disk full)"
    return exc.strerror or str(exc)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.unlink(path)


def header_text(text) -> str:
    """A string FITS accepts (printable ASCII): other characters and '%' percent-encoded."""
    from urllib.parse import quote

    safe = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")
    return quote(str(text), safe=safe)


def header_text_decoded(value) -> str:
    """Inverse of header_text."""
    from urllib.parse import unquote

    return unquote(str(value))


def write_json(path, obj) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


CALIBRATED_FORMATS = ("compressed", "float32")
CALIBRATED_SETTINGS = ("auto", *CALIBRATED_FORMATS)
CALIBRATED_CHANNELS = 3  # demosaiced colour; a mono night is over-counted, on the safe side
COMPRESSED_HDU = "COMPRESSED_IMAGE"
COMPRESSION_TYPE = "RICE_1"
# Quantisation step = the image's noise / 16: adds (1/16)/sqrt(12) = 1.8 % of the noise in
# quadrature, i.e. +0.016 % noise (fpack's default level 4 would add 0.26 %).
QUANTIZE_LEVEL = 16.0
QUANTIZE_METHOD = 2  # SUBTRACTIVE_DITHER_2: dithered quantisation, exact zeros stay exact
# (channel, rows, columns) per tile: a box is read without decompressing much outside it
# (full-width row tiles would decompress whole rows for every stack tile).
COMPRESSION_TILE = (1, 64, 256)


def calibrated_format(setting: str, n_frames: int, frame_megapixels: float,
                      float32_max_gb: float) -> str:
    """The storage of a night's calibrated frames for config ``output.calibrated_frames``.

    "auto" stores float32 (exact, and the fastest to write and read: about 1.5 s less per
    24 MP frame and 20 % less stack time, benchmarks/README.md) while the night's frames,
    ``n_frames`` of ``frame_megapixels`` each, take at most ``float32_max_gb`` GB as float32
    colour; larger nights are compressed (about 4.5x smaller). Any other setting is returned
    as it is. Raises NightstackError for an unknown setting.
    """
    if setting not in CALIBRATED_SETTINGS:
        raise NightstackError(
            f"output.calibrated_frames must be one of {', '.join(CALIBRATED_SETTINGS)}, "
            f"got {setting!r}"
        )
    if setting != "auto":
        return setting
    float32_gb = n_frames * frame_megapixels * 1e6 * CALIBRATED_CHANNELS * 4 / 1e9
    return "float32" if float32_gb <= float32_max_gb else "compressed"


def dither_seed(name: str) -> int:
    """Fixed dither seed 1..10000 from a frame's name: reruns give identical files, and
    frames get different dither sequences so their quantisation errors do not line up."""
    import zlib

    return 1 + zlib.crc32(str(name).encode()) % 10000


def quantize_step(data, row_step: int = 16) -> float:
    """Quantisation step (image unit) for compressed_image_hdu: the quietest channel's noise /
    QUANTIZE_LEVEL, or 0 when there is no measurable noise.

    The noise is cfitsio's "noise3" estimate (0.6053 x median |2 x_i - x_(i-2) - x_(i+2)|
    along rows, which ignores smooth structure and stars), on every ``row_step``-th row,
    over finite non-zero pixels. Computing it once here instead of per tile in cfitsio's
    quantiser makes the compressed write about 3x faster on 24 MP frames.
    """
    channels = data[None] if data.ndim == 2 else data
    noises = []
    for channel in channels:
        rows = np.asarray(channel[::row_step], dtype=np.float32)
        usable = np.isfinite(rows) & (rows != 0)
        ok = usable[:, 2:-2] & usable[:, :-4] & usable[:, 4:]
        second = 2 * rows[:, 2:-2] - rows[:, :-4] - rows[:, 4:]
        if ok.sum() >= 64:
            noises.append(0.6052697 * float(np.median(np.abs(second[ok]))))
    positive = [n for n in noises if n > 0 and np.isfinite(n)]
    return min(positive) / QUANTIZE_LEVEL if positive else 0.0


def compressed_image_hdu(data, seed: int = 1):
    """A CompImageHDU of a float32 (H, W) or (C, H, W) image, tile-compressed like fpack.

    RICE_1 on values quantised to 1/QUANTIZE_LEVEL of the image's noise (quantize_step; cfitsio's
    own per-tile estimate when the image has no measurable noise), subtractively dithered with
    the fixed ``seed`` (1..10000); NaNs are kept (as the null value) and zeros stay exact.
    Tiles are COMPRESSION_TILE, clipped to the image.
    """
    data = np.asarray(data, dtype=np.float32)
    tile = tuple(min(t, n) for t, n in zip(COMPRESSION_TILE[-data.ndim:], data.shape))
    step = quantize_step(data)
    # a negative level is cfitsio's "this is the step itself", which skips its noise estimate
    level = -step if step > 0 else QUANTIZE_LEVEL
    return fits.CompImageHDU(
        data, name=COMPRESSED_HDU, compression_type=COMPRESSION_TYPE, tile_shape=tile,
        quantize_level=level, quantize_method=QUANTIZE_METHOD, dither_seed=int(seed),
    )


def write_fits_image(path, data, header=None, extra_hdus=(), compress=False, seed: int = 1) -> None:
    """Write a float32 image (H, W) or (C, H, W) with a header dict or fits.Header.

    The header always goes to the primary HDU. The image goes there too, or with
    ``compress`` to a tile-compressed extension right after it (compressed_image_hdu;
    ``seed`` is its dither seed). read_fits_image and open_fits_data read both layouts.
    """
    hdr = header if isinstance(header, fits.Header) else fits.Header()
    if isinstance(header, dict):
        for key, value in header.items():
            hdr[key] = value
    packed = data is not None and compress
    image = [compressed_image_hdu(data, seed)] if packed else []
    primary_data = None if data is None or packed else np.asarray(data, dtype=np.float32)
    primary = fits.PrimaryHDU(data=primary_data, header=hdr)
    with atomic_path(path, ".fits") as tmp:
        fits.HDUList([primary, *image, *extra_hdus]).writeto(tmp, overwrite=True)


def image_hdu(hdul):
    """The HDU holding a nightstack file's image: the primary if it has data, else the first
    tile-compressed image extension, else the (empty) primary."""
    if hdul[0].header.get("NAXIS", 0):
        return hdul[0]
    for hdu in hdul[1:]:
        if isinstance(hdu, fits.CompImageHDU):
            return hdu
    return hdul[0]


def read_fits_image(path, memmap=True):
    """Return (data or None, primary header) of a nightstack FITS file, float32 or compressed.

    A compressed image is decompressed whole into memory (``memmap`` applies to uncompressed
    images only).
    """
    with fits.open(path, memmap=memmap) as hdul:
        header = hdul[0].header.copy()
        data = image_hdu(hdul).data
        if data is not None and not memmap:
            data = np.array(data)
    return data, header


def open_fits_data(path):
    """(hdul, data) of a nightstack FITS file, without reading the image into memory.

    ``data`` is the memory-mapped primary array or, for a tile-compressed (C, H, W) image,
    an object whose slices decompress only the tiles they touch: CompressedBoxes for the
    workflow's own quantised RICE_1 frames, astropy's CompImageSection for others (a 2D
    compressed image, which the workflow never writes, is decompressed whole). None when
    the file holds no image. Drop ``data``, then close ``hdul``, when done.
    """
    hdul = fits.open(path, memmap=True, lazy_load_hdus=True)
    hdu = image_hdu(hdul)
    if isinstance(hdu, fits.CompImageHDU) and len(hdu.shape) == 3:
        if compressed_boxes.supports(hdu):
            return hdul, compressed_boxes.CompressedBoxes(hdu)
        return hdul, hdu.section
    return hdul, hdu.data


MAX_OPEN_FRAMES = 4096  # also kept 64 below the process's file-descriptor limit


def _file_map(hdul):
    """The mmap astropy reads the file through, or None (astropy internals; a newer astropy
    without ``_file._mmap`` makes OpenFrames reopen per read, as before, not fail)."""
    mapped = getattr(getattr(hdul, "_file", None), "_mmap", None)
    return mapped if hasattr(mapped, "madvise") else None


def _descriptor_room() -> int:
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN_FRAMES if soft == resource.RLIM_INFINITY else max(0, soft - 64)


def open_frames_limit() -> int:
    """How many frames a process may hold open: MAX_OPEN_FRAMES, within the descriptor limit."""
    return min(MAX_OPEN_FRAMES, _descriptor_room())


class OpenFrames:
    """FITS frames held open across many partial reads (the stack's tiles).

    Opening costs about 9 ms of header parsing, and a stack of N frames read in T tiles,
    with T growing with N under a fixed memory budget, would open N x T times (58,500 opens
    for 500 x 1.7 MP). Here each frame is opened once. After every read its memory map's
    pages are dropped from the process (madvise DONTNEED; they stay in the page cache), so
    resident memory does not grow with the tiles read. Files beyond ``max_open`` (descriptor
    limit), or whose map cannot be reached, are opened and closed around each read.
    Use from one thread at a time; ``close`` (or the with-block) closes every file.
    """

    def __init__(self, max_open: int | None = None):
        self.max_open = open_frames_limit() if max_open is None else max_open
        self._held: dict[str, tuple] = {}

    @contextlib.contextmanager
    def reading(self, path):
        """Yield the frame's data as ``open_fits_data`` gives it, for one read."""
        key = str(path)
        held = self._held.pop(key, None)
        hdul, data = held if held is not None else open_fits_data(key)
        try:
            yield data
        except BaseException:
            del data
            hdul.close()
            raise
        mapped = _file_map(hdul)
        if mapped is not None and len(self._held) < self.max_open:
            mapped.madvise(mmap.MADV_DONTNEED)
            self._held[key] = (hdul, data)
        else:
            del data
            hdul.close()

    @property
    def n_open(self) -> int:
        """Number of files held open. (No ``__len__``: an instance must stay truthy when
        empty, callers test ``frames is None``.)"""
        return len(self._held)

    def close(self) -> None:
        while self._held:
            _, (hdul, data) = self._held.popitem()
            del data
            hdul.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_catalog(path, table) -> None:
    """Write a star catalog (astropy Table with meta) as ECSV."""
    with atomic_path(path, ".ecsv") as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)


def read_catalog(path):
    """A star catalog (astropy Table with meta) from ECSV."""
    # imported here: astropy.table takes a third of a second, and only some jobs read catalogs
    from astropy.table import Table

    return Table.read(path, format="ascii.ecsv")
