"""The demo night: files rawpy can read, and pixels that agree with the recorded truth."""

import datetime as dt
from dataclasses import replace

import numpy as np
import pytest
import rawpy
from PIL import Image
from scipy import ndimage

from nightstack import config as ns_config
from nightstack import demo
from nightstack.camera import (
    Camera,
    apply_homography,
    map_ref_to_frame,
    rotvec_from_matrix,
)
from nightstack.demo import DemoConfig, generate_night, light_names
from nightstack.errors import NightstackError
from nightstack.io import read_json

# Small frames, a long cadence so the sky turns several pixels between lights, and a dark sky
# so bright stars centroid well. k1/k2 make the distortion several pixels at the corners.
DISTORTED = DemoConfig(
    n_lights=4,
    width_px=400,
    height_px=300,
    focal_px=600.0,
    k1=-0.08,
    k2=0.01,
    cadence_s=600.0,
    n_stars=1500,
    sky_adu=60.0,
    read_noise_adu=3.0,
    n_hot_pixels=20,
    satellite_frame=2,
    n_biases=2,
    n_darks=2,
    n_flats=2,
    seed=3,
)
ZOOMED = DemoConfig(
    n_lights=4,
    width_px=400,
    height_px=300,
    focal_px=600.0,
    cadence_s=600.0,
    n_stars=1500,
    sky_adu=60.0,
    read_noise_adu=3.0,
    n_hot_pixels=20,
    satellite_frame=1,
    n_biases=1,
    n_darks=1,
    n_flats=1,
    zoom_steps=[1.0, 1.04, 0.96, 1.02],
    psf="gaussian",
    cfa_pattern="GBRG",
    seed=11,
)
CONFIGS = {"distorted": DISTORTED, "zoomed": ZOOMED}


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """name -> (folder, truth, config) for each small demo night, generated once."""
    root = tmp_path_factory.mktemp("demo")
    return {
        name: (root / name, generate_night(root / name, cfg), cfg) for name, cfg in CONFIGS.items()
    }


def read_raw(path):
    with rawpy.imread(str(path)) as raw:
        return raw.raw_image_visible.astype(float)


def green_centroid(mosaic, green_mask, xy, radius_px=3, iterations=3):
    """Background-subtracted intensity-weighted centroid (x, y) of green pixels near ``xy``."""
    rows, cols = np.mgrid[0 : mosaic.shape[0], 0 : mosaic.shape[1]]
    centre = np.asarray(xy, dtype=float)
    for _ in range(iterations):  # re-centre the window on the last estimate
        r = np.hypot(cols - centre[0], rows - centre[1])
        annulus = green_mask & (r > 7) & (r < 11)
        window = green_mask & (r <= radius_px)
        w = mosaic[window] - np.median(mosaic[annulus])
        centre = np.array([np.sum(w * cols[window]), np.sum(w * rows[window])]) / np.sum(w)
    return centre


def bright_isolated_stars(truth, cfg):
    """Reference positions (N, 2) and fluxes (N,) of bright unsaturated stars, no bright neighbour."""
    stars = truth["stars"]
    xy = np.array([[s["x"], s["y"]] for s in stars])
    flux = np.array([s["flux_e"] for s in stars])
    peak_e = flux * demo.psf_peak_fraction(cfg)
    unsaturated = (flux > 1500) & (peak_e < 0.6 * (cfg.white_level - cfg.bias_adu))
    keep = []
    for i in np.flatnonzero(unsaturated):  # a few dozen candidates
        d = np.hypot(*(xy - xy[i]).T)
        neighbours = (d > 0) & (d < 8) & (flux > 0.05 * flux[i])
        if not neighbours.any():
            keep.append(i)
    return xy[keep], flux[keep]


