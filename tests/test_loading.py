"""Tests for nightstack.loading: every real data set, synthetic FITS/DNG/TIFF/PNG/JPEG, errors."""

import bz2
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rawpy
import tifffile
from astropy.io import fits
from PIL import Image

from nightstack import loading
from nightstack.errors import FrameError
from nightstack.loading import (
    RawFrame,
    flip_cfa_pattern_rows,
    image_size,
    is_image_file,
    load_frame,
    shift_cfa_pattern,
)

COLOUR_INDEX = {"R": 0, "G": 1, "B": 2}


def image_files(folder: Path):
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def assert_size_matches(path, frame: RawFrame):
    assert image_size(path) == (frame.data.shape[-1], frame.data.shape[-2])


def colour_coded_mosaic(height, width, pattern, values=(1000.0, 500.0, 100.0)):
    """A mosaic whose pixels hold a distinct value per CFA colour (R, G, B)."""
    mosaic = np.empty((height, width), dtype=np.uint16)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = values[COLOUR_INDEX[pattern[2 * dy + dx]]]
    return mosaic


def write_dng(path, mosaic: np.ndarray, pattern: str, black=64, white=4095):
    """Minimal CFA DNG (what rawpy/LibRaw needs): CFA photometric + pattern + DNG version."""
    cfa_codes = tuple(COLOUR_INDEX[c] for c in pattern)
    tags = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, cfa_codes, True),  # CFAPattern (0=R, 1=G, 2=B)
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50714, "H", 1, black, True),  # BlackLevel
        (50717, "I", 1, white, True),  # WhiteLevel
    ]
    tifffile.imwrite(path, mosaic, photometric=32803, extratags=tags)


# ------------------------------------------------------------------ real data sets


def test_als_m27_fits_rggb(shared_data):
    folder = shared_data("als_m27_asi224mc")
    files = image_files(folder)
    assert len(files) == 6
    for path in files:
        frame = load_frame(path)
        assert frame.data.shape == (976, 1304) and frame.data.dtype == np.float32
        assert frame.cfa_pattern == "RGGB"
        assert frame.exptime_s == 6.0 and frame.date_obs.startswith("2018-09-07T22:")
        assert frame.instrument == "ZWO CCD ASI224MC"
        assert frame.gain == 180 and frame.pixel_um == 3.75 and frame.focal_mm == 510
        assert frame.white_level == 65535 and frame.black_level == 0
        assert frame.header["n_nonfinite"] == 0
        assert_size_matches(path, frame)
    # uint16 with BZERO comes back as the true ADU values
    reference = fits.getdata(files[0]).astype(np.float64)
    assert np.array_equal(load_frame(files[0]).data, reference)


def test_seestar_fits_grbg(shared_data):
    files = image_files(shared_data("seestar_ngc7023_s50"))
    assert len(files) == 6
    exposures = set()
    for path in files:
        frame = load_frame(path)
        assert frame.data.shape == (1920, 1080)
        assert frame.cfa_pattern == "GRBG"
        assert frame.pixel_um == pytest.approx(2.9) and frame.focal_mm == 250
        assert 30 < frame.header["temperature_c"] < 35
        assert frame.data.max() <= 65535 and frame.data.min() >= 0
        exposures.add(frame.exptime_s)
        assert frame.source == path.name  # names with spaces survive
    assert exposures == {10.0, 20.0}
    assert_size_matches(files[0], load_frame(files[0]))


def test_panoptes_fits_filter_pattern_and_fz(shared_data):
    folder = shared_data("panoptes_canon_crops")
    plain = load_frame(folder / "unsolved.fits")
    packed = load_frame(folder / "solved.fits.fz")
    for frame, path in ((plain, folder / "unsolved.fits"), (packed, folder / "solved.fits.fz")):
        assert frame.data.shape == (700, 700)
        assert frame.cfa_pattern == "RGGB"  # from FILTER='RGGB', no BAYERPAT
        assert frame.exptime_s == pytest.approx(120.4)
        assert frame.iso == 100 and frame.gain == 100
        assert_size_matches(path, frame)
    assert packed.header["hdu"] == 1  # tile-compressed image is not in HDU 0
    assert plain.header["temperature_c"] == 11.0  # CAMTEMP = '11 C'
    with fits.open(folder / "solved.fits.fz") as hdul:
        assert np.array_equal(packed.data, hdul[1].data.astype(np.float32))


