"""Measured noise curve: background noise of the mean of the first k frames (nightstack.noise)."""

import numpy as np
import pytest

from nightstack.camera import Camera
from nightstack.io import write_fits_image
from nightstack.noise import (
    curve_frame_counts,
    growing_mean_noise,
    pool_region_noise,
    probe_boxes,
    robust_sigma,
)
from nightstack.stacking import FrameWarp, StackConfig, stack_frames


def sky_frames(n_frames, sigma_adu, shape=(3, 256, 256), seed=0):
    """(N, C, h, w) frames: the same sky (gradient, a nebula, 60 stars per 256 x 256 px) plus
    Gaussian noise of sigma_adu (one value or one per frame)."""
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    sky = 500.0 + 0.3 * xx - 0.2 * yy + 80.0 * np.exp(-((xx - 160) ** 2 + (yy - 90) ** 2) / (2 * 30.0**2))
    n_stars = max(1, round(60 * h * w / 256**2))
    for x, y, amp in zip(rng.uniform(0, w, n_stars), rng.uniform(0, h, n_stars),
                         rng.uniform(50, 5000, n_stars)):
        sky += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    sigma = np.broadcast_to(np.asarray(sigma_adu, float), (n_frames,))
    noise = rng.normal(0.0, 1.0, (n_frames, *shape)) * sigma[:, None, None, None]
    return (sky[None, None] + noise).astype(np.float32)


def test_frame_counts_all_or_log_spaced():
    assert curve_frame_counts(5).tolist() == [1, 2, 3, 4, 5]
    counts = curve_frame_counts(500)
    assert counts[0] == 1 and counts[-1] == 500 and len(counts) <= 20
    assert np.all(np.diff(counts) > 0)


def test_probe_boxes_cover_the_central_square():
    tiles = [(y, min(y + 300, 1066), x, min(x + 300, 1600)) for y in range(0, 1066, 300)
             for x in range(0, 1600, 300)]
    boxes = probe_boxes(tiles, 1066, 1600)
    area = sum((b[1] - b[0]) * (b[3] - b[2]) for b in boxes.values())
    assert 0.9 * 512**2 <= area <= 512**2  # slivers under 16 px may be left out
    for (y0, y1, x0, x1), (by0, by1, bx0, bx1) in boxes.items():
        assert y0 <= by0 < by1 <= y1 and x0 <= bx0 < bx1 <= x1
        assert 277 <= by0 and by1 <= 789 and 544 <= bx0 and bx1 <= 1056


def test_curve_of_equal_frames_falls_as_one_over_sqrt_k():
    sigma_adu = 10.0
    frames = sky_frames(16, sigma_adu)
    result = growing_mean_noise(frames, np.arange(16), curve_frame_counts(16),
                                combined=frames.mean(axis=0))
    expected = sigma_adu / np.sqrt(np.arange(1, 17))
    np.testing.assert_allclose(result["noise_adu"].mean(axis=1), expected, rtol=0.10)
    np.testing.assert_allclose(result["stack_noise_adu"], expected[-1], rtol=0.10)
    assert 0.5 * 256**2 < result["n_sky_px"] < 256**2  # stars are masked, the sky is kept


def test_curve_follows_time_order_and_weights():
    sigma_adu = np.array([2.0, 4.0, 8.0, 16.0])
    frames = sky_frames(4, sigma_adu, shape=(1, 128, 128), seed=1)
    order = np.array([3, 2, 1, 0])  # the noisiest frame was taken first
    weights = 1.0 / sigma_adu**2
    result = growing_mean_noise(frames, order, [1, 2, 3, 4], weights)
    w, s = weights[order], sigma_adu[order]
    expected = np.sqrt(np.cumsum((w * s) ** 2)) / np.cumsum(w)
    np.testing.assert_allclose(result["noise_adu"][:, 0], expected, rtol=0.10)
    assert result["stack_noise_adu"] is None


def test_uncovered_region_is_not_measured_and_pooling():
    frames = sky_frames(3, 5.0, shape=(1, 64, 64))
    frames[1, :, :, :] = np.nan
    assert growing_mean_noise(frames, np.arange(3), [1, 2, 3]) is None
    a = {"noise_adu": np.array([[3.0, 4.0]]), "stack_noise_adu": None, "n_sky_px": 100}
    b = {"noise_adu": np.array([[3.0, 4.0]]), "stack_noise_adu": None, "n_sky_px": 300}
    pooled = pool_region_noise([a, None, b])
    assert pooled["noise_adu"][0] == pytest.approx(np.sqrt((9 + 16) / 2))
    assert pooled["n_sky_px"] == 400 and pooled["stack_noise_adu"] is None
    assert pool_region_noise([None]) is None
    assert robust_sigma(np.random.default_rng(0).normal(0, 3.0, 100000)) == pytest.approx(3.0, rel=0.02)


def test_stack_writes_the_measured_curve_in_date_order(tmp_path):
    """stack_frames measures the curve on its own tiles, frames in DATE-OBS order."""
    cam = Camera(160, 120, focal_px=400.0)
    sigma_adu = np.array([1.0, 2.0, 4.0, 8.0, 8.0])
    frames = sky_frames(5, sigma_adu, shape=(1, 120, 160), seed=2)
    dates = ["2024-01-01T03:00:00", "2024-01-01T02:00:00", "2024-01-01T01:00:00",
             "2024-01-01T00:00:00", None]  # frame 3 first, frame 4 (no date) last
    warps = []
    for i, (data, date) in enumerate(zip(frames, dates)):
        path = tmp_path / f"f{i}.fits"
        write_fits_image(path, data[0])
        warps.append(FrameWarp(str(path), cam, cam, np.eye(3), offset=np.zeros(1), scale=np.ones(1),
                               target_level=np.zeros(1), weight=1.0, date_obs=date))
    _, _, info = stack_frames(warps, (1, 120, 160), StackConfig(method="mean", memory_mb=1))
    curve = info["noise_curve"]
    assert info["n_tiles"] > 1 and len(curve["regions"]) > 1
    assert curve["n_frames"] == [1, 2, 3, 4, 5]
    s = sigma_adu[[3, 2, 1, 0, 4]]
    expected = np.sqrt(np.cumsum(s**2)) / np.arange(1, 6)
    np.testing.assert_allclose(curve["noise_adu"], expected, rtol=0.15)
    assert curve["stack_noise_adu"] == pytest.approx(curve["noise_adu"][-1], rel=1e-6)
