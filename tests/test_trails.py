"""Star-trail mode (nightstack.trails): lighten with gap filling, hot pixels, memory, fade, gamma.

The synthetic night: a fixed camera, the sky turning about a pole above the frame, each
exposure covering half of the cadence (so a plain maximum draws dotted arcs), per-frame sky
levels that differ, Gaussian noise and fixed hot pixels.
"""

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from nightstack.errors import NightstackError
from nightstack.io import write_fits_image
from nightstack.loading import load_frame
from nightstack.outputs import write_preview_png
from nightstack.trails import (
    TrailsConfig,
    estimate_sky_motion,
    fractional_motion,
    stack_trails,
    suppress_single_pixel_outliers,
    trails_config_from_dict,
)

HEIGHT, WIDTH = 120, 160
POLE_XY = np.array([80.0, -250.0])
OMEGA_RAD = 0.02  # sky rotation per cadence: 5..7.5 px of motion across the frame
EXPOSURE = 0.5  # shutter open for half of each cadence
PSF_SIGMA_PX = 1.0
NOISE_ADU = 5.0
BRIGHT_START_XY = np.array([120.0, 60.0])  # moves left, ~6.2 px per cadence
BRIGHT_FLUX = 6000.0
HOT_XY = np.array([[20, 100], [140, 20], [75, 95], [30, 15]])  # (x, y), off the bright track
HOT_ADU = 3000.0
CHANNEL_GAIN = np.array([1.0, 0.8, 0.6], dtype=np.float32)


