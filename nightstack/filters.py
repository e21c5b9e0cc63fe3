"""Filters of 2D images (Gaussian blur, small convolutions, small medians) through OpenCV,
and the positions of a 2D mask's True pixels.

The kernels and borders are scipy.ndimage's; OpenCV's vectorised filters apply them in
float32, 5-15x faster than ndimage on a 24 MP frame (benchmarks/README.md).
The results equal ndimage's (which sums in float64) to float32 rounding: a few 1e-7 of
the largest value. Where OpenCV cannot give ndimage's answer (not 2D, a kernel wider than
the image, an even-sized kernel) the call goes to ndimage itself.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

# ndimage mode -> OpenCV border: the same padding rule under two names
BORDERS = {
    "nearest": cv2.BORDER_REPLICATE,  # a a a | a b c
    "reflect": cv2.BORDER_REFLECT,  # c b a | a b c
    "mirror": cv2.BORDER_REFLECT_101,  # c b | a b c
    "constant": cv2.BORDER_CONSTANT,  # 0 0 0 | a b c
}


def gaussian_kernel(sigma_px: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1D Gaussian (float64, odd length 2r+1 with r = int(truncate * sigma + 0.5)),
    as ndimage.gaussian_filter uses."""
    radius = int(truncate * float(sigma_px) + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 / float(sigma_px) ** 2 * x**2)
    return kernel / kernel.sum()


def _opencv_can_pad(image: np.ndarray, radius_px: int, mode: str) -> bool:
    # OpenCV reflects once; ndimage keeps reflecting when a kernel is wider than the image
    return image.ndim == 2 and mode in BORDERS and min(image.shape) > radius_px


def gaussian_filter(image, sigma_px: float, mode: str = "reflect", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of a 2D image: float32 (H, W), as ndimage.gaussian_filter(image,
    sigma_px, mode=mode, truncate=truncate). ``sigma_px`` <= 0 returns a float32 copy."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    if sigma_px <= 0:
        return img.copy()
    kernel = gaussian_kernel(sigma_px, truncate).astype(np.float32)
    if not _opencv_can_pad(img, kernel.size // 2, mode):
        return ndimage.gaussian_filter(img, sigma_px, mode=mode, truncate=truncate)
    return cv2.sepFilter2D(img, cv2.CV_32F, kernel, kernel, borderType=BORDERS[mode])


def convolve(image, kernel, mode: str = "mirror") -> np.ndarray:
    """2D convolution with a small odd-sized kernel: float32 (H, W), as
    ndimage.convolve(image, kernel, mode=mode) (constant mode pads with 0)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0 \
            or not _opencv_can_pad(img, max(kernel.shape) // 2, mode):  # fmt: skip
        return ndimage.convolve(img, kernel.astype(np.float32), mode=mode)
    # filter2D correlates: flipping the kernel makes it the convolution ndimage computes
    flipped = np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32)
    return cv2.filter2D(img, cv2.CV_32F, flipped, borderType=BORDERS[mode])


def median_filter(image, size_px: int = 3, mode: str = "nearest") -> np.ndarray:
    """Median over size_px x size_px windows of a 2D image: float32 (H, W), as
    ndimage.median_filter(image, size=size_px, mode=mode) rounded to float32.

    OpenCV's median blur (float32 windows of 3 or 5, edges repeated as mode "nearest") is
    exact: rounding to float32 keeps the order of the values, so the median of the rounded
    values is the rounded median. Other sizes and modes, and images with NaN (whose place in
    the order is undefined), go to ndimage.
    """
    img = np.ascontiguousarray(image, dtype=np.float32)
    if img.ndim != 2 or size_px not in (3, 5) or mode != "nearest" or min(img.shape) < size_px \
            or not np.isfinite(img).all():  # fmt: skip
        return ndimage.median_filter(img, size=size_px, mode=mode)
    return cv2.medianBlur(img, size_px)


def binary_dilation(mask, footprint) -> np.ndarray:
    """Dilation of a 2D bool mask by a bool footprint (odd sides), pixels outside False:
    bool (H, W), as ndimage.binary_dilation(mask, structure=footprint). Exact (OpenCV's
    dilate of bytes)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    footprint = np.asarray(footprint, dtype=bool)
    if mask.ndim != 2 or footprint.ndim != 2 or footprint.shape[0] % 2 == 0 or footprint.shape[1] % 2 == 0:
        return ndimage.binary_dilation(mask, structure=footprint)
    # OpenCV's dilation is a maximum over the footprint as placed, ndimage's over it mirrored
    kernel = np.ascontiguousarray(footprint[::-1, ::-1], dtype=np.uint8)
    grown = cv2.dilate(mask.view(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return grown.view(bool)


def nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2D bool array (rows, cols; same order), through numpy's 1D path:
    20x faster on a 24 MP mask."""
    flat = np.flatnonzero(mask)
    return np.divmod(flat, mask.shape[1])