def distance_to_trail_px(xy, satellite):
    angle = np.radians(satellite["angle_deg"])
    return np.abs(
        (xy[:, 0] - satellite["x"]) * np.sin(angle) - (xy[:, 1] - satellite["y"]) * np.cos(angle)
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_star_centroids_follow_truth_homography_and_distortion(nights, name):
    folder, truth, cfg = nights[name]
    ref_cam = Camera(**truth["camera"])
    stars_ref, flux = bright_isolated_stars(truth, cfg)
    green = demo.cfa_channel_map(cfg.cfa_pattern, cfg.height_px, cfg.width_px) == 1
    errors, fluxes, distortion_shift = [], [], []
    for frame in truth["frames"]:
        cam = ref_cam.with_focal(frame["focal_px"])
        h = np.array(frame["H"])
        predicted = cam.distort(apply_homography(h, ref_cam.undistort(stars_ref)))
        assert np.allclose(
            predicted, map_ref_to_frame(stars_ref, ref_cam, cam, np.array(frame["rotation"]))
        )
        usable = (
            (predicted > 12).all(axis=1)
            & (predicted[:, 0] < cfg.width_px - 12)
            & (predicted[:, 1] < cfg.height_px - 12)
        )
        if frame["index"] == truth["satellite_frame"]:
            usable &= distance_to_trail_px(predicted, truth["satellite"]) > 12
        mosaic = read_raw(folder / frame["file"])
        measured = np.array([green_centroid(mosaic, green, p) for p in predicted[usable]])
        errors.append(np.hypot(*(measured - predicted[usable]).T))
        fluxes.append(flux[usable])
        if cam.has_distortion:
            undistorted = apply_homography(h, ref_cam.undistort(stars_ref[usable]))
            distortion_shift.append(np.hypot(*(undistorted - predicted[usable]).T))
    errors, fluxes = np.concatenate(errors), np.concatenate(fluxes)
    assert errors.size >= 20, "too few bright isolated stars to test"
    assert np.median(errors) < 0.15
    assert np.max(errors[fluxes > 3000]) < 0.3  # the brightest, least noisy centroids
    assert np.max(errors) < 0.5
    if cfg.k1:
        # The distortion is really in the pixels: ignoring it would miss by far more.
        distortion_shift = np.concatenate(distortion_shift)
        assert np.median(distortion_shift) > 0.5 and np.max(distortion_shift) > 2.0


def test_sky_turns_about_the_pole_between_frames(nights):
    _, truth, cfg = nights["distorted"]
    frames = truth["frames"]
    assert np.allclose(frames[0]["H"], np.eye(3), atol=1e-12)
    for frame in frames:
        rotation = np.array(frame["rotation"])
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        angle = np.linalg.norm(frame["rotvec"])
        assert angle == pytest.approx(demo.SIDEREAL_RATE_RAD_S * frame["time_s"], rel=1e-9)
        assert np.allclose(rotvec_from_matrix(rotation), frame["rotvec"])
    # Pixels near the pole move least: the pole stays (almost) put in every frame.
    pole = np.array([truth["pole_ref_px"]])
    last = np.array(frames[-1]["H"])
    cam = Camera(**truth["camera"])
    centre_shift = np.hypot(*(apply_homography(last, cam.centre[None]) - cam.centre)[0])
    pole_shift = np.hypot(*(apply_homography(last, cam.undistort(pole)) - cam.undistort(pole))[0])
    assert pole[0, 1] < 0 and pole_shift < 0.01 * centre_shift


def test_every_file_reads_back_with_rawpy(nights):
    for folder, truth, cfg in nights.values():
        kinds = {
            "lights": (cfg.n_lights, cfg.exptime_s),
            "biases": (cfg.n_biases, 1 / 4000),
            "darks": (cfg.n_darks, cfg.exptime_s),
            "flats": (cfg.n_flats, 1.0),
        }
        for sub, (count, exptime_s) in kinds.items():
            files = sorted((folder / sub).glob("*.dng"))
            assert len(files) == count
            for path in files:
                with rawpy.imread(str(path)) as raw:
                    letters = raw.color_desc.decode()
                    seen = "".join(letters[i] for i in raw.raw_pattern.flatten())
                    assert seen == cfg.cfa_pattern
                    assert list(raw.black_level_per_channel) == [cfg.bias_adu] * 4
                    assert raw.white_level == cfg.white_level
                    assert raw.other.shutter_speed == pytest.approx(exptime_s, rel=1e-6)
                    assert raw.raw_image_visible.shape == (cfg.height_px, cfg.width_px)
        assert [p.name for p in sorted((folder / "lights").glob("*.dng"))] == light_names(cfg)
        stamps = []
        for name in light_names(cfg):
            with rawpy.imread(str(folder / "lights" / name)) as raw:
                stamps.append(raw.other.timestamp)
        gaps = [
            (b - a).total_seconds() if isinstance(a, dt.datetime) else b - a
            for a, b in zip(stamps, stamps[1:])
        ]
        assert gaps == pytest.approx([cfg.cadence_s] * (cfg.n_lights - 1))
        assert read_json(folder / "truth.json")["frames"] == truth["frames"]


def test_satellite_only_in_its_frame_along_the_recorded_line(nights):
    folder, truth, cfg = nights["distorted"]
    sat = truth["satellite"]
    assert truth["satellite_frame"] == sat["frame"] == cfg.satellite_frame
    k = sat["frame"]
    with_trail = read_raw(folder / truth["frames"][k]["file"])
    before = read_raw(folder / truth["frames"][k - 1]["file"])
    after = read_raw(folder / truth["frames"][k + 1]["file"])
    (x0, y0), (x1, y1) = sat["endpoints_px"]
    t = np.linspace(0.05, 0.95, 300)
    along = np.stack([x0 + t * (x1 - x0), y0 + t * (y1 - y0)], axis=1)
    normal = np.array([-(y1 - y0), x1 - x0]) / np.hypot(x1 - x0, y1 - y0)

    def median_at(image, xy):
        xy = xy[
            (xy[:, 0] > 0)
            & (xy[:, 0] < cfg.width_px - 1)
            & (xy[:, 1] > 0)
            & (xy[:, 1] < cfg.height_px - 1)
        ]
        return np.median(image[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)])

    for neighbour in (before, after):
        diff = with_trail - neighbour
        assert median_at(diff, along) > 0.3 * sat["peak_e"] / cfg.gain_e_per_adu
        assert abs(median_at(diff, along + 15 * normal)) < 10
        assert abs(median_at(after - before, along)) < 10


