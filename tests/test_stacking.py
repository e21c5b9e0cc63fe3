"""Stack step: warp accuracy, combine methods, tiling, coverage, weights."""

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from nightstack import io, stacking
from nightstack.camera import (
    Camera,
    map_frame_to_ref,
    map_ref_to_frame,
    rotation_matrix,
)
from nightstack.errors import FrameError, NightstackError
from nightstack.io import OpenFrames, open_fits_data, write_fits_image
from nightstack.logs import Progress
from nightstack.stacking import (
    FrameWarp,
    StackConfig,
    combine,
    combine_with_rejection,
    normalise_tile,
    plan_tiles,
    stack_config_from_dict,
    stack_frames,
    warp_tile,
)

REF = Camera(800, 600, focal_px=1500.0)


# ---------------------------------------------------------------------------- helpers


def sky_model(xy, stars_xy, star_amp, sigma_px=2.0):
    """Analytic sky at reference pixel positions xy (n, 2): smooth gradient + Gaussian stars."""
    x, y = xy[:, 0], xy[:, 1]
    out = 0.2 + 0.1 * np.sin(x / 97.0) * np.cos(y / 71.0) + 2e-4 * x
    # star-pixel pairs closer than 7 sigma, found with kD-trees instead of all pairs
    pairs = cKDTree(xy).sparse_distance_matrix(
        cKDTree(stars_xy), 7 * sigma_px, output_type="coo_matrix")
    flux = star_amp[pairs.col] * np.exp(-0.5 * pairs.data**2 / sigma_px**2)
    return out + np.bincount(pairs.row, weights=flux, minlength=len(xy))


def pixel_grid(camera):
    yy, xx = np.mgrid[0:camera.height_px, 0:camera.width_px]
    return np.column_stack([xx.ravel(), yy.ravel()]).astype(float)


def identity_warp(path, camera, n_channels, weight=1.0, rotation=None, frame_camera=None):
    return FrameWarp(
        path=str(path),
        ref_camera=camera,
        frame_camera=frame_camera or camera,
        rotation=np.eye(3) if rotation is None else rotation,
        offset=np.zeros(n_channels),
        scale=np.ones(n_channels),
        target_level=np.zeros(n_channels),
        weight=weight,
    )


def untiled_stack(warps, out_shape, cfg, weights=None):
    """Reference computation: warp every whole frame, normalise, combine once."""
    _, height, width = out_shape
    layers = []
    for warp in warps:
        hdul, data = open_fits_data(warp.path)
        layers.append(normalise_tile(warp_tile(data, warp, 0, height, 0, width, cfg.interpolation),
                                     warp))
        del data
        hdul.close()
    combined, _ = combine(np.stack(layers), cfg, weights)
    return np.nan_to_num(combined, nan=0.0), np.isfinite(np.stack(layers)).sum(0).max(0)


# ---------------------------------------------------------------------------- (1) warp accuracy


@pytest.fixture(scope="module")
def star_field():
    rng = np.random.default_rng(7)
    stars = rng.uniform([-150, -150], [950, 750], size=(150, 2))
    amp = rng.uniform(0.3, 1.0, size=150)
    reference = sky_model(pixel_grid(REF), stars, amp).reshape(REF.height_px, REF.width_px)
    return stars, amp, reference


