"""Reading and writing nightstack's artifacts: FITS images, star catalogs, JSON.

Every writer goes through a temporary file in the destination folder and an atomic
rename, so a killed job never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

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


def write_fits_image(path, data, header=None, extra_hdus=()) -> None:
    """Write a float32 image (H, W) or (C, H, W) with a header dict or fits.Header."""
    hdr = header if isinstance(header, fits.Header) else fits.Header()
    if isinstance(header, dict):
        for key, value in header.items():
            hdr[key] = value
    primary = fits.PrimaryHDU(
        data=None if data is None else np.asarray(data, dtype=np.float32), header=hdr
    )
    with atomic_path(path, ".fits") as tmp:
        fits.HDUList([primary, *extra_hdus]).writeto(tmp, overwrite=True)


def read_fits_image(path, memmap=True):
    """Return (data or None, header) from the primary HDU of a nightstack FITS file."""
    with fits.open(path, memmap=memmap) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data
        if data is not None and not memmap:
            data = np.array(data)
    return data, header


def open_fits_data(path):
    """Memory-mapped primary data of a nightstack FITS file (no copy into memory)."""
    hdul = fits.open(path, memmap=True, lazy_load_hdus=True)
    return hdul, hdul[0].data


def write_catalog(path, table: Table) -> None:
    """Write a star catalog (astropy Table with meta) as ECSV."""
    with atomic_path(path, ".ecsv") as tmp:
        table.write(tmp, format="ascii.ecsv", overwrite=True)


def read_catalog(path) -> Table:
    return Table.read(path, format="ascii.ecsv")
