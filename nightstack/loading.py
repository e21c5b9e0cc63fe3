"""Reading one exposure from disk into a :class:`RawFrame`: FITS, camera RAW, TIFF, PNG, JPEG.

Everything comes back as float32 in the file's own units (ADU for FITS and RAW, 0..255 or
0..65535 for 8/16-bit pictures). Nothing is calibrated, scaled or demosaiced here, except a
camera RAW that is not a Bayer mosaic, which LibRaw interpolates linearly (see
:func:`_load_raw`).

Orientation: rows are returned top-down (row 0 is the top of the picture, the nightstack
pixel convention). A FITS file's ``BAYERPAT`` is read as the colour of the first pixels
stored in the file, i.e. of numpy row 0 as astropy returns it; ``XBAYROFF``/``YBAYROFF``
shift it. This is the convention of INDI, ASCOM, N.I.N.A., the ZWO Seestar and Siril >= 1.2,
whose loader flips a TOP-DOWN file to bottom-up *and* flips the pattern identifier with it
(free-astro/siril MR 626; Siril doc "Orientation of FITS images"). nightstack wants top-down,
so it does the mirror image: a file marked ``ROWORDER='BOTTOM-UP'`` is flipped vertically
and its pattern follows the flip (RGGB -> GBRG when the height is even; unchanged when odd).
Files without ``ROWORDER`` (nearly all camera drivers) are taken as stored. Camera JPEG/TIFF
EXIF orientation is ignored too, so RAW and JPEG frames of one camera keep the same geometry.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FrameError

FITS_EXTENSIONS = frozenset(
    {".fit", ".fits", ".fts", ".fz", ".fit.gz", ".fits.gz", ".fts.gz", ".fits.bz2", ".fit.bz2"}
)
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
PICTURE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
RAW_EXTENSIONS = frozenset(
    {
        ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw",
        ".kdc", ".dcr", ".mrw", ".3fr", ".nrw", ".x3f", ".erf", ".mef", ".mos", ".iiq",
        ".raw", ".rwl", ".sr2", ".srf", ".crw",
    }
)  # fmt: skip
SUPPORTED_EXTENSIONS = FITS_EXTENSIONS | TIFF_EXTENSIONS | PICTURE_EXTENSIONS | RAW_EXTENSIONS

BAYER_PATTERNS = frozenset({"RGGB", "BGGR", "GRBG", "GBRG"})
FITS_BLOCK_BYTES = 2880


@dataclass
class RawFrame:
    """One exposure as read from disk, before any calibration.

    ``data`` is float32: (H, W) for a CFA mosaic or a mono frame, (3, H, W) R,G,B for input
    that is already colour. Levels are in the input's own units; ``black_level`` and
    ``white_level`` are in those units too.
    """

    data: np.ndarray
    cfa_pattern: str | None
    source: str
    exptime_s: float | None = None
    date_obs: str | None = None
    instrument: str | None = None
    gain: float | None = None
    iso: float | None = None
    black_level: float = 0.0
    white_level: float | None = None
    focal_mm: float | None = None
    pixel_um: float | None = None
    header: dict = field(default_factory=dict)

    @property
    def height_px(self) -> int:
        return int(self.data.shape[-2])

    @property
    def width_px(self) -> int:
        return int(self.data.shape[-1])


# --------------------------------------------------------------------------- file names


def file_suffix(path) -> str:
    """Lower-case suffix of ``path``, double suffixes kept (``x.FITS.gz`` -> ``.fits.gz``)."""
    name = Path(path).name.lower()
    suffixes = Path(name).suffixes
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2"):
        return suffixes[-2] + suffixes[-1]
    return suffixes[-1] if suffixes else ""


def is_image_file(path) -> bool:
    """True when ``path``'s suffix is one nightstack can read (case-insensitive)."""
    return file_suffix(path) in SUPPORTED_EXTENSIONS