def test_hot_pixels_sit_at_recorded_positions_in_darks_and_lights(nights):
    folder, truth, cfg = nights["distorted"]
    rows = np.array([h["y"] for h in truth["hot_pixels"]])
    cols = np.array([h["x"] for h in truth["hot_pixels"]])
    expected_adu = np.array([h["dark_adu_s"] for h in truth["hot_pixels"]]) * cfg.exptime_s
    is_hot = np.zeros((cfg.height_px, cfg.width_px), dtype=bool)
    is_hot[rows, cols] = True
    for path in [folder / "darks" / "dark_000.dng", folder / "lights" / "light_001.dng"]:
        image = read_raw(path)
        excess = image - ndimage.median_filter(image, size=5)
        assert np.median(excess[rows, cols] / expected_adu) == pytest.approx(1.0, abs=0.15)
        assert np.mean(excess[~is_hot] > 0.5 * expected_adu.min()) < 0.01
    bias = read_raw(folder / "biases" / "bias_000.dng")
    assert np.abs(bias[rows, cols] - cfg.bias_adu).max() < 8 * cfg.read_noise_adu


def test_flats_show_vignetting_and_calibration_frames_share_the_bias(nights):
    folder, truth, cfg = nights["distorted"]
    flat = read_raw(folder / "flats" / "flat_000.dng") - cfg.bias_adu
    green = demo.cfa_channel_map(cfg.cfa_pattern, cfg.height_px, cfg.width_px) == 1
    centre = flat[140:160, 190:210][green[140:160, 190:210]].mean()
    corner = flat[:20, :20][green[:20, :20]].mean()
    assert corner / centre == pytest.approx(1 - cfg.vignetting, abs=0.03)
    bias = read_raw(folder / "biases" / "bias_000.dng")
    dark = read_raw(folder / "darks" / "dark_000.dng")
    assert np.median(bias) == pytest.approx(cfg.bias_adu, abs=1)
    assert np.median(dark - bias) == pytest.approx(cfg.dark_current_adu_s * cfg.exptime_s, abs=2)


