"""Boxes of tile-compressed calibrated frames, decoded with the per-file work done once.

The stack reads one small box of every frame for every output tile: 713,000 boxes for 500
frames of 24 MP. astropy's ``CompImageHDU.section`` re-reads the compressed table's header
cards and converts its descriptor columns on every slice, which is half of the time of a
170 x 170 x 3 px box (benchmarks/README.md). ``CompressedBoxes`` reads them once per file
and then decodes only the touched tiles, with astropy's own RICE_1 decoder and
unquantiser, so the values are astropy's bit for bit. Files of another kind (another
algorithm, lossless or unquantised tiles, scaled integers) are read through the section.
"""

from __future__ import annotations

import numpy as np

try:  # astropy's tile codecs (astropy >= 5.3); without them every read uses the section
    from astropy.io.fits.hdu.compressed._codecs import Rice1
    from astropy.io.fits.hdu.compressed._quantization import DITHER_METHODS, Quantize
    from astropy.io.fits.hdu.compressed._tiled_compression import _header_to_settings
except ImportError:  # pragma: no cover - depends on the installed astropy
    Rice1 = Quantize = DITHER_METHODS = _header_to_settings = None

RICE_TYPES = ("RICE_1", "RICE_ONE")


def supports(hdu) -> bool:
    """True if ``hdu`` (a CompImageHDU) is a quantised RICE_1 float image of 3 axes, the
    kind the workflow writes, so CompressedBoxes can decode it."""
    table = getattr(hdu, "_bintable", None)
    if Rice1 is None or table is None or len(hdu.shape) != 3:
        return False
    header = table.header
    return (
        header.get("ZCMPTYPE") in RICE_TYPES
        and header.get("ZBITPIX") == -32
        and "ZSCALE" in table.columns.names
        and "ZZERO" in table.columns.names
        and header.get("ZQUANTIZ", "NO_DITHER") in DITHER_METHODS
        and hdu.header.get("BSCALE", 1) == 1
        and hdu.header.get("BZERO", 0) == 0
    )


class CompressedBoxes:
    """Read-only (C, H, W) float32 boxes of a tile-compressed image: ``boxes[c0:c1, y0:y1,
    x0:x1]`` decodes only the compression tiles the box touches.

    Other indexing (steps, integers, Ellipsis) goes to astropy's ``hdu.section``, as does a
    box touching a tile stored losslessly (a tile cfitsio could not quantise). Keep the
    HDU's file open while reading.
    """

    def __init__(self, hdu):
        table = hdu._bintable
        header = dict(table.header)
        self._section = hdu.section
        self._table = table
        self.shape = tuple(int(n) for n in hdu.shape)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)
        # FITS lists tile sizes x first; the image axes are (C, H, W)
        self._tile = tuple(int(header.get(f"ZTILE{i}", 1)) for i in (3, 2, 1))
        self._n_tiles = tuple(-(-n // t) for n, t in zip(self.shape, self._tile))
        self._rice = _header_to_settings(header)  # blocksize, bytepix (astropy's defaults)
        self._dither = DITHER_METHODS[header.get("ZQUANTIZ", "NO_DITHER")]
        self._dither_seed = int(header.get("ZDITHER0", 0))
        self._blank = header.get("ZBLANK", hdu.header.get("BLANK"))
        self._columns = None  # read on the first box: opening a frame only to check it is cheap

    def _load_columns(self):
        data = self._table.data
        descriptors = np.array(data["COMPRESSED_DATA"]).astype(np.int64)
        names = data.dtype.names
        self._columns = {
            "size": descriptors[:, 0],
            "offset": descriptors[:, 1],
            "zscale": np.array(data["ZSCALE"], dtype=np.float64),
            "zzero": np.array(data["ZZERO"], dtype=np.float64),
            "zblank": np.array(data["ZBLANK"], dtype=np.int64) if "ZBLANK" in names else None,
        }
        table = self._table
        self._heap = table._get_raw_data(
            table.header["PCOUNT"], np.uint8, table._data_offset + table._theap)

    def _box(self, index):
        """(start, stop) per axis of a tuple of three step-1 slices, or None."""
        if not isinstance(index, tuple) or len(index) != 3:
            return None
        bounds = []
        for item, n in zip(index, self.shape):
            if not isinstance(item, slice):
                return None
            start, stop, step = item.indices(n)
            if step != 1 or stop <= start:
                return None
            bounds.append((start, stop))
        return bounds

    def __getitem__(self, index):
        bounds = self._box(index)
        if bounds is None:
            return self._section[index]
        if self._columns is None:
            self._load_columns()
        (c0, c1), (y0, y1), (x0, x1) = bounds
        tc_n, ty_n, tx_n = self._tile
        out = np.empty((c1 - c0, y1 - y0, x1 - x0), dtype=np.float32)
        for tc in range(c0 // tc_n, (c1 - 1) // tc_n + 1):
            for ty in range(y0 // ty_n, (y1 - 1) // ty_n + 1):
                for tx in range(x0 // tx_n, (x1 - 1) // tx_n + 1):
                    # the tile's extent in the image, clipped at the image's edges
                    lo = (tc * tc_n, ty * ty_n, tx * tx_n)
                    hi = tuple(min(a + t, n) for a, t, n in zip(lo, (tc_n, ty_n, tx_n),
                                                                 self.shape))
                    values = self._decode(tc, ty, tx, tuple(b - a for a, b in zip(lo, hi)))
                    if values is None:  # a lossless tile: astropy reads the whole box
                        return self._section[index]
                    # the part of the tile inside the box
                    part = tuple((max(a, s), min(b, e))
                                 for a, b, (s, e) in zip(lo, hi, bounds))
                    out[tuple(slice(p0 - s, p1 - s) for (p0, p1), (s, _) in zip(part, bounds))
                        ] = values[tuple(slice(p0 - a, p1 - a) for (p0, p1), a in zip(part, lo))]
        return out

    def _decode(self, tc: int, ty: int, tx: int, tile_shape: tuple):
        """One tile's float32 values, or None when it is not stored RICE-compressed."""
        row = (tc * self._n_tiles[1] + ty) * self._n_tiles[2] + tx  # x varies fastest
        size = int(self._columns["size"][row])
        if size == 0:
            return None
        offset = int(self._columns["offset"][row])
        n_values = tile_shape[0] * tile_shape[1] * tile_shape[2]
        codec = Rice1(**self._rice, tilesize=n_values)
        quantised = codec.decode(self._heap[offset:offset + size])[:n_values]
        blank = self._blank
        if self._columns["zblank"] is not None:
            blank = self._columns["zblank"][row]
        unquantise = Quantize(row=row + self._dither_seed if self._dither != -1 else 0,
                              dither_method=self._dither, quantize_level=None, bitpix=-32)
        values = np.asarray(unquantise.decode_quantized(
            quantised, self._columns["zscale"][row], self._columns["zzero"][row]))
        values = values.reshape(tile_shape)
        if blank is not None:
            missing = (quantised == blank).reshape(tile_shape)
            if missing.any():
                values = values.copy()
                values[missing] = np.nan
        return values
