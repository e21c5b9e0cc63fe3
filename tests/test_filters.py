"""nightstack.filters: OpenCV filters give ndimage's results."""

import numpy as np
import pytest
from scipy import ndimage

from nightstack import filters
from nightstack.calibration import _G_AT_RB, _RB_AT_BR, _RB_AT_G_SAME_ROW


def _image(shape, seed=3):
    rng = np.random.default_rng(seed)
    img = rng.normal(1000.0, 30.0, shape).astype(np.float32)
    img[shape[0] // 3, shape[1] // 2] += 20000.0  # a star-like spike near the middle
    img[0, 0] += 5000.0  # and one in the corner, where the border rule decides
    return img


def _close(a, b):
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror", "constant"])
@pytest.mark.parametrize("sigma_px", [0.7, 1.0, 2.3, 6.0])
def test_gaussian_filter_equals_ndimage(mode, sigma_px):
    img = _image((61, 83))
    _close(filters.gaussian_filter(img, sigma_px, mode=mode), ndimage.gaussian_filter(img, sigma_px, mode=mode))


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror", "constant"])
@pytest.mark.parametrize("kernel", [_G_AT_RB, _RB_AT_G_SAME_ROW, _RB_AT_BR, np.arange(15.0).reshape(3, 5)])
def test_convolve_equals_ndimage(mode, kernel):
    img = _image((40, 57))
    _close(filters.convolve(img, kernel, mode=mode), ndimage.convolve(img, kernel.astype(np.float32), mode=mode))


def test_strided_views_and_other_dtypes_are_filtered_like_ndimage():
    img = _image((80, 90))
    view = img[::2, 1::2]  # the DoG pyramid halves its grid this way
    _close(filters.gaussian_filter(view, 1.5, mode="nearest"), ndimage.gaussian_filter(view, 1.5, mode="nearest"))
    as_uint16 = np.clip(img, 0, 65535).astype(np.uint16)
    _close(filters.gaussian_filter(as_uint16, 1.2),
           ndimage.gaussian_filter(as_uint16.astype(np.float32), 1.2))  # fmt: skip


def test_what_opencv_cannot_pad_goes_to_ndimage():
    tiny = _image((5, 40))  # a kernel of radius 8 reaches past the 5 rows more than once
    _close(filters.gaussian_filter(tiny, 2.0, mode="reflect"), ndimage.gaussian_filter(tiny, 2.0, mode="reflect"))
    even = np.ones((2, 4), np.float32)
    img = _image((30, 30))
    _close(filters.convolve(img, even, mode="nearest"), ndimage.convolve(img, even, mode="nearest"))


def test_zero_sigma_is_a_copy():
    img = _image((10, 12))
    out = filters.gaussian_filter(img, 0.0)
    np.testing.assert_array_equal(out, img)
    assert out is not img


def test_gaussian_kernel_is_ndimages():
    k = filters.gaussian_kernel(1.7)
    impulse = np.zeros(41)
    impulse[20] = 1.0
    np.testing.assert_allclose(k, ndimage.gaussian_filter1d(impulse, 1.7)[20 - k.size // 2: 21 + k.size // 2][::-1],
                               rtol=0, atol=1e-15)  # fmt: skip
    assert k.size == 2 * int(4 * 1.7 + 0.5) + 1 and abs(k.sum() - 1) < 1e-12


@pytest.mark.parametrize("size_px", [3, 5])
def test_median_filter_is_ndimages_rounded_to_float32(size_px):
    img = _image((45, 70)).astype(np.float64) + 1e-4  # float64 values between float32 ones
    img[10:14, 20:24] = 7000.0  # a flat block: ties
    expected = ndimage.median_filter(img, size=size_px, mode="nearest").astype(np.float32)
    np.testing.assert_array_equal(filters.median_filter(img, size_px), expected)


def test_median_filter_leaves_nan_images_and_other_modes_to_ndimage():
    img = _image((30, 40))
    img[5, 5] = np.nan
    np.testing.assert_array_equal(filters.median_filter(img, 3), ndimage.median_filter(img, size=3, mode="nearest"))
    clean = _image((30, 40))
    for size_px, mode in ((3, "reflect"), (7, "nearest")):
        np.testing.assert_array_equal(filters.median_filter(clean, size_px, mode=mode),
                                      ndimage.median_filter(clean, size=size_px, mode=mode))  # fmt: skip


def test_binary_dilation_equals_ndimage_including_asymmetric_footprints_and_borders():
    rng = np.random.default_rng(2)
    mask = rng.random((50, 64)) > 0.97
    mask[0, 0] = mask[-1, 10] = mask[20, -1] = True  # against every border
    lopsided = np.zeros((3, 5), bool)
    lopsided[0, 4] = lopsided[1, :] = True
    disk = np.add.outer(np.arange(-3, 4) ** 2, np.arange(-3, 4) ** 2) <= 9.5
    for footprint in (lopsided, disk, np.ones((1, 1), bool)):
        np.testing.assert_array_equal(filters.binary_dilation(mask, footprint),
                                      ndimage.binary_dilation(mask, structure=footprint))  # fmt: skip


def test_nonzero_2d_is_np_nonzero():
    rng = np.random.default_rng(4)
    for shape in ((37, 53), (1, 9), (9, 1), (0, 5)):
        mask = rng.random(shape) > 0.8
        rows, cols = filters.nonzero_2d(mask)
        expected_rows, expected_cols = np.nonzero(mask)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(cols, expected_cols)