@pytest.mark.parametrize(
    "rotvec_deg, frame_camera, interpolation, max_err",
    [
        ((2.0, -1.5, 3.0), REF, "cubic", 0.01),
        ((0.0, 0.0, 180.0), REF, "cubic", 1e-4),  # pure flip: samples fall on pixel centres
        ((-1.0, 2.0, -4.0), Camera(800, 600, 1530.0, k1=-0.04, k2=0.01), "cubic", 0.01),
        ((2.0, -1.5, 3.0), REF, "lanczos3", 0.01),
        ((2.0, -1.5, 3.0), REF, "lanczos4", 0.01),
        ((-1.0, 2.0, -4.0), Camera(800, 600, 1530.0, k1=-0.04, k2=0.01), "lanczos4", 0.01),
        ((2.0, -1.5, 3.0), REF, "linear", 0.06),
    ],
)
def test_warp_tile_recovers_reference_image(tmp_path, star_field, rotvec_deg, frame_camera,
                                            interpolation, max_err):
    stars, amp, reference = star_field
    rotation = rotation_matrix(np.radians(rotvec_deg))
    frame_xy = pixel_grid(frame_camera)
    frame = sky_model(map_frame_to_ref(frame_xy, REF, frame_camera, rotation), stars, amp)
    frame = frame.reshape(frame_camera.height_px, frame_camera.width_px)
    path = tmp_path / "frame.fits"
    write_fits_image(path, np.stack([frame, 2 * frame]))  # two channels, second doubled
    warp = identity_warp(path, REF, 2, rotation=rotation, frame_camera=frame_camera)

    hdul, data = open_fits_data(path)
    warped = np.concatenate(  # two row bands, as a tiled stack would ask for them
        [warp_tile(data, warp, 0, 300, 0, 800, interpolation),
         warp_tile(data, warp, 300, 600, 0, 800, interpolation)], axis=1)
    del data
    hdul.close()

    xy_frame = map_ref_to_frame(pixel_grid(REF), REF, frame_camera, rotation)
    inner = ((xy_frame[:, 0] > 10) & (xy_frame[:, 0] < frame_camera.width_px - 11)
             & (xy_frame[:, 1] > 10) & (xy_frame[:, 1] < frame_camera.height_px - 11))
    inner = inner.reshape(REF.height_px, REF.width_px)
    assert inner.mean() > 0.6  # the test compares most of the image
    peak = reference.max()
    err0 = np.abs(warped[0][inner] - reference[inner]).max() / peak
    err1 = np.abs(warped[1][inner] - 2 * reference[inner]).max() / (2 * peak)
    assert err0 < max_err and err1 < max_err, (err0, err1)
    # NaN exactly where the frame does not reach (outside its first/last pixel centres)
    outside = ~((xy_frame[:, 0] >= -1e-3) & (xy_frame[:, 0] <= frame_camera.width_px - 1 + 1e-3)
                & (xy_frame[:, 1] >= -1e-3) & (xy_frame[:, 1] <= frame_camera.height_px - 1 + 1e-3))
    np.testing.assert_array_equal(np.isnan(warped[0]).ravel(), outside)


def test_warp_tile_nan_when_frame_looks_elsewhere(tmp_path):
    path = tmp_path / "f.fits"
    write_fits_image(path, np.ones((1, 60, 80), np.float32))
    cam = Camera(80, 60, 100.0)
    away = identity_warp(path, cam, 1, rotation=rotation_matrix([0, np.pi, 0]))  # behind us
    hdul, data = open_fits_data(path)
    tile = warp_tile(data, away, 0, 60, 0, 80, "cubic")
    del data
    hdul.close()
    assert np.isnan(tile).all()


# ---------------------------------------------------------------------------- (2) combine methods


def satellite_stack(rng, n_frames=10, shape=(64, 64), noise=1.0, level=100.0):
    stack = level + noise * rng.standard_normal((n_frames, *shape)).astype(np.float32)
    line = np.zeros(shape, bool)
    line[np.arange(shape[0]), np.arange(shape[1])] = True  # diagonal trail
    line[20, :] = True
    stack[3][line] += 40.0
    return stack, line


@pytest.mark.parametrize("method", ["sigma", "winsorized"])
def test_clipping_rejects_satellite_trail_fully(method):
    stack, line = satellite_stack(np.random.default_rng(1))
    cfg = StackConfig(method=method)
    combined, n_used, rejected = combine_with_rejection(stack, cfg)
    assert rejected[3][line].all()  # every trail pixel of the trail frame is rejected
    assert rejected[3][~line].mean() < 0.01
    clean = np.delete(stack, 3, axis=0)[:, line].mean(axis=0)
    # where the clean frames kept everything, the result is the mean of the clean frames
    exact = n_used[line] == 9
    assert exact.mean() > 0.85  # clean values beyond 3 sigma may go too
    np.testing.assert_allclose(combined[line][exact], clean[exact], rtol=1e-6)
    assert np.abs(combined[line] - 100).max() < 2.0


