"""Sigma and winsorized clipping of sorted pixel stacks, one pixel at a time (numba).

Clipping iterates per pixel until nothing changes, and winsorizing iterates again inside
that until the pixel's sigma settles (up to 50 rounds). In numpy every round is several
passes over the whole (frames, pixels) block; here each pixel's values stay in cache while
it converges, which makes the stack step's rejection about 30x faster (benchmarks/README.md).

The arithmetic is the same as a vectorised version (float32 deviations, float64 sums in
rank order), so results do not depend on how pixels are grouped into tiles.
"""

from __future__ import annotations

import numpy as np
from numba import njit

WINSOR_FACTOR = 1.134  # Siril: corrects the std of a Gaussian winsorized at +-1.5 sigma
WINSOR_CLIP_SIGMA = 1.5
WINSOR_TOLERANCE = 5e-4  # relative change of sigma at which the winsorizing loop stops
WINSOR_MAX_ITERATIONS = 50


@njit(cache=True, nogil=True)
def _median(run, n):
    """Median (float64) of the first n sorted float32 values of ``run``."""
    return 0.5 * (np.float64(run[(n - 1) // 2]) + np.float64(run[n // 2]))


@njit(cache=True, nogil=True)
def _std(dev, n):
    """Sample standard deviation (float64) of the first n float32 deviations."""
    if n <= 1:
        return 0.0
    s1 = 0.0
    s2 = 0.0
    for k in range(n):
        d = np.float64(dev[k])
        s1 += d
        s2 += d * d
    var = (s2 - s1 * s1 / n) / (n - 1)
    return np.sqrt(max(var, 0.0))


@njit(cache=True, nogil=True)
def _winsorized_sigma(dev, n, sigma):
    """Siril's robust sigma: winsorize the deviations at +-1.5 sigma, sigma = 1.134 std,
    until it changes by less than WINSOR_TOLERANCE (relative). ``dev`` is overwritten."""
    for _ in range(WINSOR_MAX_ITERATIONS):
        half_width = np.float32(WINSOR_CLIP_SIGMA * sigma)
        for k in range(n):
            dev[k] = min(max(dev[k], -half_width), half_width)
        new_sigma = WINSOR_FACTOR * _std(dev, n)
        moving = abs(new_sigma - sigma) > WINSOR_TOLERANCE * sigma
        sigma = new_sigma
        if not moving:
            break
    return sigma


@njit(cache=True, nogil=True)
def clip_runs(sorted_values, n_valid, winsorized, sigma_low, sigma_high, iterations, min_frames):
    """Kept rank run [lo, hi) of each pixel after sigma (or winsorized) clipping.

    sorted_values: float32 (N, P), each column sorted, NaN (missing) last.
    n_valid: int (P,) finite values per column. A pixel is clipped only if it has at least
    ``min_frames`` values, and stops once nothing changed or fewer than that remain.
    Returns lo, hi: int32 (P,); the kept values of pixel p are sorted_values[lo:hi, p].
    """
    n_frames, n_pixels = sorted_values.shape
    lo = np.zeros(n_pixels, dtype=np.int32)
    hi = np.empty(n_pixels, dtype=np.int32)
    run = np.empty(n_frames, dtype=np.float32)
    dev = np.empty(n_frames, dtype=np.float32)
    for p in range(n_pixels):
        a = 0
        b = np.int32(n_valid[p])
        if b >= min_frames:
            for k in range(b):
                run[k] = sorted_values[k, p]
            for _ in range(iterations):
                n = b - a
                centre = np.float32(_median(run[a:b], n))
                for k in range(n):
                    dev[k] = run[a + k] - centre
                sigma = _std(dev, n)
                if winsorized:
                    sigma = _winsorized_sigma(dev, n, sigma)
                low_limit = np.float32(-sigma_low * sigma)
                high_limit = np.float32(sigma_high * sigma)
                n_below = 0
                n_above = 0
                for k in range(a, b):
                    deviation = run[k] - centre
                    if deviation < low_limit:
                        n_below += 1
                    if deviation > high_limit:
                        n_above += 1
                a += n_below
                b -= n_above
                if n_below + n_above == 0 or b - a < min_frames:
                    break
        lo[p] = a
        hi[p] = b
    return lo, hi
