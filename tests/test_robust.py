"""NaN-ignoring medians of many small groups (nightstack.robust) against np.nanmedian."""

import numpy as np
import pytest

from nightstack import robust


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 12, 13, 40])
def test_nanmedian_helpers_match_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.normal(0, 1, (n, 300)).astype(np.float32)
    values[rng.random(values.shape) < 0.25] = np.nan
    values[:, 0] = np.nan  # no valid value at all
    values[:, 1] = 2.0  # all equal
    with pytest.warns(RuntimeWarning):
        expected = np.nanmedian(values.astype(np.float64), axis=0)
    got = robust.nanmedian_axis0(values)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.isnan(got[0]) and got[1] == 2.0
    untouched = values.copy()
    robust.nanmedian_axis0(values)
    assert np.array_equal(values, untouched, equal_nan=True)  # not overwritten by default
    rows = np.ascontiguousarray(values.T)
    assert np.array_equal(robust.nanmedian_last_axis(rows), got, equal_nan=True)
    assert np.array_equal(robust.nanmedian_rows(values.T), got, equal_nan=True)
    exact = values.astype(np.float64)  # in float64 the very numbers of np.nanmedian
    assert np.array_equal(robust.nanmedian_axis0(exact), expected, equal_nan=True)
    assert np.array_equal(robust.nanmedian_last_axis(np.ascontiguousarray(exact.T)), expected, equal_nan=True)
