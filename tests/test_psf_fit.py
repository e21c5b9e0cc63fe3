"""The compiled star fit (large frames) against the batched numpy one (small frames).

On stamps of real-looking stars, with hot pixels and pixels left out, both must reach the
same parameters; they differ only by round-off in sums, never by a different fit.
"""

import numpy as np

from nightstack.psf_fit import levenberg_marquardt
from nightstack.stars import _gaussian_model, _levenberg_marquardt


def stamps(n_stars, r, seed):
    """Noisy elliptical Gaussian stars on stamps of half-size r, their truth and a start."""
    rng = np.random.default_rng(seed)
    off = np.arange(-r, r + 1, dtype=float)
    dy_grid, dx_grid = (g.ravel() for g in np.meshgrid(off, off, indexing="ij"))
    sigma_x, sigma_y = rng.uniform(1.0, 2.5, n_stars), rng.uniform(1.0, 2.5, n_stars)
    theta = rng.uniform(0, np.pi, n_stars)
    cos, sin = np.cos(theta), np.sin(theta)
    a = cos**2 / sigma_x**2 + sin**2 / sigma_y**2
    c = sin**2 / sigma_x**2 + cos**2 / sigma_y**2
    b = cos * sin * (1 / sigma_x**2 - 1 / sigma_y**2)
    truth = np.column_stack([rng.uniform(50, 5000, n_stars), rng.uniform(-0.5, 0.5, n_stars),
                             rng.uniform(-0.5, 0.5, n_stars), a, b, c])
    model, _ = _gaussian_model(truth, dx_grid, dy_grid)
    target = model + rng.normal(0, 10.0, model.shape)
    target[rng.random(target.shape) < 0.01] += 3000  # hot pixels and cosmic rays
    weight = (rng.random(target.shape) > 0.1).astype(float)  # pixels left out
    start = np.column_stack([target.max(axis=1), np.zeros(n_stars), np.zeros(n_stars),
                             np.full(n_stars, 0.3), np.zeros(n_stars), np.full(n_stars, 0.3)])
    return start, target, weight, dx_grid, dy_grid, truth


def test_kernel_fits_the_same_stars_as_the_numpy_batch():
    r = 7
    start, target, weight, dx_grid, dy_grid, truth = stamps(400, r, seed=3)
    got, got_valid = levenberg_marquardt(start, target, weight, dx_grid, dy_grid, r, 8)
    want, want_valid = _levenberg_marquardt(start, target, weight, dx_grid, dy_grid, r, 8)
    assert np.array_equal(got_valid, want_valid) and got_valid.mean() > 0.9
    # round-off only: an unconverged star may differ by 1e-8, a different fit by far more
    np.testing.assert_allclose(got[got_valid], want[want_valid], rtol=1e-5, atol=1e-6)
    # and the fit is a fit: bright stars' centres near the truth (a hot pixel on a star
    # can pull a single weighting pass; fit_stars's later passes drop such pixels)
    bright = got_valid & (truth[:, 0] > 1000)
    assert np.median(np.abs(got[bright, 1:3] - truth[bright, 1:3])) < 0.05


def test_broken_starts_come_back_invalid_not_as_errors():
    r = 5
    start, target, weight, dx_grid, dy_grid, _ = stamps(20, r, seed=4)
    start[:5, 3] = -1.0  # not positive definite
    start[5:10] = np.nan
    weight[10:15] = 0.0  # no pixel to fit
    got, valid = levenberg_marquardt(start, target, weight, dx_grid, dy_grid, r, 8)
    assert not valid[:10].any() and valid[10:].all()
    np.testing.assert_array_equal(got[10:15], start[10:15])  # no pixel to fit: unchanged
    assert not np.array_equal(got[15:], start[15:])