def rotate_about_pole(xy: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    """Positions (N, 2) turned by each angle (T,) about the pole -> (T, N, 2)."""
    c, s = np.cos(angle_rad)[:, None], np.sin(angle_rad)[:, None]
    d = xy - POLE_XY
    x = POLE_XY[0] + c * d[:, 0] - s * d[:, 1]
    y = POLE_XY[1] + s * d[:, 0] + c * d[:, 1]
    return np.stack([x, y], axis=-1)


def star_field(rng, n_stars=70):
    """Initial star positions (N, 2) and fluxes (N,); star 0 is the bright one under test,
    the others keep clear of its track."""
    xy = np.column_stack([rng.uniform(-40, WIDTH + 40, 4 * n_stars),
                          rng.uniform(0, HEIGHT, 4 * n_stars)])
    clear = np.abs(xy[:, 1] - BRIGHT_START_XY[1]) > 12
    xy = xy[clear][:n_stars]
    flux = rng.uniform(300, 2500, len(xy))
    return np.vstack([BRIGHT_START_XY, xy]), np.concatenate([[BRIGHT_FLUX], flux])


def render_frame(k, xy0, flux, rng, sky_adu, with_hot=True, n_sub=16, static_xy=None):
    """Frame k (C, H, W): stars integrated over the exposure [k, k + EXPOSURE] cadences,
    plus fixed point-like foreground lights at ``static_xy`` (M, 2)."""
    times = k + EXPOSURE * (np.arange(n_sub) + 0.5) / n_sub
    pos = rotate_about_pole(xy0, OMEGA_RAD * times).reshape(-1, 2)
    weight = np.tile(flux / n_sub, n_sub)
    if static_xy is not None:
        pos = np.vstack([pos, static_xy])
        weight = np.concatenate([weight, np.full(len(static_xy), 1500.0)])
    image = np.zeros((HEIGHT, WIDTH))
    # bilinear deposit of every sub-exposure position, then the PSF
    x0, y0 = np.floor(pos[:, 0]).astype(int), np.floor(pos[:, 1]).astype(int)
    fx, fy = pos[:, 0] - x0, pos[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < WIDTH) & (yi >= 0) & (yi < HEIGHT)
        np.add.at(image, (yi[ok], xi[ok]), weight[ok] * w[ok])
    stars = ndimage.gaussian_filter(image, PSF_SIGMA_PX)
    frame = CHANNEL_GAIN[:, None, None] * stars[None] + sky_adu
    frame = frame + rng.normal(0, NOISE_ADU, frame.shape)
    if with_hot:
        frame[:, HOT_XY[:, 1], HOT_XY[:, 0]] += HOT_ADU
    return frame.astype(np.float32)


def write_sequence(folder, n_frames, seed=3, **kwargs):
    rng = np.random.default_rng(seed)
    xy0, flux = star_field(rng)
    paths = []
    for k in range(n_frames):
        path = folder / f"frame_{k:03d}.fits"
        write_fits_image(path, render_frame(k, xy0, flux, rng, 100.0 + 15.0 * (k % 5), **kwargs))
        paths.append(str(path))
    return paths, xy0


@pytest.fixture(scope="module")
def sequence12(tmp_path_factory):
    return write_sequence(tmp_path_factory.mktemp("trails12"), 12)


def bright_track(n_frames, n_samples=600):
    """Positions (S, 2) along the bright star's true arc, from the middle of the first
    exposure to the middle of the last one (the trail ends are dimmer by construction)."""
    times = np.linspace(EXPOSURE / 2, n_frames - 1 + EXPOSURE / 2, n_samples)
    return rotate_about_pole(BRIGHT_START_XY[None], OMEGA_RAD * times)[:, 0]


def profile(image, track_xy):
    """Green-channel values above the image's sky along a track (bilinear)."""
    green = image[1]
    return ndimage.map_coordinates(green, [track_xy[:, 1], track_xy[:, 0]], order=1) - np.median(green)


# ---------------------------------------------------------------------------- lighten + gaps


def test_gap_filling_closes_the_dotted_arcs(sequence12):
    paths, _ = sequence12
    track = bright_track(len(paths))
    plain, info_plain = stack_trails(paths, TrailsConfig(gap_fill=False))
    filled, info = stack_trails(paths, TrailsConfig(gap_fill=True, gap_steps=4))
    p_plain, p_filled = profile(plain, track), profile(filled, track)
    assert plain.shape == filled.shape == (3, HEIGHT, WIDTH) and filled.dtype == np.float32
    # without filling: one dip per gap, deep
    assert p_plain.min() < 0.2 * np.median(p_plain)
    dips = np.flatnonzero(np.diff((p_plain < 0.5 * np.median(p_plain)).astype(int)) == 1)
    assert len(dips) >= len(paths) - 2
    # with filling: continuous, at the brightness of the exposures' own arcs
    assert p_filled.min() > 0.5 * np.median(p_filled)
    assert np.median(p_filled) == pytest.approx(np.percentile(p_plain, 90), rel=0.2)
    assert info["n_frames"] == 12 and info["gaps_filled"] == 11 and info["gaps_unfilled"] == 0
    assert info_plain["gap_fill"] is False and info_plain["motions"] == []
    assert all(m["source"] == "stars" for m in info["motions"])
    # copies 1/5 of the ~7.5 px motion apart: each 3+ px exposure arc overlaps the next copy
    assert 1.0 < info["substep_px_max"] < 2.0


def test_measured_motion_is_the_rotation_about_the_pole(sequence12):
    paths, _ = sequence12
    _, info = stack_trails(paths[:3], TrailsConfig())
    assert [m["frame"] for m in info["motions"]] == [1, 2]
    for m in info["motions"]:
        assert m["angle_deg"] == pytest.approx(np.degrees(OMEGA_RAD), abs=0.05)
        assert m["rms_px"] < 0.5 and m["n_pairs"] >= 10


def test_motion_ignores_a_static_foreground(tmp_path):
    """More fixed lights than stars: the sky is still what is measured (the moving part)."""
    rng = np.random.default_rng(8)
    xy0, flux = star_field(rng, n_stars=40)
    static_xy = np.column_stack([rng.uniform(5, WIDTH - 5, 60), rng.uniform(5, HEIGHT - 5, 60)])
    paths = []
    for k in range(3):
        path = tmp_path / f"fg_{k}.fits"
        write_fits_image(path, render_frame(k, xy0, flux, rng, 100.0, static_xy=static_xy))
        paths.append(str(path))
    _, info = stack_trails(paths, TrailsConfig())
    for m in info["motions"]:
        assert m["source"] == "stars" and m["moving_only"] is True
        assert m["angle_deg"] == pytest.approx(np.degrees(OMEGA_RAD), abs=0.05)


def test_fractional_motion_is_a_fraction_of_the_rotation():
    grid = np.array([[0.0, 0.0], [159.0, 0.0], [0.0, 119.0], [159.0, 119.0], [80.0, 60.0]])
    before = grid
    after = rotate_about_pole(grid, np.array([OMEGA_RAD]))[0]
    motion = estimate_sky_motion(before, after)
    assert motion is not None and motion.rms_px < 1e-6
    quarter = fractional_motion(motion.matrix, 0.25)
    truth = rotate_about_pole(grid, np.array([0.25 * OMEGA_RAD]))[0]
    moved = grid @ quarter[:2, :2].T + quarter[:2, 2]
    assert np.max(np.abs(moved - truth)) < 1e-6


def test_hot_pixels_stay_single_points(sequence12):
    paths, _ = sequence12
    image, info = stack_trails(paths, TrailsConfig(gap_fill=True, gap_steps=4))
    sky = np.median(image[1])
    assert info["hot_pixels_suppressed"] >= len(HOT_XY) * 3 * (len(paths) - 1)
    for x, y in HOT_XY:
        box = image[1, y - 4 : y + 5, x - 4 : x + 5] - sky
        bright = np.count_nonzero(box > 0.5 * HOT_ADU * 0.8)
        # the dot itself stays (no registration), but no arc is drawn from it
        assert bright == 1, (x, y, bright)


def test_outlier_test_keeps_stars_and_removes_hot_pixels():
    rng = np.random.default_rng(1)
    img = rng.normal(0, 2.0, (40, 40)).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    img += 200 * np.exp(-((xx - 10.3) ** 2 + (yy - 20.6) ** 2) / (2 * 0.8**2))  # sharp star
    img[30, 30] += 300  # hot pixel
    cleaned, n_hot = suppress_single_pixel_outliers(img, 5.0)
    assert n_hot == 1
    assert cleaned[30, 30] < 10
    assert np.array_equal(cleaned[15:26, 5:16], img[15:26, 5:16])


# ---------------------------------------------------------------------------- streaming memory


def _peak_traced_bytes(paths, cfg):
    tracemalloc.start()
    try:
        stack_trails(paths, cfg)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_frames(tmp_path):
    paths, _ = write_sequence(tmp_path, 24)
    cfg = TrailsConfig(gap_fill=True)
    _peak_traced_bytes(paths[:2], cfg)  # warm caches (imports, FFT plans) outside the comparison
    peak6 = _peak_traced_bytes(paths[:6], cfg)
    peak24 = _peak_traced_bytes(paths, cfg)
    frame_bytes = 3 * HEIGHT * WIDTH * 4
    assert peak24 <= 1.3 * peak6, (peak6, peak24)
    # and it is a handful of frames, not the sequence
    assert peak24 < 24 * frame_bytes


# ---------------------------------------------------------------------------- comet fade


def test_comet_fade_brightens_the_trail_along_time(sequence12):
    paths, _ = sequence12
    fade = 0.15
    image, _ = stack_trails(paths, TrailsConfig(gap_fill=False, comet_fade=fade))
    # mean brightness along the middle of each exposure's own arc
    times = np.arange(len(paths))[:, None] + EXPOSURE * np.linspace(0.2, 0.8, 9)[None]
    arcs = rotate_about_pole(BRIGHT_START_XY[None], OMEGA_RAD * times.ravel())[:, 0]
    levels = profile(image, arcs).reshape(len(paths), -1).mean(axis=1)
    assert np.all(np.diff(levels) > 0), levels
    slope = np.polyfit(np.arange(len(levels)), np.log(levels), 1)[0]
    assert slope == pytest.approx(-np.log(1 - fade), rel=0.15)


def test_comet_fade_with_gap_filling_stays_continuous(sequence12):
    paths, _ = sequence12
    image, _ = stack_trails(paths, TrailsConfig(gap_fill=True, comet_fade=0.05))
    p = profile(image, bright_track(len(paths)))
    first, last = p[: len(p) // 10], p[-len(p) // 10 :]
    assert np.median(first) < np.median(last)
    assert p.min() > 0.4 * np.median(p)


# ---------------------------------------------------------------------------- average (gamma)


def test_average_is_the_gamma_correct_mean_on_constant_fields(tmp_path):
    levels = np.array([10.0, 40.0, 90.0, 200.0, 30.0])
    paths = []
    for k, level in enumerate(levels):
        path = tmp_path / f"flat_{k}.fits"
        write_fits_image(path, np.full((3, 16, 20), level, dtype=np.float32))
        paths.append(str(path))
    gamma = 2.2
    image, info = stack_trails(paths, TrailsConfig(method="average", gamma=gamma))
    expected = np.mean(levels**gamma) ** (1 / gamma)
    assert info["gap_fill"] is False and info["n_frames"] == len(levels)
    np.testing.assert_allclose(image, expected, rtol=1e-5)
    assert abs(expected - levels.mean()) > 0.1 * levels.mean()  # the test can tell them apart
    # gamma 1 is the plain mean
    plain, _ = stack_trails(paths, TrailsConfig(method="average", gamma=1.0))
    np.testing.assert_allclose(plain, levels.mean(), rtol=1e-5)


# ---------------------------------------------------------------------------- inputs and settings


def test_bad_frames_are_skipped_and_settings_checked(tmp_path, sequence12):
    paths, _ = sequence12
    odd = tmp_path / "odd.fits"
    write_fits_image(odd, np.zeros((3, 10, 10), dtype=np.float32))
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"not a fits file at all")
    image, info = stack_trails([paths[0], str(odd), str(broken), paths[1]], TrailsConfig())
    assert info["n_frames"] == 2 and len(info["skipped"]) == 2
    assert "shape" in info["skipped"][0]["reason"]
    with pytest.raises(NightstackError, match="no usable frame"):
        stack_trails([str(broken)], TrailsConfig())
    with pytest.raises(NightstackError, match="no frames"):
        stack_trails([], TrailsConfig())
    cfg = trails_config_from_dict({"method": "Average", "gap_steps": 6, "comet_fade": 0.1})
    assert cfg.method == "average" and cfg.gap_steps == 6 and cfg.gap_fill is True
    for bad in ({"method": "max"}, {"gap_steps": 2.5}, {"comet_fade": 1.0}, {"gap_fill": "yes"},
                {"colour": 1}):
        with pytest.raises(NightstackError):
            trails_config_from_dict(bad)


def test_mono_frames_keep_their_shape(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        path = tmp_path / f"mono_{k}.fits"
        write_fits_image(path, rng.normal(50, 1, (30, 40)).astype(np.float32))
        paths.append(str(path))
    image, info = stack_trails(paths, TrailsConfig())
    assert image.shape == (30, 40)
    assert info["gaps_unfilled"] == 2  # pure noise: no stars, no motion, no copies


# ---------------------------------------------------------------------------- real frames


def test_real_canon_startrail_frames(tmp_path, shared_data):
    folder = shared_data("startrail_canon40d_trees")
    paths, frames = [], []
    for k, jpeg in enumerate(sorted(folder.glob("*.JPG"))):
        data = load_frame(jpeg).data.astype(np.float32)
        path = tmp_path / f"trees_{k}.fits"
        write_fits_image(path, data)
        paths.append(str(path))
        frames.append(data)
    assert len(paths) == 6
    image, info = stack_trails(paths, TrailsConfig())
    write_preview_png(tmp_path / "trails_lighten.png", image)
    assert image.shape == frames[0].shape and np.all(np.isfinite(image))
    assert info["n_frames"] == 6 and info["skipped"] == []
    # a fixed tripod: the sky moved by about a pixel or less between frames
    assert info["gaps_filled"] == 5
    assert all(m["motion_px"] < 3.0 for m in info["motions"])
    mean_sky = np.array(info["mean_sky"])[:, None, None]
    lum = image.mean(axis=0)
    sky_region = lum > np.percentile(lum, 40)  # bright sky, not the dark trees
    for frame in frames:
        sky = np.median(frame[:, ::4, ::4].reshape(3, -1), axis=1)[:, None, None]
        normalised = frame - sky + mean_sky
        # lighten: never below any frame (brought to the common sky level), anywhere
        assert np.all(image >= normalised - 1e-3)
        assert image[:, sky_region].max() >= normalised[:, sky_region].max() - 1e-3
