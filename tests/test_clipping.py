"""The compiled clipping kernel against the vectorised numpy clipping it replaced.

The numpy version below (the stack's rejection until the kernel took over) is kept here as
the oracle: both must give the same kept runs, bit for bit, on stacks with missing values,
outliers, ties and constant pixels, for sigma and winsorized clipping.
"""

import numpy as np
import pytest

from nightstack import stacking
from nightstack.clipping import (
    WINSOR_CLIP_SIGMA,
    WINSOR_FACTOR,
    WINSOR_MAX_ITERATIONS,
    WINSOR_TOLERANCE,
)
from nightstack.stacking import StackConfig, _mean_of_kept, combine_with_rejection


def _deviations_in_run(sorted_values, lo, hi, centre) -> np.ndarray:
    """float32 (N, P): value - centre inside each pixel's rank run [lo, hi), 0 outside it.

    Zeros outside the run drop out of sums and never pass a rejection threshold, so the
    statistics below need no masks.
    """
    dev = sorted_values - centre.astype(np.float32)
    for rank, row in enumerate(dev):  # row by row: no (N, P) mask in memory
        row[(rank < lo) | (rank >= hi)] = 0.0  # also clears the NaN (missing) values
    return dev


def _std_of_deviations(dev, n) -> np.ndarray:
    """Sample standard deviation (P,) from deviations (N, P) that are 0 outside the run.

    Sums run frame after frame in float64, so a pixel's result does not depend on how many
    other pixels are combined with it (tiled and untiled stacks agree exactly).
    """
    s1 = np.zeros(dev.shape[1], dtype=np.float64)
    s2 = np.zeros(dev.shape[1], dtype=np.float64)
    for row in dev:
        s1 += row
        s2 += np.square(row, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (s2 - s1 * s1 / n) / (n - 1)
    return np.where(n > 1, np.sqrt(np.maximum(var, 0.0)), 0.0)


def _winsorized_sigma(dev, n, sigma) -> np.ndarray:
    """Siril's robust sigma (P,): winsorize at +-1.5 sigma, sigma = 1.134 std, until stable.

    dev: deviations from the median (N, P), 0 outside the run; modified in place. A pixel
    stops once its sigma changes by less than WINSOR_TOLERANCE (relative); only the pixels
    still changing are carried into the next round.
    """
    sigma = sigma.copy()
    pending = np.arange(sigma.size)
    for _ in range(WINSOR_MAX_ITERATIONS):
        half_width = (WINSOR_CLIP_SIGMA * sigma[pending]).astype(np.float32)
        np.clip(dev, -half_width, half_width, out=dev)
        new_sigma = WINSOR_FACTOR * _std_of_deviations(dev, n[pending])
        moving = np.abs(new_sigma - sigma[pending]) > WINSOR_TOLERANCE * sigma[pending]
        sigma[pending] = new_sigma
        if not moving.any():
            break
        if not moving.all():
            dev, pending = _keep_columns(dev, moving), pending[moving]
    return sigma


def _keep_columns(array, keep) -> np.ndarray:
    """array[:, keep] compacted in place row by row (no second full-size copy); a view."""
    n_keep = int(np.count_nonzero(keep))
    for row in array:
        row[:n_keep] = row[keep]
    return array[:, :n_keep]


def _count_outside(dev, low_limit, high_limit):
    """Numbers (P,) of deviations below low_limit (< 0) and above high_limit (> 0)."""
    n_below = np.zeros(dev.shape[1], dtype=np.int32)
    n_above = np.zeros(dev.shape[1], dtype=np.int32)
    for row in dev:
        n_below += row < low_limit
        n_above += row > high_limit
    return n_below, n_above


def vectorised_clip_runs(sorted_values, n_valid, cfg: StackConfig):
    """Kept rank run [lo, hi) (P,) of each pixel after sigma or winsorized clipping.

    Only pixels with at least min_frames_for_clipping values are clipped, and a pixel stops
    once nothing changed or fewer than that many values remain; only pixels still changing
    are carried into the next iteration.
    """
    lo = np.zeros(n_valid.shape, dtype=np.int32)
    hi = n_valid.astype(np.int32)
    active = np.flatnonzero(n_valid >= cfg.min_frames_for_clipping).astype(np.int32)
    for _ in range(cfg.iterations):
        if active.size == 0:
            break
        sub = sorted_values if active.size == n_valid.size else sorted_values[:, active]
        a_lo, a_hi = lo[active], hi[active]
        n = a_hi - a_lo
        centre = stacking._median_of_run(sub, a_lo, n)
        dev = _deviations_in_run(sub, a_lo, a_hi, centre)
        sigma = _std_of_deviations(dev, n)
        if cfg.method == "winsorized":
            sigma = _winsorized_sigma(dev, n, sigma)
            del dev
            dev = _deviations_in_run(sub, a_lo, a_hi, centre)  # the winsorizing overwrote it
        n_below, n_above = _count_outside(
            dev, (-cfg.sigma_low * sigma).astype(np.float32),
            (cfg.sigma_high * sigma).astype(np.float32))
        del dev, sub
        lo[active] += n_below
        hi[active] -= n_above
        changed = (n_below + n_above) > 0
        active = active[changed & (hi[active] - lo[active] >= cfg.min_frames_for_clipping)]
    return lo, hi


def vectorised_kept_mask(flat, finite, cfg: StackConfig) -> np.ndarray:
    """Boolean (N, P) of the values kept by sigma / winsorized clipping."""
    sorted_values = np.sort(flat, axis=0)  # NaN sort last
    lo, hi = vectorised_clip_runs(sorted_values, finite.sum(axis=0, dtype=np.int32), cfg)
    # The kept run of the sorted stack is exactly the values between its two end values
    # (rejection thresholds are strict, so no value equal to an end was rejected).
    last = flat.shape[0] - 1
    low_end = np.take_along_axis(sorted_values, np.clip(lo, 0, last)[None], axis=0)[0]
    high_end = np.take_along_axis(sorted_values, np.clip(hi - 1, 0, last)[None], axis=0)[0]
    del sorted_values
    kept = flat >= low_end  # in-place updates: one boolean temporary at a time
    kept &= flat <= high_end
    kept &= finite
    kept[:, hi <= lo] = False
    return kept


def vectorised_combine(values, cfg: StackConfig, weights):
    """The stack's clipped mean before the kernel: (combined, n_used, rejected)."""
    finite = np.isfinite(values)
    kept = vectorised_kept_mask(values, finite, cfg)
    combined, n_used = _mean_of_kept(values, kept, weights)
    return combined, n_used, finite & ~kept


def random_stack(n_frames, n_pixels, seed):
    """Sky-like values with hot outliers, satellite-like streaks, missing values and ties."""
    rng = np.random.default_rng(seed)
    values = rng.normal(1000.0, 20.0, (n_frames, n_pixels)).astype(np.float32)
    values[rng.random(values.shape) < 0.03] += rng.uniform(100, 5000)
    values[rng.random(values.shape) < 0.01] -= rng.uniform(100, 900)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[:, : n_pixels // 20] = np.round(values[:, : n_pixels // 20] / 50.0) * 50.0  # ties
    values[:, n_pixels // 20 : n_pixels // 10] = 7.0  # constant: sigma 0
    return values


@pytest.mark.parametrize("method", ["sigma", "winsorized"])
@pytest.mark.parametrize("n_frames", [3, 4, 7, 16, 61])
def test_kernel_combines_exactly_as_the_vectorised_clipping(method, n_frames):
    values = random_stack(n_frames, 20_000, seed=n_frames)
    rng = np.random.default_rng(n_frames)
    frame_weights = rng.uniform(0.2, 2.0, n_frames)
    pixel_weights = frame_weights[:, None] * rng.uniform(0.0, 1.0, values.shape).astype(np.float32)
    loose = StackConfig(method=method, sigma_low=1.0, sigma_high=0.8, iterations=10, min_frames_for_clipping=3)
    for cfg in (StackConfig(method=method), loose):
        for weights in (frame_weights, pixel_weights):
            got = combine_with_rejection(values, cfg, frame_weights,
                                         None if weights is frame_weights else pixel_weights / frame_weights[:, None])
            want = vectorised_combine(values, cfg, weights)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
    n_valid = np.isfinite(values).sum(axis=0)
    clipped = got[2].sum(axis=0)
    assert np.mean(clipped > 0) > 0.5  # the comparison covers real rejections
    constant = slice(values.shape[1] // 20, values.shape[1] // 10)
    assert not clipped[constant].any()  # sigma 0 rejects nothing
    assert np.all(got[1] == n_valid - clipped)


def test_kernel_rejects_the_outlier_siril_would():
    # 10 sky values and one satellite hit: the hit goes, the sky stays.
    column = np.array([100, 101, 99, 102, 98, 100, 101, 99, 100, 100, 400], np.float32)
    combined, n_used, rejected = combine_with_rejection(column[:, None], StackConfig(method="winsorized"))
    assert rejected[:, 0].tolist() == [False] * 10 + [True]
    assert n_used[0] == 10 and combined[0] == pytest.approx(100.0)


@pytest.mark.parametrize("method", ["sigma", "winsorized"])
def test_blocks_on_threads_combine_as_one_block(method):
    # three blocks of 20k pixels, each sorted and clipped on its own thread
    values = random_stack(16, 60_000, seed=5)
    weights = np.random.default_rng(5).uniform(0.5, 2.0, 16)
    one = combine_with_rejection(values, StackConfig(method=method), weights)
    three = combine_with_rejection(values, StackConfig(method=method), weights, threads=3)
    assert stacking.MIN_THREAD_BLOCK_PX * 3 <= values.shape[1]
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)
    assert one[2].any()  # real rejections were compared