def test_star_field_density_and_magnitude_counts():
    cfg = DemoConfig(n_lights=3)
    scene = demo.build_scene(cfg)
    xy, front = demo.project(scene["cameras"][0], scene["rotations"][0], scene["directions"])
    assert np.sum(front & demo.inside_frame(xy, scene["cameras"][0])) == cfg.n_stars
    mags = -2.5 * np.log10(scene["flux_e"] / scene["flux_e"].min())
    counts, edges = np.histogram(mags, bins=np.arange(-5.0, 0.1, 1.0))
    slope_per_mag = np.polyfit(edges[:-1], np.log10(counts), 1)[0]
    assert slope_per_mag == pytest.approx(np.log10(3.0), abs=0.08)  # x3 per magnitude
    headroom = cfg.white_level - cfg.bias_adu - cfg.sky_adu
    assert np.sum(scene["flux_e"] * demo.psf_peak_fraction(cfg) > headroom) >= 2


def test_folder_appears_atomically(tmp_path, monkeypatch):
    cfg = DemoConfig(
        n_lights=3,
        width_px=64,
        height_px=48,
        focal_px=100.0,
        n_stars=20,
        n_hot_pixels=3,
        satellite_frame=-1,
        n_biases=1,
        n_darks=1,
        n_flats=1,
    )
    real_write = demo.write_dng
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(*args, **kwargs)

    monkeypatch.setattr(demo, "write_dng", failing_write)
    with pytest.raises(OSError):
        generate_night(tmp_path / "night", cfg)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(demo, "write_dng", real_write)
    first = generate_night(tmp_path / "night", cfg)
    again = generate_night(tmp_path / "night", cfg)  # an earlier demo night is replaced
    assert first == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["night"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.dng").write_bytes(b"x")
    with pytest.raises(NightstackError, match="not a demo night"):
        generate_night(tmp_path / "mine", cfg)
    with pytest.raises(NightstackError, match="zoom_steps"):
        generate_night(
            tmp_path / "bad", DemoConfig(n_lights=2, zoom_steps=[1.0], satellite_frame=-1)
        )


# ----------------------------------------------------------------------------- landscape

# A landscape night and the same night without its foreground (same seed: same stars, sensor,
# dust and trail). A long cadence moves stars ~30 px between the first and last light; the
# seed puts the satellite trail across both sky and ground.
LANDSCAPE = DemoConfig(
    n_lights=4,
    width_px=800,
    height_px=533,
    focal_px=1200.0,
    cadence_s=120.0,
    n_stars=1500,
    n_hot_pixels=40,
    satellite_frame=1,
    n_biases=1,
    n_darks=1,
    n_flats=1,
    seed=3,
    landscape=True,
)


@pytest.fixture(scope="module")
def landscape_nights(tmp_path_factory):
    """'on'/'off' -> (folder, truth, config, bias-subtracted lights (N, H, W))."""
    root = tmp_path_factory.mktemp("landscape")
    out = {}
    for name, cfg in {"on": LANDSCAPE, "off": replace(LANDSCAPE, landscape=False)}.items():
        truth = generate_night(root / name, cfg)
        lights = np.stack([read_raw(root / name / f["file"]) for f in truth["frames"]])
        out[name] = (root / name, truth, cfg, lights - cfg.bias_adu)
    return out


def hot_pixel_mask(truth, cfg):
    hot = np.zeros((cfg.height_px, cfg.width_px), dtype=bool)
    hot[[h["y"] for h in truth["hot_pixels"]], [h["x"] for h in truth["hot_pixels"]]] = True
    return hot


def noise_adu(level_adu, cfg):
    """Expected per-pixel noise (ADU) of one light at a mean level (ADU above bias)."""
    return np.sqrt(np.maximum(level_adu, 0.0) / cfg.gain_e_per_adu + cfg.read_noise_adu**2)


def landscape_regions(night):
    """Sky mask from the truth file, and the sky/ground interiors (3 px from the edge, no hot
    pixels)."""
    folder, truth, cfg, _ = night
    sky = demo.read_sky_mask(folder / truth["landscape"]["sky_mask"])
    hot = hot_pixel_mask(truth, cfg)
    sky_in = ndimage.binary_erosion(sky, iterations=3, border_value=1) & ~hot
    ground_in = ndimage.binary_erosion(~sky, iterations=3, border_value=1) & ~hot
    return sky, sky_in, ground_in


def test_landscape_truth_mask_file_and_record(landscape_nights):
    folder, truth, cfg, _ = landscape_nights["on"]
    record = truth["landscape"]
    assert record["sky_mask"] == demo.SKY_MASK_FILE
    path = folder / record["sky_mask"]
    assert path.parent == folder  # at the night's root: never a light
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (cfg.width_px, cfg.height_px)
        pixels = np.asarray(image)
    assert set(np.unique(pixels)) == {0, 255}
    sky = demo.read_sky_mask(path)
    assert np.array_equal(sky, pixels == 255)
    assert record["ground_fraction"] == pytest.approx(1.0 - sky.mean(), abs=1e-12)
    # The hills fill the bottom 20-35% of the frame, varying across the width.
    horizon = np.array(record["horizon_px"])
    ground_height = (cfg.height_px - 0.5 - horizon) / cfg.height_px
    assert ground_height.min() >= 0.2 - 1e-9 and ground_height.max() <= 0.35 + 1e-9
    assert np.ptp(ground_height) > 0.1
    # Pixel-centre rule: every column is ground exactly from the first row on/below the horizon.
    rows = np.arange(cfg.height_px)[:, None]
    below = rows >= horizon[None, :]
    assert np.all(~sky[below]) and 0.2 < record["ground_fraction"] < 0.45
    # The inventory never sees the mask: it is not in lights/.
    assert ns_config.inventory(folder)["light"] == sorted((folder / "lights").glob("*.dng"))


def test_landscape_ground_stays_still_while_the_sky_turns(landscape_nights):
    _, _, cfg, lights = landscape_nights["on"]
    _, sky_in, ground_in = landscape_regions(landscape_nights["on"])
    level = lights.mean(axis=0)
    z = (lights[-1] - lights[0]) / (np.sqrt(2.0) * noise_adu(level, cfg))
    # On the ground the difference of two lights is pure noise (texture and all identical) ...
    assert np.std(z[ground_in]) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(z[ground_in])) < 5.0 / np.sqrt(ground_in.sum())
    assert np.mean(np.abs(z[ground_in]) > 6) < 1e-5
    # ... while in the sky the stars have moved away: hundreds of strong residuals.
    assert np.sum(np.abs(z[sky_in]) > 6) > 200


