"""Tile-compressed calibrated frames: quantisation error, NaNs, zeros, size, and every reader."""

import numpy as np
import pytest
import yaml
from astropy.io import fits
from workflow_helpers import REPO

from nightstack.camera import Camera, rotation_matrix
from nightstack.compressed_boxes import CompressedBoxes
from nightstack.errors import NightstackError
from nightstack.io import (
    COMPRESSED_HDU,
    calibrated_format,
    dither_seed,
    image_hdu,
    open_fits_data,
    read_catalog,
    read_fits_image,
    write_fits_image,
)
from nightstack.stacking import FrameWarp, StackConfig, stack_frames
from nightstack.steps import calibrate_step, stars_step
from nightstack.trails import read_trail_frame

SIGMA = 10.0  # ADU, pixel noise of the synthetic frames
SHAPE = (3, 300, 500)


def star_frame(seed=0, shape=SHAPE, sigma=SIGMA, n_stars=40):
    """(C, H, W) float32: sky 0 + white noise ``sigma`` + Gaussian stars (FWHM 3.5 px), a NaN
    corner (20 x 20) and an exact-zero band (rows 40-59), as the calibrate step can leave."""
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.zeros((h, w))
    for x, y, amp in zip(rng.uniform(30, w - 30, n_stars), rng.uniform(80, h - 30, n_stars),
                         rng.uniform(20, 300, n_stars)):
        image += amp * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.5**2)
    data = image[None] * np.array([1.0, 0.8, 0.6])[:, None, None] + rng.normal(0, sigma, shape)
    data = data.astype(np.float32)
    data[:, :20, :20] = np.nan
    data[:, 40:60, :] = 0.0
    return data


def write_both(folder, data, name="frame", header=None, seed=None):
    """The same frame written as float32 and compressed: (float32 path, compressed path)."""
    header = {"NSSTATUS": "ok", "SOURCE": name, **(header or {})}
    paths = folder / f"{name}_f32.fits", folder / f"{name}_rice.fits"
    write_fits_image(paths[0], data, header)
    write_fits_image(paths[1], data, header, compress=True, seed=seed or dither_seed(name))
    return paths


def test_round_trip_error_is_a_sixteenth_of_the_noise(tmp_path):
    data = star_frame()
    _, packed = write_both(tmp_path, data)
    back, header = read_fits_image(packed, memmap=False)
    assert back.dtype == np.float32 and back.shape == data.shape
    assert header["NSSTATUS"] == "ok"  # the cards stay in the primary header
    np.testing.assert_array_equal(np.isnan(back), np.isnan(data))  # NaN exactly where they were
    assert np.all(back[:, 40:60] == 0.0)  # zeros stay exact (SUBTRACTIVE_DITHER_2)
    err = (back - data)[np.isfinite(data)]
    # dithered quantisation: error uniform over one step = noise / 16
    assert np.std(err) <= 1.2 * SIGMA / 16 / np.sqrt(12), np.std(err)
    assert np.abs(err).max() <= 0.6 * SIGMA / 16, np.abs(err).max()
    assert abs(np.mean(err)) < 0.01 * SIGMA  # no bias


def test_compressed_file_is_about_five_times_smaller(tmp_path):
    plain, packed = write_both(tmp_path, star_frame())
    ratio = plain.stat().st_size / packed.stat().st_size
    assert 4.0 < ratio < 8.0, ratio  # ~6.6 bits a pixel instead of 32 for noise-dominated data


def test_reruns_write_identical_files_and_seeds_differ_by_frame(tmp_path):
    data = star_frame()
    _, first = write_both(tmp_path / "a", data, seed=dither_seed("light_001"))
    _, second = write_both(tmp_path / "b", data, seed=dither_seed("light_001"))
    _, other = write_both(tmp_path / "c", data, seed=dither_seed("light_002"))
    assert first.read_bytes() == second.read_bytes()
    assert dither_seed("light_001") != dither_seed("light_002")
    assert 1 <= dither_seed("light_001") <= 10000
    assert not np.array_equal(read_fits_image(first)[0], read_fits_image(other)[0], equal_nan=True)


def test_stack_reads_a_box_through_the_section(tmp_path):
    data = star_frame()
    _, packed = write_both(tmp_path, data)
    whole, _ = read_fits_image(packed)
    hdul, section = open_fits_data(packed)
    try:
        assert not isinstance(section, np.ndarray)  # lazy: nothing decompressed yet
        assert section.shape == data.shape and section.ndim == 3
        np.testing.assert_array_equal(section[:, 100:170, 300:420], whole[:, 100:170, 300:420])
    finally:
        del section
        hdul.close()
    with fits.open(packed) as hdul:
        assert COMPRESSED_HDU in hdul and hdul[0].data is None