def test_mean_and_median_on_a_trail():
    stack, line = satellite_stack(np.random.default_rng(2))
    mean, n_mean = combine(stack, StackConfig(method="mean"))
    median, _ = combine(stack, StackConfig(method="median"))
    np.testing.assert_allclose(mean, stack.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(median, np.median(stack, axis=0), rtol=1e-6)
    assert (n_mean == 10).all()
    assert np.abs(mean[line] - 104.0).max() < 1.5  # the mean carries 40/10 of the trail
    assert np.abs(median[line] - 100.0).max() < 1.5  # the median barely moves


def test_max_ignores_missing_values():
    rng = np.random.default_rng(3)
    stack = rng.standard_normal((5, 3, 20, 30)).astype(np.float32)
    stack[1, :, :5] = np.nan
    stack[:, :, 0, 0] = np.nan
    combined, n_used = combine(stack, StackConfig(method="max"))
    np.testing.assert_array_equal(combined[:, 1:], np.nanmax(stack[:, :, 1:], axis=0))
    assert np.isnan(combined[:, 0, 0]).all() and (n_used[:, 0, 0] == 0).all()
    assert (n_used[:, 1:5, 1:] == 4).all()


def test_noise_of_mean_falls_as_sqrt_n():
    rng = np.random.default_rng(4)
    stack = rng.standard_normal((16, 200, 200)).astype(np.float32)
    for method in ("mean", "sigma", "winsorized"):
        combined, _ = combine(stack, StackConfig(method=method))
        ratio = stack[0].std() / combined.std()
        assert 3.7 < ratio < 4.3, (method, ratio)  # sqrt(16) = 4


def test_mean_skips_missing_values():
    rng = np.random.default_rng(5)
    stack = rng.uniform(0, 1, (6, 40, 40)).astype(np.float32)
    stack[2, :20] = np.nan
    combined, n_used = combine(stack, StackConfig(method="mean"))
    np.testing.assert_allclose(combined, np.nanmean(stack.astype(np.float64), axis=0), rtol=1e-6)
    assert (n_used[:20] == 5).all() and (n_used[20:] == 6).all()


def scalar_clip(values, method, sigma_low=4.0, sigma_high=3.0, iterations=5, min_frames=3):
    """Plain per-pixel clipping as written in Siril's rejection code (for one pixel)."""
    kept = np.sort(values[np.isfinite(values)]).astype(np.float64)
    for _ in range(iterations):
        if kept.size < min_frames:
            break
        centre, sigma = np.median(kept), kept.std(ddof=1)
        if method == "winsorized":
            w = kept.copy()
            for _ in range(50):
                w = np.clip(w, centre - 1.5 * sigma, centre + 1.5 * sigma)
                sigma0, sigma = sigma, 1.134 * w.std(ddof=1)
                if abs(sigma - sigma0) <= 5e-4 * sigma0:
                    break
        new = kept[(kept >= centre - sigma_low * sigma) & (kept <= centre + sigma_high * sigma)]
        if new.size == kept.size:
            break
        kept = new
    return kept.mean(), kept.size


@pytest.mark.parametrize("method", ["sigma", "winsorized"])
def test_clipping_matches_per_pixel_reference(method):
    rng = np.random.default_rng(6)
    n_frames, n_pix = 12, 400
    stack = rng.standard_normal((n_frames, n_pix)).astype(np.float32)
    hits = rng.uniform(size=stack.shape) < 0.08  # cosmic rays, planes, hot pixels
    stack[hits] += rng.choice([-1, 1], hits.sum()) * rng.uniform(2, 30, hits.sum())
    stack[rng.uniform(size=stack.shape) < 0.1] = np.nan
    stack[:10, :5] = np.nan  # a few pixels with 2 values: plain mean
    combined, n_used = combine(stack, StackConfig(method=method, sigma_low=2.5, sigma_high=2.5))
    expected = [scalar_clip(stack[:, p], method, 2.5, 2.5) for p in range(n_pix)]
    np.testing.assert_array_equal(n_used, [e[1] for e in expected])
    np.testing.assert_allclose(combined, [e[0] for e in expected], rtol=1e-5, atol=1e-6)
    assert (n_used < (np.isfinite(stack).sum(0))).sum() > 50  # the clipping did work


def test_clipping_falls_back_to_mean_with_few_frames():
    stack = np.array([[0.0, 1.0], [100.0, 1.0]], np.float32)
    combined, n_used = combine(stack, StackConfig(method="winsorized"))
    np.testing.assert_allclose(combined, [50.0, 1.0])
    np.testing.assert_array_equal(n_used, [2, 2])


# ---------------------------------------------------------------------------- (3) tiling, coverage


@pytest.fixture(scope="module")
def small_night(tmp_path_factory):
    """6 colour frames 200x160 with small rotations, one of them only 100 px wide."""
    folder = tmp_path_factory.mktemp("night")
    ref = Camera(200, 160, focal_px=400.0)
    rng = np.random.default_rng(8)
    stars = rng.uniform([-60, -60], [260, 220], size=(60, 2))
    amp = rng.uniform(100, 1000, 60)
    warps = []
    for i in range(6):
        cam = Camera(100, 160, 400.0) if i == 5 else ref
        rotation = np.eye(3) if i == 5 else rotation_matrix(rng.normal(0, 0.01, 3))
        sky = sky_model(map_frame_to_ref(pixel_grid(cam), ref, cam, rotation), stars, amp)
        sky = sky.reshape(cam.height_px, cam.width_px)
        gains = np.array([1.0, 0.9, 1.1])[:, None, None] * (1 + 0.1 * i)
        data = gains * sky + 50 * i + rng.normal(0, 2.0, (3, *sky.shape))
        if i == 2:
            data[:, 80, :] += 5000.0  # a satellite trail
        path = folder / f"frame {i}.fits"
        write_fits_image(path, data.astype(np.float32))
        warps.append(FrameWarp(str(path), ref, cam, rotation, offset=np.full(3, 50.0 * i),
                               scale=gains.ravel(), target_level=np.full(3, 10.0),
                               weight=1.0 + i))
    return warps, (3, 160, 200)


@pytest.mark.parametrize(
    "method, interpolation, weighting",
    [("winsorized", "lanczos3", "none"), ("sigma", "linear", "noise"),
     ("median", "lanczos3", "none"), ("mean", "linear", "noise"), ("max", "linear", "none")],
)
def test_tiled_stack_equals_untiled_computation(small_night, method, interpolation, weighting):
    warps, shape = small_night
    cfg = StackConfig(method=method, interpolation=interpolation, weighting=weighting,
                      memory_mb=1)
    calls = []
    image, coverage, info = stack_frames(warps, shape, cfg, progress=calls.append)
    assert info["n_tiles"] >= 12 and len(calls) == info["n_tiles"]
    weights = np.array([w.weight for w in warps]) if weighting == "noise" else None
    expected, expected_cov = untiled_stack(warps, shape, cfg, weights)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(coverage, expected_cov)


def test_stack_progress_counts_the_tiles(small_night, caplog):
    # a long stack step logs "i/n tiles" about every 10 %, n known once the tiles are planned
    warps, shape = small_night
    progress = Progress("stacking night test, tiles", 1)
    with caplog.at_level(logging.INFO, logger="nightstack"):
        log = logging.getLogger("nightstack")
        log.propagate, was = True, log.propagate
        try:
            _, _, info = stack_frames(warps, shape, StackConfig(memory_mb=1), progress=progress)
        finally:
            log.propagate = was
    assert progress.total == info["n_tiles"] >= 12 and progress.done == info["n_tiles"]
    # distinct lines: a handler left by an earlier test's run_step may pass each one on twice
    lines = list(dict.fromkeys(r.getMessage() for r in caplog.records if "tiles" in r.getMessage()))
    assert lines[-1] == f"stacking night test, tiles: {info['n_tiles']}/{info['n_tiles']} (100%)"
    assert 5 <= len(lines) <= 11


@pytest.mark.parametrize("method, threads", [("winsorized", 2), ("mean", 2), ("winsorized", 3)])
def test_read_ahead_stack_equals_one_thread(small_night, method, threads):
    # with two or more threads the next tile is read, by that many readers each taking its
    # share of the frames, while one is combined (a second buffer, so smaller tiles): the same
    # stack and rejection, whatever the order the threads run in
    warps, shape = small_night
    # 3 MB: 1.5 MB for the six open frames, the rest sets the tiles
    cfg = StackConfig(method=method, interpolation="lanczos4", weighting="noise", memory_mb=3)
    image1, coverage1, info1 = stack_frames(warps, shape, cfg, threads=1)
    calls = []
    image2, coverage2, info2 = stack_frames(warps, shape, cfg, progress=calls.append,
                                            threads=threads)
    assert info2["n_tiles"] >= 12 and len(calls) == info2["n_tiles"]
    np.testing.assert_array_equal(image2, image1)
    np.testing.assert_array_equal(coverage2, coverage1)
    assert info2["rejected_fraction"] == info1["rejected_fraction"]
    assert info2["tile_h"] * info2["tile_w"] < info1["tile_h"] * info1["tile_w"]
    # the noise curve is measured on the tiles' own pixels: other tiles, the same frame counts
    assert info2["noise_curve"]["n_frames"] == info1["noise_curve"]["n_frames"]


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_read_ahead_error_reaches_the_caller(small_night, monkeypatch):
    # a frame that fails to read in the background thread, after the first tiles went
    # well, fails the stack naming the file
    warps, shape = small_night
    cfg = StackConfig(method="mean", interpolation="linear", memory_mb=1)
    reads = []
    real_warp_tile = stacking.warp_tile

    def failing_on_the_tenth_read_of_frame_1(data, warp, *args):
        if warp.path == warps[1].path:
            reads.append(1)
            if len(reads) == 10:
                raise OSError("Input/output error")
        return real_warp_tile(data, warp, *args)

    monkeypatch.setattr(stacking, "warp_tile", failing_on_the_tenth_read_of_frame_1)
    with pytest.raises(FrameError, match=Path(warps[1].path).name):
        stack_frames(warps, shape, cfg, threads=2)
    assert len(reads) == 10


def test_frames_are_opened_once_for_all_tiles(small_night, monkeypatch):
    # opening is the per-tile cost that grew as frames x tiles; each frame opens once now
    warps, shape = small_night
    cfg = StackConfig(method="winsorized", interpolation="linear", memory_mb=1)
    opened = Counter()
    real_open = io.open_fits_data

    def counting_open(path):
        opened[path] += 1
        return real_open(path)

    monkeypatch.setattr(io, "open_fits_data", counting_open)
    image, _, info = stack_frames(warps, shape, cfg, threads=2)
    assert info["n_tiles"] >= 12
    assert set(opened) == {w.path for w in warps} and set(opened.values()) == {1}
    opened.clear()
    monkeypatch.setattr(io, "MAX_OPEN_FRAMES", 0)  # open and close around every read
    reopened, _, _ = stack_frames(warps, shape, cfg, threads=2)
    assert set(opened.values()) == {info["n_tiles"]}
    np.testing.assert_array_equal(image, reopened)


def test_open_frames_beyond_the_limit_are_reopened(small_night):
    warps, _ = small_night
    with OpenFrames(max_open=2) as frames:
        for _ in range(2):
            for warp in warps:
                with frames.reading(warp.path) as data:
                    assert data.shape[-2:] == (warp.frame_camera.height_px, warp.frame_camera.width_px)
        assert frames.n_open == 2
    assert frames.n_open == 0


def test_cubic_tiled_stack_matches_untiled_closely(small_night):
    # The spline prefilter runs on each tile's read box, so tiles differ only by round-off.
    warps, shape = small_night
    cfg = StackConfig(method="mean", interpolation="cubic", memory_mb=1)
    image, _, info = stack_frames(warps, shape, cfg)
    expected, _ = untiled_stack(warps, shape, cfg)
    assert info["n_tiles"] >= 12
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-4 * expected.max())