def _format_of(path) -> str:
    suffix = file_suffix(path)
    if suffix in FITS_EXTENSIONS:
        return "fits"
    if suffix in TIFF_EXTENSIONS:
        return "tiff"
    if suffix in PICTURE_EXTENSIONS:
        return "picture"
    if suffix in RAW_EXTENSIONS:
        return "raw"
    shown = suffix or "(none)"
    raise FrameError(path, f"unsupported file type {shown!r}")


def _check_readable(path) -> int:
    """Raise FrameError unless ``path`` is a non-empty readable file; return its size in bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FrameError(path, "file not found") from None
    except PermissionError:
        raise FrameError(path, "permission denied") from None
    if path.is_dir():
        raise FrameError(path, "is a folder, not an image file")
    if size == 0:
        raise FrameError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise FrameError(path, "permission denied") from None
    except OSError as exc:
        raise FrameError(path, f"cannot read file ({exc.strerror or exc})") from None
    return size


# --------------------------------------------------------------------------- public API


def load_frame(path) -> RawFrame:
    """Read one image file (any supported format) into a :class:`RawFrame`.

    Raises :class:`FrameError` with a short reason when the file cannot be used.
    Non-finite pixels are kept (calibration repairs them); their count is in
    ``header['n_nonfinite']``.
    """
    path = Path(path)
    kind = _format_of(path)
    size = _check_readable(path)
    loader = {"fits": _load_fits, "tiff": _load_tiff, "picture": _load_picture, "raw": _load_raw}
    try:
        frame = loader[kind](path, size)
    except FrameError:
        raise
    except PermissionError:
        raise FrameError(path, "permission denied") from None
    except MemoryError:
        raise FrameError(path, "not enough memory to read this image") from None
    return _check_pixels(path, frame)


def image_size(path) -> tuple[int, int]:
    """(width_px, height_px) of the image ``load_frame`` would return, reading headers only."""
    path = Path(path)
    kind = _format_of(path)
    size = _check_readable(path)
    sizer = {"fits": _fits_size, "tiff": _tiff_size, "picture": _picture_size, "raw": _raw_size}
    try:
        return sizer[kind](path, size)
    except FrameError:
        raise
    except PermissionError:
        raise FrameError(path, "permission denied") from None


def _check_pixels(path, frame: RawFrame) -> RawFrame:
    """Reject NaN-only frames; count non-finite pixels into the header."""
    finite = np.isfinite(frame.data)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == finite.size:
        raise FrameError(path, "no usable pixels: every pixel is NaN or infinite")
    frame.header["n_nonfinite"] = n_bad
    return frame


# --------------------------------------------------------------------------- CFA patterns


def shift_cfa_pattern(pattern: str, dx: int, dy: int) -> str:
    """Pattern whose cell (x, y) is ``pattern``'s cell ((x + dx) % 2, (y + dy) % 2).

    That is the pattern of an image whose first pixel sits at (dx, dy) of the named grid,
    the meaning of FITS XBAYROFF/YBAYROFF.
    """
    cells = [[pattern[0], pattern[1]], [pattern[2], pattern[3]]]
    return "".join(cells[(r + dy) % 2][(c + dx) % 2] for r in range(2) for c in range(2))


def flip_cfa_pattern_rows(pattern: str, height_px: int) -> str:
    """Pattern of an image of ``height_px`` rows after flipping it upside down."""
    # New row r was old row H-1-r; only its parity matters.
    return "".join(pattern[2 * ((height_px - 1 - r) % 2) + c] for r in range(2) for c in range(2))


def normalise_cfa_pattern(value) -> str | None:
    """Upper-case 4-letter RGB pattern, or None when ``value`` is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    if len(text) == 4 and set(text) <= set("RGB") and len(set(text)) == 3:
        return text
    return None


# --------------------------------------------------------------------------- FITS


