"""Robust statistics of many small groups at once: medians ignoring NaN along one axis.

np.nanmedian goes through masked arrays for short axes and is many times slower on the
shapes the workflow has (a few values per pixel of a frame, a few hundred per star stamp).
They give np.nanmedian's numbers (the very same in float64): NaN sorts last, the median of
an even count is the mean of the two middle values, a group with no valid value gives NaN.
"""

from __future__ import annotations

import numpy as np

# axis-0 medians of at most this many values use a sorting network (see sort_axis0_network)
SORT_NETWORK_MAX = 12


def sort_axis0_network(values: np.ndarray) -> None:
    """Sort ``values`` along axis 0 in place, NaN last, by odd-even transposition.

    Each comparator is two whole-row ufuncs (fmin keeps the number, maximum keeps the NaN),
    so a short axis 0 sorts several times faster than np.sort, which walks it pixel by pixel.
    The rows end up holding exactly the values np.sort would give.
    """
    n = values.shape[0]
    low = np.empty_like(values[0])
    for rnd in range(n):
        for i in range(rnd % 2, n - 1, 2):
            np.fmin(values[i], values[i + 1], out=low)
            np.maximum(values[i], values[i + 1], out=values[i + 1])
            values[i] = low


def nanmedian_axis0(values: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Median along axis 0 ignoring NaN (NaN sorts last); NaN where all are NaN.

    With ``overwrite`` the input is sorted in place instead of copied. Much faster than
    np.nanmedian, which goes through masked arrays for short axes; up to
    SORT_NETWORK_MAX values per pixel are sorted by a comparator network. As NaN sorts
    last, only pixels whose last sorted value is NaN need their own middle rank.
    """
    n = values.shape[0]
    ordered = values if overwrite else np.array(values, copy=True)
    if n <= SORT_NETWORK_MAX:
        sort_axis0_network(ordered)
    else:  # sort contiguous rows (fast), then view them with the values on axis 0 again
        ordered = np.moveaxis(np.sort(np.moveaxis(ordered, 0, -1), axis=-1), -1, 0)
    median = 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
    partial = np.isnan(ordered[-1])
    if np.any(partial):
        columns = ordered[:, partial]
        valid = n - np.count_nonzero(np.isnan(columns), axis=0)
        lo = np.clip((valid - 1) // 2, 0, None)[None]
        hi = np.clip(valid // 2, 0, None)[None]
        low = np.take_along_axis(columns, lo, axis=0)[0]
        high = np.take_along_axis(columns, hi, axis=0)[0]
        median[partial] = 0.5 * (low + high)  # NaN where no value is valid
    return median


def nanmedian_last_axis(values: np.ndarray) -> np.ndarray:
    """Median along the last (contiguous) axis ignoring NaN; sorts ``values`` in place.

    Same numbers as :func:`nanmedian_axis0`. Sorting contiguous rows (numpy's SIMD sort) is
    several times faster than np.partition at the two middle ranks for rows of ~256 values.
    """
    n = values.shape[-1]
    n_valid = n - np.count_nonzero(np.isnan(values), axis=-1)
    values.sort(axis=-1)
    if np.all(n_valid == n):
        return 0.5 * (values[..., (n - 1) // 2] + values[..., n // 2])
    lo = np.clip((n_valid - 1) // 2, 0, None)[..., None]
    hi = np.clip(n_valid // 2, 0, None)[..., None]
    low = np.take_along_axis(values, lo, axis=-1)[..., 0]
    high = np.take_along_axis(values, hi, axis=-1)[..., 0]
    median = 0.5 * (low + high)
    median[n_valid == 0] = np.nan
    return median


def nanmedian_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row of a 2D array ignoring NaN (see nanmedian_axis0)."""
    return nanmedian_axis0(np.array(values.T, copy=True), overwrite=True)