def test_coverage_counts_and_trail_rejection(small_night):
    warps, shape = small_night
    image, coverage, info = stack_frames(warps, shape, StackConfig(method="winsorized",
                                                                   interpolation="linear"))
    # The narrow frame (identity rotation, 100 px wide, centred) covers columns 50..149 only.
    narrow_cols = np.zeros(shape[2], bool)
    narrow_cols[50:150] = True
    core = coverage[30:130, 30:170]  # well inside every rotated full frame
    np.testing.assert_array_equal(core, np.where(narrow_cols[30:170], 6, 5)[None].repeat(100, 0))
    # Where nothing covers, the image is 0 and the coverage 0.
    assert (image[:, coverage == 0] == 0).all()
    assert coverage.max() == 6
    # the trail frame lost its trail: on the trail the stack matches one made without it
    without, _, _ = stack_frames(warps[:2] + warps[3:], shape,
                                 StackConfig(method="winsorized", interpolation="linear"))
    trail = np.abs(image - without)[:, 70:90, 40:160].max()
    assert trail < 50  # the trail would add ~700 to a mean
    fractions = info["rejected_fraction"]
    assert fractions[warps[2].path] > np.median(list(fractions.values()))


def test_few_frames_fallback_is_reported(small_night):
    warps, shape = small_night
    image, _, info = stack_frames(warps[:2], shape, StackConfig(method="sigma",
                                                                interpolation="linear"))
    mean, _, _ = stack_frames(warps[:2], shape, StackConfig(method="mean", interpolation="linear"))
    np.testing.assert_array_equal(image, mean)
    assert any("fell back to the mean" in note for note in info["notes"])