def test_landscape_hides_stars_and_trail_behind_the_ground(landscape_nights):
    _, truth, cfg, lights = landscape_nights["on"]
    lights_off = landscape_nights["off"][3]
    sky, _, ground_in = landscape_regions(landscape_nights["on"])
    deep_ground = ndimage.binary_erosion(~sky, iterations=6, border_value=1)
    xy = np.array([[s["x"], s["y"]] for s in truth["stars"]])
    peak_adu = np.array([s["flux_e"] for s in truth["stars"]]) * demo.psf_peak_fraction(cfg)
    ij = np.round(xy).astype(int)
    inside = (ij[:, 0] >= 2) & (ij[:, 0] < cfg.width_px - 2) & (ij[:, 1] >= 2)
    inside &= ij[:, 1] < cfg.height_px - 2
    ij, peak_adu = ij[inside], peak_adu[inside] / cfg.gain_e_per_adu
    behind = deep_ground[ij[:, 1], ij[:, 0]] & (peak_adu > 200)
    assert behind.sum() >= 5

    def star_z(night_lights):
        """3x3 sum of light 0 - light 3 at each hidden star's light-0 position, in sigmas."""
        diff = ndimage.uniform_filter(night_lights[0] - night_lights[-1], 3) * 9
        level = ndimage.uniform_filter(night_lights.mean(axis=0), 3)
        return diff[ij[behind, 1], ij[behind, 0]] / (3 * np.sqrt(2) * noise_adu(level, cfg)[
            ij[behind, 1], ij[behind, 0]
        ])

    assert np.all(star_z(lights_off) > 10)  # without the foreground these stars are bright
    assert np.all(np.abs(star_z(lights)) < 5)  # behind it, nothing
    # The satellite trail stops at the horizon: only noise where it crosses the ground.
    sat = truth["satellite"]
    rows, cols = np.mgrid[0 : cfg.height_px, 0 : cfg.width_px]
    on_trail = distance_to_trail_px(np.stack([cols.ravel(), rows.ravel()], 1), sat) < 1.0
    on_trail = on_trail.reshape(sky.shape)
    k = sat["frame"]
    trail_diff = lights[k] - 0.5 * (lights[k - 1] + lights[k + 1])
    sigma = noise_adu(lights.mean(axis=0), cfg) * np.sqrt(1.5)
    assert (on_trail & ground_in).sum() > 100 and (on_trail & sky).sum() > 100
    assert np.median(trail_diff[on_trail & sky]) > 0.3 * sat["peak_e"] / cfg.gain_e_per_adu
    ground_z = trail_diff[on_trail & ground_in] / sigma[on_trail & ground_in]
    assert abs(np.mean(ground_z)) < 5.0 / np.sqrt(ground_z.size) + 0.05