def _random_boxes(shape, n, rng):
    """n (C, y, x) slice triples inside ``shape``: any channel range, 1-200 px sides."""
    c, h, w = shape
    boxes = []
    for _ in range(n):
        c0 = int(rng.integers(0, c))
        y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
        boxes.append((slice(c0, int(rng.integers(c0 + 1, c + 1))),
                      slice(y0, min(h, y0 + int(rng.integers(1, 200)))),
                      slice(x0, min(w, x0 + int(rng.integers(1, 200))))))
    return boxes


def test_box_reader_gives_astropys_values_bit_for_bit(tmp_path):
    # the stack's own tile decoder against astropy's section: NaN corner, zero band, image
    # edges (500 px is not a multiple of the 256 px tile width), single rows and columns
    data = star_frame(seed=4)
    _, packed = write_both(tmp_path, data)
    hdul, boxes = open_fits_data(packed)
    try:
        assert isinstance(boxes, CompressedBoxes)
        section = image_hdu(hdul).section
        chosen = _random_boxes(data.shape, 150, np.random.default_rng(7)) + [
            (slice(0, 3), slice(0, 300), slice(0, 500)),  # the whole image
            (slice(2, 3), slice(299, 300), slice(250, 500)),  # last row, last tile column
            (slice(0, 3), slice(0, 25), slice(0, 25)),  # the NaN corner
        ]
        for box in chosen:
            got = boxes[box]
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, section[box])
        # other indexing is astropy's
        np.testing.assert_array_equal(boxes[1, 5:9, ::2], section[1, 5:9, ::2])
    finally:
        del boxes
        hdul.close()


def test_box_reader_hands_lossless_tiles_to_astropy(tmp_path):
    # values beyond the int32 range of the quantised steps cannot be quantised: the tile is
    # stored losslessly (GZIP_COMPRESSED_DATA)
    data = star_frame(seed=5)
    data[:, 100, 300] = 3e12
    _, packed = write_both(tmp_path, data)
    hdul, boxes = open_fits_data(packed)
    try:
        sizes = np.array(image_hdu(hdul)._bintable.data["COMPRESSED_DATA"])[:, 0]
        assert (sizes == 0).any()  # the premise: some tile is stored losslessly
        box = (slice(0, 3), slice(50, 140), slice(200, 400))
        np.testing.assert_array_equal(boxes[box], image_hdu(hdul).section[box])
        assert np.all(boxes[:, 100:101, 300:301] == np.float32(3e12))
    finally:
        del boxes
        hdul.close()


def test_box_reader_leaves_other_compressed_images_to_astropy(tmp_path):
    path = tmp_path / "gzip.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(
        star_frame(seed=6), compression_type="GZIP_1", tile_shape=(1, 64, 256))]).writeto(path)
    hdul, data = open_fits_data(path)
    try:
        assert not isinstance(data, CompressedBoxes)
        assert data[:, 10:20, 30:40].shape == (3, 10, 10)
    finally:
        del data
        hdul.close()


def test_rejected_frame_stays_an_empty_primary(tmp_path):
    path = tmp_path / "rejected.fits"
    write_fits_image(path, None, {"NSSTATUS": "rejected"}, compress=True)
    data, header = read_fits_image(path)
    assert data is None and header["NSSTATUS"] == "rejected"
    hdul, section = open_fits_data(path)
    assert section is None
    hdul.close()


def _warps(paths, camera, rotations):
    return [FrameWarp(str(p), camera, camera, r, offset=np.zeros(3), scale=np.ones(3),
                      target_level=np.zeros(3)) for p, r in zip(paths, rotations)]


def _stack_both(tmp_path, method):
    """Stacks (float32 frames, compressed frames) of 5 rotated star frames, lanczos3."""
    camera = Camera(SHAPE[2], SHAPE[1], focal_px=600.0)
    rng = np.random.default_rng(3)
    rotations = [np.eye(3)] + [rotation_matrix(rng.normal(0, 2e-3, 3)) for _ in range(4)]
    pairs = [write_both(tmp_path, star_frame(seed=i), name=f"f{i}") for i in range(5)]
    cfg = StackConfig(method=method, interpolation="lanczos3", memory_mb=1)
    plain, _, info = stack_frames(_warps([p for p, _ in pairs], camera, rotations), SHAPE, cfg)
    packed, _, _ = stack_frames(_warps([c for _, c in pairs], camera, rotations), SHAPE, cfg)
    assert info["n_tiles"] >= 4  # several boxes read through the section
    np.testing.assert_array_equal(np.isfinite(plain), np.isfinite(packed))
    return plain, packed