def test_unreadable_frame_is_skipped(small_night, tmp_path):
    warps, shape = small_night
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"not a fits file")
    bad = FrameWarp(str(broken), warps[0].ref_camera, warps[0].frame_camera, np.eye(3),
                    np.zeros(3), np.ones(3), np.zeros(3))
    _, _, info = stack_frames([*warps[:3], bad], shape, StackConfig(interpolation="linear"))
    assert list(info["skipped_frames"]) == [str(broken)] and info["n_frames"] == 3


# ---------------------------------------------------------------------------- (4) weights


def test_noise_weighting_downweights_noisy_frame(tmp_path):
    cam = Camera(120, 100, 300.0)
    rng = np.random.default_rng(9)
    sigmas = [1.0, 1.0, 1.0, 6.0]
    warps = []
    for i, sigma in enumerate(sigmas):
        path = tmp_path / f"f{i}.fits"
        write_fits_image(path, (10 + sigma * rng.standard_normal((1, 100, 120))).astype(np.float32))
        warps.append(identity_warp(path, cam, 1, weight=1 / sigma**2))
    noise = {}
    for weighting in ("none", "noise"):
        cfg = StackConfig(method="mean", weighting=weighting, interpolation="linear")
        image, _, _ = stack_frames(warps, (1, 100, 120), cfg)
        noise[weighting] = image.std()
    w = 1 / np.square(sigmas)
    expected_weighted = np.sqrt(np.sum(w**2 * np.square(sigmas))) / w.sum()  # 0.57
    expected_plain = np.sqrt(np.sum(np.square(sigmas))) / len(sigmas)  # 1.56
    assert abs(noise["noise"] / expected_weighted - 1) < 0.1
    assert abs(noise["none"] / expected_plain - 1) < 0.1
    assert noise["noise"] < 0.5 * noise["none"]