def test_landscape_ground_is_dim_textured_and_matches_the_mask(landscape_nights):
    _, _, cfg, lights = landscape_nights["on"]
    sky, sky_in, ground_in = landscape_regions(landscape_nights["on"])
    green = demo.cfa_channel_map(cfg.cfa_pattern, cfg.height_px, cfg.width_px) == 1
    mean = lights.mean(axis=0)
    sky_level = np.median(mean[sky_in & green])
    ground = mean[ground_in & green]
    # Dim: 10-40% of the sky, before vignetting (which only dims it further).
    assert 0.1 * (1 - cfg.vignetting) * cfg.sky_adu < np.median(ground) < 0.4 * cfg.sky_adu
    assert np.mean(ground < np.percentile(mean[sky_in & green], 1)) > 0.999
    # Textured: the difference of green neighbours two columns apart in the mean of the lights
    # varies far more than the noise of that mean explains.
    noise_var = np.var((lights[-1] - lights[0])[ground_in]) / 2 / cfg.n_lights
    both = ground_in[:, 2:] & ground_in[:, :-2] & green[:, 2:]
    neighbour_diff = (mean[:, 2:] - mean[:, :-2])[both]
    assert np.var(neighbour_diff) > 4 * (2 * noise_var)
    # The mask is exact at its edge: nearly every pixel of the ground's outer ring is darker
    # than 60% of the most vignetted sky, nearly every pixel of the sky's ring beside it brighter.
    threshold = 0.6 * (1 - cfg.vignetting) * sky_level
    assert np.percentile(mean[ground_in & green], 99.9) < threshold
    edge_ground = ~sky & ndimage.binary_dilation(sky)
    edge_sky = sky & ndimage.binary_dilation(~sky)
    assert np.mean(mean[edge_ground & green] < threshold) > 0.98
    assert np.mean(mean[edge_sky & green] > threshold) > 0.98


def test_landscape_has_thin_branching_structures_against_the_sky(landscape_nights):
    folder, truth, cfg, lights = landscape_nights["on"]
    sky = demo.read_sky_mask(folder / truth["landscape"]["sky_mask"])
    horizon = np.array(truth["landscape"]["horizon_px"])
    rows = np.arange(cfg.height_px)[:, None]
    above_hills = ~sky & (rows < horizon.min() - 1)  # rows where only trees/poles are ground
    labels, n_objects = ndimage.label(above_hills)
    assert n_objects >= 2
    # Horizontal runs of ground across those rows: most are thin (< 8 px), none is empty.
    edges = np.diff(above_hills.astype(int), axis=1, prepend=0, append=0)
    run_lengths = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
    assert run_lengths.size > 50 and np.mean(run_lengths < 8) > 0.8
    assert run_lengths.min() >= 1 and np.sum(run_lengths <= 3) > 20
    # Branching: some row crosses one connected object at least twice.
    starts = edges[:, :-1] == 1
    r, c = np.nonzero(starts)
    per_row_object = np.unique(np.stack([r, labels[r, c]], axis=1), axis=0, return_counts=True)
    assert per_row_object[1].max() >= 2
    # The thin structures are in the pixels too: dark against the sky beside them.
    green = demo.cfa_channel_map(cfg.cfa_pattern, cfg.height_px, cfg.width_px) == 1
    thin = above_hills & (ndimage.distance_transform_edt(above_hills) <= 1.5)
    beside = ndimage.binary_dilation(above_hills, iterations=3) & sky
    mean = lights.mean(axis=0)
    assert np.median(mean[thin & green]) < 0.5 * np.median(mean[beside & green])