def test_compressed_stack_matches_float32_far_below_the_noise(tmp_path):
    plain, packed = _stack_both(tmp_path, "mean")
    stack_noise = SIGMA / np.sqrt(5)
    diff = (packed - plain)[np.isfinite(plain)]
    # each frame's error is noise / 55 (uniform over noise / 16), averaged over 5 frames
    assert np.std(diff) < 0.02 * stack_noise, np.std(diff) / stack_noise
    assert np.abs(diff).max() < 0.15 * stack_noise


def test_clipped_stack_noise_unchanged(tmp_path):
    # Clipping flips at the odd pixel whatever the perturbation (even 1e-4 of the noise):
    # what must not change is the noise of the result.
    plain, packed = _stack_both(tmp_path, "winsorized")
    sky = np.isfinite(plain).all(axis=0)
    sky[:80] = False  # the NaN corner and the zero band, rotated
    sky &= np.abs(plain).max(axis=0) < 3 * SIGMA / np.sqrt(5)  # away from stars (in both)
    ratio = np.std(packed[:, sky]) / np.std(plain[:, sky])
    assert abs(ratio - 1) < 0.005, ratio


def _star_params():
    return yaml.safe_load((REPO / "config.yaml").read_text())["stars"]


def test_stars_agree_far_below_their_errors(tmp_path):
    plain, packed = write_both(tmp_path, star_frame(seed=5))
    stars_step(plain, tmp_path / "plain.ecsv", _star_params())
    stars_step(packed, tmp_path / "packed.ecsv", _star_params())
    a, b = read_catalog(tmp_path / "plain.ecsv"), read_catalog(tmp_path / "packed.ecsv")
    assert a.meta["status"] == b.meta["status"] == "ok" and len(a) >= 20
    assert len(a) == len(b)
    # catalogs are sorted by flux, so stars of nearly equal flux may swap places: pair by position
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(np.column_stack([b["x"], b["y"]])).query(np.column_stack([a["x"], a["y"]]))
    assert len(set(nearest)) == len(b)  # one to one
    b = b[nearest]
    # in units of each star's own error (FWHM / SNR, 1 / SNR): a Gaussian perturbation of the
    # same rms (noise / 55) moves fluxes by a median 0.05-0.07 and at most 0.25-0.77 of their
    # error (six noise draws; the flux fit is not linear in the pixels), positions by a median
    # 0.01 and at most 0.11
    d_xy = np.hypot(a["x"] - b["x"], a["y"] - b["y"]) * a["snr"] / a["fwhm_px"]
    d_flux = np.abs(a["flux"] - b["flux"]) / a["flux"] * a["snr"]
    assert np.median(d_xy) < 0.05 and np.max(d_xy) < 0.25, d_xy
    assert np.median(d_flux) < 0.1 and np.max(d_flux) < 1.0, d_flux
    assert np.median(b["fwhm_px"]) == pytest.approx(np.median(a["fwhm_px"]), rel=2e-3)
    np.testing.assert_allclose(a.meta["channel_noise"], b.meta["channel_noise"], rtol=0.01)


def test_trail_frames_read_compressed(tmp_path):
    data = star_frame()
    _, packed = write_both(tmp_path, data)
    frame, is_2d = read_trail_frame(packed, expected_shape=data.shape)
    assert not is_2d and frame.shape == data.shape
    np.testing.assert_allclose(frame, data, atol=SIGMA / 16)


def test_calibrate_step_rejects_an_unknown_format(tmp_path):
    with pytest.raises(NightstackError, match="calibrated_frames"):
        calibrate_step(tmp_path / "light.fits", tmp_path / "out.fits", {}, {}, {}, frame_format="float16")


@pytest.mark.parametrize(
    "setting, n_frames, megapixels, expected",
    [
        ("auto", 16, 24.0, "float32"),  # 4.6 GB
        ("auto", 500, 24.0, "compressed"),  # 144 GB
        ("auto", 500, 1.7, "float32"),  # 10 GB
        ("auto", 70, 24.0, "compressed"),  # 20.2 GB: just over
        ("auto", 69, 24.0, "float32"),  # 19.9 GB
        ("compressed", 2, 1.0, "compressed"),
        ("float32", 5000, 24.0, "float32"),
    ],
)
def test_calibrated_format_auto_keeps_float32_under_the_disk_limit(setting, n_frames, megapixels,
                                                                   expected):
    assert calibrated_format(setting, n_frames, megapixels, float32_max_gb=20) == expected


def test_calibrated_format_rejects_an_unknown_setting():
    with pytest.raises(NightstackError, match="auto, compressed, float32"):
        calibrated_format("zip", 10, 1.0, 20)