def test_weights_in_clipped_mean():
    values = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    combined, _ = combine(values, StackConfig(method="sigma"), weights=[1, 1, 1, 5])
    np.testing.assert_allclose(combined, [(1 + 2 + 3 + 20) / 8])


# ---------------------------------------------------------------------------- settings, memory


def test_config_from_dict_validates():
    cfg = stack_config_from_dict({"method": "Sigma", "sigma_low": 3, "memory_mb": 64})
    assert cfg.method == "sigma" and cfg.sigma_low == 3.0 and cfg.memory_mb == 64
    assert stack_config_from_dict(None) == StackConfig()
    for bad in ({"method": "average"}, {"kappa": 3}, {"iterations": 0}, {"memory_mb": "lots"},
                {"interpolation": "nearest"}, {"sigma_high": -1}):
        with pytest.raises(NightstackError):
            stack_config_from_dict(bad)


def test_tile_plan_respects_budget():
    plan = plan_tiles(200, (3, 1500, 2000), 512)
    assert plan.peak_mb <= 512 and not plan.over_budget
    assert 0.5 < plan.tile_h / plan.tile_w < 2  # square-ish
    huge = plan_tiles(100000, (3, 1500, 2000), 512)
    assert huge.over_budget and (huge.tile_h, huge.tile_w) == (32, 32)
    one = plan_tiles(1, (3, 100, 4000), 512)
    assert (one.tile_h, one.tile_w) == (100, 4000) and one.n_tiles == 1
    ahead = plan_tiles(200, (3, 1500, 2000), 512, read_ahead=True)  # two stack buffers
    assert ahead.peak_mb <= 512 and ahead.tile_h * ahead.tile_w < plan.tile_h * plan.tile_w
    # the files held open from tile to tile come out of the budget first
    held = plan_tiles(200, (3, 1500, 2000), 512, read_ahead=True, open_frames=200)
    assert held.peak_mb <= 512 and held.tile_h * held.tile_w < ahead.tile_h * ahead.tile_w
    assert held.peak_mb > 200 * stacking.OPEN_FRAME_MB  # the files are in the peak