def _open_fits(path, size: int):
    """Open a FITS file with astropy; FrameError when it is not one or its header is cut off."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fits.open(path, memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError, EOFError) as exc:
        head = _read_head(path, 80)
        if head.startswith(b"SIMPLE  =") and not _has_end_card(path):
            raise FrameError(
                path, f"truncated FITS file (header has no END card; file is {size} bytes)"
            ) from None
        raise FrameError(path, f"not a readable FITS file ({_short(exc)})") from None


def _read_head(path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _has_end_card(path) -> bool:
    """True when the (uncompressed) file has an END card at an 80-byte card boundary."""
    if file_suffix(path).endswith((".gz", ".bz2")):
        return True  # cannot tell cheaply; let astropy's message stand
    with open(path, "rb") as fh:
        while True:
            block = fh.read(FITS_BLOCK_BYTES)
            if not block:
                return False
            for start in range(0, len(block), 80):
                if block[start : start + 8] == b"END     ":
                    return True


def _short(exc) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def _image_hdu_index(hdul) -> int | None:
    """Index of the first HDU holding 2D or 3D image data (not necessarily HDU 0)."""
    from astropy.io import fits

    for index, hdu in enumerate(hdul):
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        shape = _hdu_shape(hdu.header, isinstance(hdu, fits.CompImageHDU))
        if len(shape) in (2, 3) and all(n > 0 for n in shape):
            return index
    return None


def _hdu_shape(header, compressed: bool) -> tuple[int, ...]:
    """numpy shape (slowest axis first) declared by an image header."""
    naxis = int(header.get("NAXIS", 0) or 0)
    shape = tuple(int(header.get(f"NAXIS{i}", 0) or 0) for i in range(naxis, 0, -1))
    # A 3D cube with a single plane is a 2D image for our purposes.
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _check_fits_complete(path, hdu, size: int) -> None:
    info = hdu.fileinfo()
    if info is None or file_suffix(path).endswith((".gz", ".bz2")):
        return
    expected = int(info["datLoc"]) + int(info["datSpan"])
    if size < expected:
        raise FrameError(path, f"truncated FITS file (expected {expected} bytes, found {size})")


def _load_fits(path, size: int) -> RawFrame:
    hdul = _open_fits(path, size)
    try:
        index = _image_hdu_index(hdul)
        if index is None:
            raise FrameError(path, "FITS file has no 2D or 3D image data in any HDU")
        hdu = hdul[index]
        _check_fits_complete(path, hdu, size)
        header = hdu.header
        # Keys written before compression sit in the primary header of a .fz file.
        primary = hdul[0].header if index != 0 else header
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = hdu.data
        except (OSError, ValueError, TypeError, EOFError) as exc:
            raise FrameError(path, f"cannot decode FITS image data ({_short(exc)})") from None
        if raw is None:
            raise FrameError(path, "FITS file has no 2D or 3D image data in any HDU")
        white = _white_level_for_dtype(raw.dtype)
        data = np.asarray(raw, dtype=np.float32)
        data = _fits_to_image_shape(path, data)
        cfa = _fits_cfa_pattern(header, primary) if data.ndim == 2 else None
        if cfa is not None:
            offset_x = int(_first_key(header, primary, ("XBAYROFF", "BAYOFFX")) or 0)
            offset_y = int(_first_key(header, primary, ("YBAYROFF", "BAYOFFY")) or 0)
            cfa = shift_cfa_pattern(cfa, offset_x, offset_y)
        row_order = str(_first_key(header, primary, ("ROWORDER",)) or "").strip().upper()
        if row_order == "BOTTOM-UP":
            data = np.ascontiguousarray(data[..., ::-1, :])
            if cfa is not None:
                cfa = flip_cfa_pattern_rows(cfa, data.shape[-2])
        return _fits_frame(path, data, cfa, header, primary, white, index, row_order)
    finally:
        hdul.close()


def _fits_to_image_shape(path, data: np.ndarray) -> np.ndarray:
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim == 3 and data.shape[0] != 3:
        raise FrameError(path, f"3D FITS with {data.shape[0]} planes is not an RGB image")
    return np.ascontiguousarray(data)


def _white_level_for_dtype(dtype) -> float | None:
    """Saturation level of integer input in its own units; None for float data."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        return float(np.iinfo(dtype).max)
    return None