def test_kodak_raw_through_rawpy(shared_data):
    path = shared_data("raw_kodak_dc50") / "RAW_KODAK_DC50.KDC"
    frame = load_frame(path)
    with rawpy.imread(str(path)) as raw:
        desc = raw.color_desc.decode()
        expected = "".join("G" if i == 3 else desc[i] for i in raw.raw_pattern.ravel())
        assert np.array_equal(frame.data, raw.raw_image_visible.astype(np.float32))
        assert frame.white_level == raw.white_level
    assert frame.cfa_pattern == expected == "GRBG"
    assert frame.data.shape == (512, 768)
    assert frame.iso == pytest.approx(84) and frame.exptime_s == pytest.approx(0.00435, rel=1e-3)
    assert frame.date_obs.startswith("1997-04-23")
    assert frame.focal_mm == pytest.approx(37)
    assert_size_matches(path, frame)


def test_dslr_jpeg_colour(shared_data):
    path = image_files(shared_data("dslr_canon_jpeg_pair"))[0]
    frame = load_frame(path)
    assert frame.data.shape == (3, 3456, 5184)
    assert frame.cfa_pattern is None and frame.white_level == 255
    assert 0 <= frame.data.min() and frame.data.max() <= 255
    assert_size_matches(path, frame)


def test_startrail_jpeg_exif(shared_data):
    files = image_files(shared_data("startrail_canon40d_trees"))
    assert len(files) == 6
    frame = load_frame(files[0])
    assert frame.data.shape == (3, 427, 640)
    assert frame.exptime_s == 30 and frame.iso == 100 and frame.focal_mm == 10
    assert frame.date_obs == "2009-09-08T19:47:39"
    assert frame.instrument == "Canon EOS 40D"
    times = [load_frame(p).date_obs for p in files]
    assert times == sorted(times) and len(set(times)) == 6


def test_tetra3_tiff_mono16(shared_data):
    files = image_files(shared_data("tetra3_widefield_tiff"))
    assert len(files) == 4
    for path in files:
        frame = load_frame(path)
        assert frame.data.shape == (768, 1024) and frame.cfa_pattern is None
        assert frame.white_level == 65535
        assert np.array_equal(frame.data, tifffile.imread(path).astype(np.float32))
        assert_size_matches(path, frame)


# ------------------------------------------------------------------ camera RAW (DNG)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_dng_bayer_mosaic_via_rawpy(tmp_path, pattern):
    mosaic = colour_coded_mosaic(40, 62, pattern)
    mosaic[5, 7] += 3  # a marker to prove no flip/crop happened
    path = tmp_path / "frame.dng"
    write_dng(path, mosaic, pattern, black=64, white=4095)
    frame = load_frame(path)
    assert frame.cfa_pattern == pattern
    assert np.array_equal(frame.data, mosaic.astype(np.float32))
    assert frame.black_level == 64 and frame.white_level == 4095
    assert image_size(path) == (62, 40)
    assert frame.data[0::2, 0::2].mean() == pytest.approx(
        (1000, 500, 100)[COLOUR_INDEX[pattern[0]]], abs=1
    )