# ---------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_frame_rolled_half_turn_stacks_back(shared_data, tmp_path):
    """A real frame and its 180-degree-rolled copy, warped back, average to the frame."""
    with fits.open(shared_data("als_m27_asi224mc") / "Light_1069.fits") as hdul:
        raw = hdul[0].data[200:500, 300:700].astype(np.float32)
    cam = Camera(raw.shape[1], raw.shape[0], focal_px=2000.0)
    write_fits_image(tmp_path / "a.fits", raw[None])
    write_fits_image(tmp_path / "b.fits", raw[None, ::-1, ::-1] + 100.0)
    warps = [
        identity_warp(tmp_path / "a.fits", cam, 1),
        FrameWarp(str(tmp_path / "b.fits"), cam, cam, rotation_matrix([0, 0, np.pi]),
                  offset=np.array([100.0]), scale=np.ones(1), target_level=np.zeros(1)),
    ]
    image, coverage, _ = stack_frames(warps, (1, *raw.shape),
                                      StackConfig(method="mean", interpolation="cubic"))
    assert (coverage == 2).all()
    np.testing.assert_allclose(image[0], raw, atol=1e-3 * raw.max())


def test_nan_pixels_in_a_frame_stay_local(tmp_path):
    """A NaN (bad) pixel makes only its neighbourhood missing, not the whole tile."""
    cam = Camera(80, 60, 200.0)
    data = np.full((1, 60, 80), 5.0, np.float32)
    data[0, 30, 40] = np.nan
    write_fits_image(tmp_path / "f.fits", data)
    warp = identity_warp(tmp_path / "f.fits", cam, 1, rotation=rotation_matrix([0, 0, 0.01]))
    for interpolation in ("cubic", "lanczos3", "lanczos4", "linear"):
        hdul, memmap = open_fits_data(tmp_path / "f.fits")
        tile = warp_tile(memmap, warp, 0, 60, 0, 80, interpolation)[0]
        del memmap
        hdul.close()
        missing = np.isnan(tile[10:-10, 10:-10])  # the rotation uncovers the corners
        assert 1 <= missing.sum() <= 64, missing.sum()
        assert missing[16:25, 26:35].sum() == missing.sum()  # all near frame pixel (40, 30)
        np.testing.assert_allclose(tile[10:-10, 10:-10][~missing], 5.0, atol=1e-4)


@pytest.mark.parametrize("k1, k2, rotvec", [
    (0.0, 0.0, [0.002, -0.001, 0.02]),
    (-0.08, 0.02, [0.01, -0.02, 0.3]),
    (0.0, 0.0, [0.0, 1.2, 0.0]),  # a wide lens turned 69 degrees: rays behind the frame camera
])
def test_tile_mapping_equals_the_camera_model(k1, k2, rotvec):
    # the compiled per-pixel mapping gives the camera module's positions bit for bit, and
    # "inside" is: in front of the frame camera and within the frame
    focal_px = 120.0 if rotvec[1] > 1 else 350.0
    ref = Camera(400, 300, focal_px, k1, k2)
    frame_camera = ref.with_focal(focal_px + 2)
    rotation = rotation_matrix(np.asarray(rotvec))
    warp = FrameWarp(path="unused.fits", ref_camera=ref, frame_camera=frame_camera,
                     rotation=rotation, offset=np.zeros(1), scale=np.ones(1),
                     target_level=np.zeros(1))
    y0, y1, x0, x1 = 0, 300, 0, 400
    yy, xx = np.mgrid[y0:y1, x0:x1]
    grid = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    want = map_ref_to_frame(grid, ref, frame_camera, rotation)
    ray_z = (rotation[2] @ np.linalg.inv(ref.intrinsic())) @ np.column_stack(
        [ref.undistort(grid), np.ones(len(grid))]).T
    with np.errstate(invalid="ignore"):
        want_inside = ((ray_z > 0) & (want[:, 0] >= -1e-3) & (want[:, 0] <= 399.001)
                       & (want[:, 1] >= -1e-3) & (want[:, 1] <= 299.001))
    xy, inside = stacking._frame_coordinates((y0, y1, x0, x1), warp, 400, 300)
    np.testing.assert_array_equal(inside, want_inside)
    assert 0 < inside.sum()
    np.testing.assert_array_equal(xy, np.clip(want[want_inside], 0, [399, 299]))
    if rotvec[1] > 1:  # behind the camera, the homography still gives pixels inside the frame
        behind = ((ray_z <= 0) & (want[:, 0] >= 0) & (want[:, 0] <= 399) & (want[:, 1] >= 0)
                  & (want[:, 1] <= 299))
        assert behind.sum() > 10_000 and not inside[behind].any()