def _first_key(header, primary, keys):
    for source in (header, primary):
        for key in keys:
            value = source.get(key)
            if value is not None and not (isinstance(value, str) and not value.strip()):
                return value
    return None


def _fits_cfa_pattern(header, primary) -> str | None:
    for key in ("BAYERPAT", "COLORTYP"):
        pattern = normalise_cfa_pattern(_first_key(header, primary, (key,)))
        if pattern is not None:
            return pattern
    # PANOPTES writes the Bayer pattern into FILTER; accept it only as an exact pattern.
    return normalise_cfa_pattern(_first_key(header, primary, ("FILTER",)))


def _as_float(value) -> float | None:
    """A header value as float, also from strings such as '11 C'; None if not numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.number)):
        number = float(value)
        return number if np.isfinite(number) else None
    text = str(value).strip().split(" ")[0]
    try:
        number = float(text)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


def _as_text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _fits_frame(path, data, cfa, header, primary, white, index, row_order) -> RawFrame:
    def get(*keys):
        return _first_key(header, primary, keys)

    gain = _as_float(get("GAIN", "EGAIN"))
    iso = _as_float(get("ISOSPEED", "ISO"))
    if gain is None and iso is not None:
        gain = iso
    extra = {
        "format": "fits",
        "hdu": index,
        "telescope": _as_text(get("TELESCOP")),
        "filter": _as_text(get("FILTER")),
        "object": _as_text(get("OBJECT")),
        "frame_type": _as_text(get("IMAGETYP", "FRAME", "FRAMETYP")),
        "temperature_c": _as_float(get("CCD-TEMP", "CCD_TEMP", "SET-TEMP", "CAMTEMP")),
        "row_order": row_order or None,
        "binning": _as_float(get("XBINNING")),
    }
    return RawFrame(
        data=data,
        cfa_pattern=cfa,
        source=Path(path).name,
        exptime_s=_as_float(get("EXPTIME", "EXPOSURE")),
        date_obs=_as_text(get("DATE-OBS", "DATE_OBS")),
        instrument=_as_text(get("INSTRUME")),
        gain=gain,
        iso=iso,
        black_level=0.0,
        white_level=white,
        focal_mm=_as_float(get("FOCALLEN")),
        pixel_um=_as_float(get("XPIXSZ", "PIXSIZE1")),
        header={k: v for k, v in extra.items() if v is not None},
    )


def _fits_size(path, size: int) -> tuple[int, int]:
    from astropy.io import fits

    hdul = _open_fits(path, size)
    try:
        index = _image_hdu_index(hdul)
        if index is None:
            raise FrameError(path, "FITS file has no 2D or 3D image data in any HDU")
        hdu = hdul[index]
        shape = _hdu_shape(hdu.header, isinstance(hdu, fits.CompImageHDU))
        return int(shape[-1]), int(shape[-2])
    finally:
        hdul.close()


# --------------------------------------------------------------------------- camera RAW


def _open_raw(path):
    import rawpy

    try:
        return rawpy.imread(str(path))
    except rawpy.LibRawError as exc:
        raise FrameError(
            path, f"not a camera RAW file LibRaw can read ({type(exc).__name__})"
        ) from None


def _raw_bayer_pattern(raw) -> str | None:
    """'RGGB'-style pattern of the visible mosaic, or None when it is not a 2x2 Bayer mosaic."""
    pattern = raw.raw_pattern
    if pattern is None or np.shape(pattern) != (2, 2):
        return None
    desc = raw.color_desc.decode("ascii", "replace") if raw.color_desc else ""
    if len(desc) < 3 or raw.num_colors < 3:
        return None
    # LibRaw's 4th colour is the second green of "RGBG".
    letters = "".join("G" if desc[i] == "G" or i == 3 else desc[i] for i in np.ravel(pattern))
    return letters if letters in BAYER_PATTERNS else None


def _load_raw(path, size: int) -> RawFrame:
    """Camera RAW through LibRaw: the visible Bayer mosaic in ADU, or a linear RGB fallback.

    A non-Bayer sensor (X-Trans, Foveon, linear DNG) is interpolated by LibRaw with a
    linear 16-bit output, no white balance and no auto brightness: (3, H, W).
    """
    import rawpy

    raw = _open_raw(path)
    try:
        try:
            cfa = _raw_bayer_pattern(raw)
            if cfa is not None:
                data = np.array(raw.raw_image_visible, dtype=np.float32)
                black = float(np.mean(raw.black_level_per_channel))
                white = float(raw.white_level)
            else:
                rgb = raw.postprocess(
                    gamma=(1, 1), no_auto_bright=True, output_bps=16,
                    use_camera_wb=False, user_flip=0,
                )  # fmt: skip
                data = np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32)
                black, white = 0.0, 65535.0
        except rawpy.LibRawError as exc:
            raise FrameError(
                path, f"truncated or corrupt camera RAW file ({type(exc).__name__})"
            ) from None
        other = raw.other
        iso = _positive(other.iso_speed)
        return RawFrame(
            data=data,
            cfa_pattern=cfa,
            source=Path(path).name,
            exptime_s=_positive(other.shutter_speed),
            date_obs=_raw_timestamp(other.timestamp),
            instrument=_tiff_camera_name(path),
            gain=iso,
            iso=iso,
            black_level=black,
            white_level=white,
            focal_mm=_positive(other.focal_length),
            pixel_um=None,
            header={"format": "raw"},
        )
    finally:
        raw.close()


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _raw_timestamp(value) -> str | None:
    """LibRaw's capture time (camera clock, zone unknown) as ISO 8601; None if unset."""
    if isinstance(value, _dt.datetime):
        moment = value
    else:
        seconds = _positive(value)
        if seconds is None:
            return None
        moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).replace(tzinfo=None)
    if moment.year < 1980:
        return None
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