def test_linear_dng_falls_back_to_rgb(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(200, 3000, (24, 36, 3)).astype(np.uint16)
    tags = [(50706, "B", 4, (1, 4, 0, 0), True), (50717, "I", 1, 4095, True)]
    path = tmp_path / "linear.dng"
    tifffile.imwrite(path, rgb, photometric=34892, extratags=tags)  # LinearRaw
    frame = load_frame(path)
    assert frame.cfa_pattern is None and frame.data.shape == (3, 24, 36)
    # linear output: each channel follows its input channel
    for c in range(3):
        corr = np.corrcoef(frame.data[c].ravel(), rgb[..., c].ravel())[0, 1]
        assert corr > 0.9


# ------------------------------------------------------------------ FITS variants


def test_fits_uint16_bzero_exact(tmp_path):
    data = np.array([[0, 1, 32767], [32768, 40000, 65535]], dtype=np.uint16)
    path = tmp_path / "u16.fits"
    fits.PrimaryHDU(data).writeto(path)
    frame = load_frame(path)
    assert np.array_equal(frame.data, data.astype(np.float32))
    assert frame.white_level == 65535 and frame.cfa_pattern is None


@pytest.mark.parametrize(
    "offsets, expected", [((0, 0), "RGGB"), ((1, 0), "GRBG"), ((0, 1), "GBRG"), ((1, 1), "BGGR")]
)
def test_fits_bayer_offsets_shift_pattern(tmp_path, offsets, expected):
    header = fits.Header({"BAYERPAT": "RGGB", "XBAYROFF": offsets[0], "YBAYROFF": offsets[1]})
    path = tmp_path / "off.fits"
    fits.PrimaryHDU(np.zeros((8, 10), np.uint16), header=header).writeto(path)
    assert load_frame(path).cfa_pattern == expected


@pytest.mark.parametrize("height", [40, 41])
@pytest.mark.parametrize("pattern", ["RGGB", "GRBG"])
def test_fits_bottom_up_is_flipped_with_its_pattern(tmp_path, pattern, height):
    top_down = colour_coded_mosaic(height, 30, pattern)
    top_down[2, 3] = 7  # marker near the top
    stored = top_down[::-1]  # a bottom-up writer stores the bottom row first
    header = fits.Header(
        {"BAYERPAT": flip_cfa_pattern_rows(pattern, height), "ROWORDER": "BOTTOM-UP"}
    )
    path = tmp_path / "bu.fits"
    fits.PrimaryHDU(stored, header=header).writeto(path)
    frame = load_frame(path)
    assert np.array_equal(frame.data, top_down.astype(np.float32))
    assert frame.cfa_pattern == pattern
    assert frame.data[2, 3] == 7


def test_flip_pattern_rules():
    assert flip_cfa_pattern_rows("RGGB", 976) == "GBRG"
    assert flip_cfa_pattern_rows("RGGB", 975) == "RGGB"
    assert shift_cfa_pattern("GRBG", 1, 1) == "GBRG"


@pytest.mark.parametrize(
    "cards, expected",
    [
        ({"COLORTYP": "BGGR"}, "BGGR"),
        ({"FILTER": "RGGB"}, "RGGB"),
        ({"FILTER": "Luminance"}, None),
        ({"FILTER": "RGB"}, None),
        ({"BAYERPAT": "GBRG", "FILTER": "RGGB"}, "GBRG"),
        ({}, None),
    ],
)
def test_fits_cfa_keywords(tmp_path, cards, expected):
    path = tmp_path / "k.fits"
    fits.PrimaryHDU(np.ones((6, 6), np.float32), header=fits.Header(cards)).writeto(path)
    assert load_frame(path).cfa_pattern == expected


def test_fits_image_in_extension_and_colour_cube(tmp_path):
    path = tmp_path / "ext.fits"
    cube = np.random.default_rng(0).random((3, 12, 16)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(cube)]).writeto(path)
    frame = load_frame(path)
    assert frame.data.shape == (3, 12, 16) and frame.cfa_pattern is None
    assert frame.header["hdu"] == 1 and frame.white_level is None
    assert np.array_equal(frame.data, cube)
    assert image_size(path) == (16, 12)


@pytest.mark.parametrize("suffix", [".fits.gz", ".fits.bz2", ".fz"])
def test_fits_compressed_variants(tmp_path, suffix):
    data = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    header = fits.Header({"BAYERPAT": "GBRG", "EXPTIME": 12.5})
    path = tmp_path / f"c{suffix}"
    if suffix == ".fz":
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header)]).writeto(path)
    elif suffix == ".fits.gz":
        fits.PrimaryHDU(data, header=header).writeto(path)  # astropy gzips by name
    else:
        plain = tmp_path / "plain.fits"
        fits.PrimaryHDU(data, header=header).writeto(plain)
        path.write_bytes(bz2.compress(plain.read_bytes()))
    frame = load_frame(path)
    assert np.array_equal(frame.data, data.astype(np.float32))
    assert frame.cfa_pattern == "GBRG" and frame.exptime_s == 12.5
    assert image_size(path) == (30, 20)


def test_nan_pixels_kept_and_counted(tmp_path):
    data = np.ones((10, 10), np.float32)
    data[2, 3] = np.nan
    data[4, 4] = np.inf
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(data).writeto(path)
    frame = load_frame(path)
    assert frame.header["n_nonfinite"] == 2 and np.isnan(frame.data[2, 3])


# ------------------------------------------------------------------ TIFF / PNG / JPEG


def test_rgb_tiff_16bit_to_planes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 65535, (20, 30, 3)).astype(np.uint16)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    frame = load_frame(path)
    assert frame.data.shape == (3, 20, 30) and frame.white_level == 65535
    assert np.array_equal(frame.data, np.moveaxis(rgb, -1, 0).astype(np.float32))
    assert image_size(path) == (30, 20)