def test_landscape_is_deterministic_and_leaves_the_plain_night_alone(landscape_nights):
    folder_off, truth_off, cfg_off, lights_off = landscape_nights["off"]
    assert "landscape" not in truth_off and not (folder_off / demo.SKY_MASK_FILE).exists()
    on = demo.build_scene(LANDSCAPE)
    off = demo.build_scene(cfg_off)
    assert off["landscape"] is None
    # The foreground has its own random stream: stars, sensor, dust, trail as without it.
    assert np.array_equal(on["directions"], off["directions"])
    assert np.array_equal(on["flux_e"], off["flux_e"])
    assert np.array_equal(on["sensor"].hot_rows, off["sensor"].hot_rows)
    assert on["dust"] == off["dust"] and on["satellite"] == off["satellite"]
    again = demo.draw_landscape(LANDSCAPE, on["channel_map"])
    assert np.array_equal(again["sky_mask"], on["landscape"]["sky_mask"])
    assert np.array_equal(again["ground_e"], on["landscape"]["ground_e"])
    other = demo.draw_landscape(replace(LANDSCAPE, seed=4), on["channel_map"])
    assert not np.array_equal(other["sky_mask"], on["landscape"]["sky_mask"])
    # No ground in the plain night: nothing anywhere near as dark as the foreground.
    mean = lights_off.mean(axis=0)
    assert np.mean(mean < 0.5 * (1 - cfg_off.vignetting) * cfg_off.sky_adu) < 1e-4
    assert lights_off.shape == landscape_nights["on"][3].shape


@pytest.mark.parametrize("beta", [3.0, 2.5])
def test_moffat_stamps_average_the_psf_over_nine_subpixels(beta):
    rng = np.random.default_rng(5)
    dx = rng.uniform(-6.0, 6.0, (7, 9))
    dy = rng.uniform(-6.0, 6.0, (7, 9))
    alpha_px = 1.7
    stamps = demo.moffat_pixel_means(dx, dy, alpha_px, beta)
    sub = np.array([-1.0, 0.0, 1.0]) / 3.0
    x = dx[:, None, :, None, None] + sub[None, None, None, None, :]
    y = dy[:, :, None, None, None] + sub[None, None, None, :, None]
    profile = (beta - 1.0) / (np.pi * alpha_px**2) * (1.0 + (x**2 + y**2) / alpha_px**2) ** -beta
    np.testing.assert_allclose(stamps, profile.mean(axis=(3, 4)), rtol=1e-12)


def test_add_stamps_scales_by_colour_and_drops_pixels_off_the_chip():
    channel_map = demo.cfa_channel_map("RGGB", 6, 8)
    image = np.zeros((6, 8))
    stamps = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3) + 1.0
    origin = np.array([[-1, 4], [5, 0]])  # the first stamp hangs off the left and bottom edges
    rgb = np.array([[1.0, 2.0, 3.0], [0.5, 1.0, 4.0]])
    demo.add_stamps(image, stamps, origin, np.array([10.0, 100.0]), rgb, channel_map)
    expected = np.zeros((6, 8))
    for k in range(2):
        for row in range(3):
            for col in range(3):
                y, x = origin[k, 1] + row, origin[k, 0] + col
                if 0 <= y < 6 and 0 <= x < 8:
                    expected[y, x] += stamps[k, row, col] * [10.0, 100.0][k] * rgb[k, channel_map[y, x]]
    np.testing.assert_allclose(image, expected)
    assert image[4:, :2].all() and not image[:, 2:5].any() and not image[:4, :2].any()  # 2 rows x 2 cols of stamp 0


def test_lights_are_the_same_written_by_one_or_two_workers(tmp_path):
    cfg = replace(DISTORTED, n_lights=3, n_biases=1, n_darks=1, n_flats=1)
    generate_night(tmp_path / "one", cfg)
    generate_night(tmp_path / "two", cfg, workers=2)
    for name in light_names(cfg):
        assert (tmp_path / "one" / "lights" / name).read_bytes() == (tmp_path / "two" / "lights" / name).read_bytes()