def _tiff_camera_name(path) -> str | None:
    """'Make Model' from a TIFF-based RAW (CR2, NEF, DNG...), None when not readable."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            make = _as_text(tags["Make"].value) if "Make" in tags else None
            model = _as_text(tags["Model"].value) if "Model" in tags else None
    except Exception:  # noqa: BLE001 - any failure just means "unknown camera"
        return None
    return _camera_name(make, model)


def _camera_name(make, model) -> str | None:
    make, model = _as_text(make), _as_text(model)
    if make and model and model.lower().startswith(make.lower().split(" ")[0]):
        return model
    return " ".join(x for x in (make, model) if x) or None


def _raw_size(path, size: int) -> tuple[int, int]:
    raw = _open_raw(path)
    try:
        sizes = raw.sizes
        return int(sizes.width), int(sizes.height)
    finally:
        raw.close()


# --------------------------------------------------------------------------- TIFF, PNG, JPEG


def _colour_to_planes(path, pixels: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) pixels -> float32 (H, W) or (3, H, W).

    Alpha is dropped; grey + alpha becomes grey.
    """
    if pixels.ndim == 2:
        return np.ascontiguousarray(pixels, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[-1] in (1, 2, 3, 4):
        channels = pixels.shape[-1]
        if channels <= 2:  # grey or grey + alpha
            return np.ascontiguousarray(pixels[..., 0], dtype=np.float32)
        return np.ascontiguousarray(np.moveaxis(pixels[..., :3], -1, 0), dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[0] in (3, 4):
        return np.ascontiguousarray(pixels[:3], dtype=np.float32)
    raise FrameError(path, f"unsupported image layout {pixels.shape}")


def _load_tiff(path, size: int) -> RawFrame:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            pixels = page.asarray()
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files
        raise FrameError(path, f"not a readable TIFF file ({_short(exc)})") from None
    data = _colour_to_planes(path, pixels)
    exif = _pillow_exif(path)
    return _picture_frame(path, data, _white_level_for_dtype(pixels.dtype), exif, "tiff")


def _load_picture(path, size: int) -> RawFrame:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            exif = _exif_fields(image)
            pixels, white = _pillow_pixels(image)
    except (OSError, SyntaxError, ValueError) as exc:
        reason = _short(exc)
        if "truncated" in reason.lower():
            raise FrameError(path, f"truncated image file ({reason})") from None
        raise FrameError(path, f"not a readable PNG/JPEG image ({reason})") from None
    data = _colour_to_planes(path, pixels)
    return _picture_frame(path, data, white, exif, Path(path).suffix.lower().lstrip("."))


def _pillow_pixels(image) -> tuple[np.ndarray, float | None]:
    """Pixels of a Pillow image as a numpy array and the white level in the same units."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.uint16), 65535.0
    if mode == "I":  # 16-bit PNG greyscale decodes to 32-bit ints
        pixels = np.asarray(image)
        return pixels, 65535.0 if pixels.max(initial=0) <= 65535 else None
    if mode == "F":
        return np.asarray(image), None
    if mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    return np.asarray(image), 255.0


def _pillow_exif(path) -> dict:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return _exif_fields(image)
    except Exception:  # noqa: BLE001 - EXIF is optional
        return {}


def _exif_fields(image) -> dict:
    """Capture time, exposure, ISO, focal length and camera from a Pillow image's EXIF."""
    try:
        exif = image.getexif()
        sub = exif.get_ifd(0x8769)
    except Exception:  # noqa: BLE001 - malformed EXIF is ignored
        return {}
    date = sub.get(36867) or sub.get(36868) or exif.get(306)
    iso = sub.get(34855)
    if isinstance(iso, (tuple, list)):
        iso = iso[0] if iso else None
    return {
        "date_obs": _exif_date(date),
        "exptime_s": _positive(sub.get(33434)),
        "iso": _positive(iso),
        "focal_mm": _positive(sub.get(37386)),
        "instrument": _camera_name(exif.get(271), exif.get(272)),
    }


def _exif_date(value) -> str | None:
    """EXIF 'YYYY:MM:DD HH:MM:SS' (camera clock) -> ISO 8601 'YYYY-MM-DDTHH:MM:SS'."""
    text = _as_text(value)
    if not text:
        return None
    try:
        return _dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _picture_frame(path, data, white, exif, fmt) -> RawFrame:
    iso = exif.get("iso")
    return RawFrame(
        data=data,
        cfa_pattern=None,
        source=Path(path).name,
        exptime_s=exif.get("exptime_s"),
        date_obs=exif.get("date_obs"),
        instrument=exif.get("instrument"),
        gain=iso,
        iso=iso,
        black_level=0.0,
        white_level=white,
        focal_mm=exif.get("focal_mm"),
        pixel_um=None,
        header={"format": fmt},
    )


def _tiff_size(path, size: int) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    except Exception as exc:  # noqa: BLE001
        raise FrameError(path, f"not a readable TIFF file ({_short(exc)})") from None


def _picture_size(path, size: int) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(image.size[0]), int(image.size[1])
    except (OSError, SyntaxError, ValueError) as exc:
        raise FrameError(path, f"not a readable PNG/JPEG image ({_short(exc)})") from None


__all__ = [
    "RawFrame",
    "SUPPORTED_EXTENSIONS",
    "load_frame",
    "image_size",
    "is_image_file",
    "file_suffix",
    "shift_cfa_pattern",
    "flip_cfa_pattern_rows",
    "normalise_cfa_pattern",
]