def test_png_16bit_grey_and_rgba(tmp_path):
    grey = (np.arange(12 * 20).reshape(12, 20) * 200).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    frame = load_frame(path)
    assert frame.data.shape == (12, 20) and frame.white_level == 65535
    assert np.array_equal(frame.data, grey.astype(np.float32))

    rgba = np.random.default_rng(2).integers(0, 255, (12, 20, 4)).astype(np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    frame = load_frame(path)
    assert frame.data.shape == (3, 12, 20) and frame.white_level == 255
    assert np.array_equal(frame.data, np.moveaxis(rgba[..., :3], -1, 0).astype(np.float32))


def test_jpeg_exif_fields(tmp_path):
    image = Image.fromarray(np.full((16, 24, 3), 40, np.uint8))
    exif = Image.Exif()
    exif[271], exif[272] = "Nikon", "D750"
    sub = exif.get_ifd(0x8769)
    sub[36867] = "2021:03:04 05:06:07"
    sub[33434] = 25.0
    sub[34855] = 1600
    sub[37386] = 14.0
    path = tmp_path / "e.jpg"
    image.save(path, exif=exif)
    frame = load_frame(path)
    assert frame.date_obs == "2021-03-04T05:06:07"
    assert frame.exptime_s == 25 and frame.iso == 1600 and frame.gain == 1600
    assert frame.focal_mm == 14 and frame.instrument == "Nikon D750"


# ------------------------------------------------------------------ file names


@pytest.mark.parametrize(
    "name, ok",
    [
        ("a.FITS", True), ("b.fits.gz", True), ("c.FIT.BZ2", True), ("d.fz", True),
        ("e.CR2", True), ("f.nef", True), ("g.jpeg", True), ("h.TIFF", True),
        ("i.txt", False), ("j.gz", False), ("k", False), ("l.fits.zip", False),
    ],
)  # fmt: skip
def test_is_image_file(name, ok):
    assert is_image_file(name) is ok


def test_supported_extensions_are_lower_case_suffixes():
    assert all(s.startswith(".") and s == s.lower() for s in loading.SUPPORTED_EXTENSIONS)
    assert {".fits.gz", ".cr3", ".x3f", ".png"} <= loading.SUPPORTED_EXTENSIONS


# ------------------------------------------------------------------ errors


def reason_of(path) -> str:
    with pytest.raises(FrameError) as info:
        load_frame(path)
    assert info.value.path == str(path)
    return info.value.reason


def test_error_missing_file(tmp_path):
    assert reason_of(tmp_path / "nope.fits") == "file not found"


def test_error_zero_bytes(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    assert "empty file" in reason_of(path)


def test_error_unsupported_suffix(tmp_path):
    path = tmp_path / "notes.xyz"
    path.write_text("hello")
    assert reason_of(path) == "unsupported file type '.xyz'"
    with pytest.raises(FrameError):
        image_size(path)


def test_error_truncated_fits_data(shared_data, tmp_path):
    source = image_files(shared_data("seestar_ngc7023_s50"))[0]
    path = tmp_path / "cut.fit"
    path.write_bytes(source.read_bytes()[:100000])
    assert reason_of(path) == "truncated FITS file (expected 4152960 bytes, found 100000)"


def test_error_truncated_fits_header(shared_data, tmp_path):
    source = image_files(shared_data("seestar_ngc7023_s50"))[0]
    path = tmp_path / "cut.fit"
    path.write_bytes(source.read_bytes()[:1000])
    reason = reason_of(path)
    assert reason.startswith("truncated FITS file") and "1000 bytes" in reason
    with pytest.raises(FrameError):
        image_size(path)


def test_error_text_renamed_cr2(tmp_path):
    path = tmp_path / "IMG_0001.CR2"
    path.write_text("this is not a raw file\n" * 20)
    assert reason_of(path) == "not a camera RAW file LibRaw can read (LibRawFileUnsupportedError)"


def test_error_truncated_raw(shared_data, tmp_path):
    source = shared_data("raw_kodak_dc50") / "RAW_KODAK_DC50.KDC"
    path = tmp_path / "cut.kdc"
    path.write_bytes(source.read_bytes()[:5000])
    assert reason_of(path) == "truncated or corrupt camera RAW file (LibRawIOError)"


def test_error_truncated_jpeg(shared_data, tmp_path):
    source = image_files(shared_data("startrail_canon40d_trees"))[0]
    path = tmp_path / "cut.jpg"
    path.write_bytes(source.read_bytes()[:20000])
    assert "truncated" in reason_of(path)


def test_error_fits_without_image(tmp_path):
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.ones(3))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    assert reason_of(path) == "FITS file has no 2D or 3D image data in any HDU"


def test_error_nan_only(tmp_path):
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((5, 5), np.nan, np.float32)).writeto(path)
    assert "NaN" in reason_of(path)


def test_error_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.fits"
    fits.PrimaryHDU(np.ones((4, 4), np.float32)).writeto(path)
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # root ignores file modes: make open() refuse like the OS would
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refusing_open)
    try:
        assert reason_of(path) == "permission denied"
    finally:
        monkeypatch.undo()
        os.chmod(path, 0o644)


def test_error_folder_named_like_image(tmp_path):
    folder = tmp_path / "dir.fits"
    folder.mkdir()
    assert "folder" in reason_of(folder)
    shutil.rmtree(folder)
