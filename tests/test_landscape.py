"""Landscape foreground on synthetic arrays: the automatic sky mask (rotating stars over a still,
textured ground with thin branches; nothing found on deep-sky-like frames), the fixed mask
sources, the sky/ground composition of the stack, trails and the sky-only background fit."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image
from scipy import ndimage

from nightstack.background import remove_background
from nightstack.camera import Camera, map_frame_to_ref, rotation_matrix
from nightstack.errors import NightstackError
from nightstack.io import write_fits_image
from nightstack.landscape import (
    LandscapeStack,
    feather_weight,
    find_sky_mask,
    horizon_sky_mask,
    kernel_reach_px,
    landscape_config_from_dict,
    read_mask_image,
)
from nightstack.stacking import FrameWarp, StackConfig, stack_frames
from nightstack.steps import read_sky_mask, sky_mask_step
from nightstack.trails import TrailsConfig, stack_trails

H, W = 240, 320


def iou(a, b) -> float:
    """Intersection over union of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def segments_mask(segments, height=H, width=W) -> np.ndarray:
    """True on pixel centres within half a width of any segment (x0, y0, x1, y1, width_px)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1, wid in segments:
        d = np.array([x1 - x0, y1 - y0])
        t = np.clip(((xx - x0) * d[0] + (yy - y0) * d[1]) / (d @ d), 0, 1)
        mask |= np.hypot(xx - x0 - t * d[0], yy - y0 - t * d[1]) <= wid / 2
    return mask


def landscape_truth():
    """(ground (H, W) bool, branches (H, W) bool): wavy hills over the bottom third and a tree
    whose branches are 2-3 px wide."""
    x = np.arange(W)
    horizon = 0.68 * H + 8 * np.sin(x / 23.0) + 4 * np.sin(x / 7.3)
    rows = np.arange(H)[:, None]
    branches = segments_mask([(200, 170, 205, 70, 4), (204, 110, 250, 60, 3), (203, 90, 170, 50, 2),
                              (230, 80, 260, 85, 2), (185, 62, 175, 40, 2)])
    return (rows >= horizon[None]) | branches, branches


def rotating_night(n_frames=9, seed=3, ground_level=30.0):
    """Frames (N, H, W) of a tripod night: stars turning about a pole above the frame (about
    4 px per frame at the centre), sky 100 ADU + gradient, noise 3 ADU, and a still ground at
    ``ground_level`` with its own fixed texture replacing the sky. Returns (frames, ground)."""
    rng = np.random.default_rng(seed)
    ground, _ = landscape_truth()
    texture = ndimage.gaussian_filter(rng.normal(size=(H, W)), 2) * 40 + rng.normal(size=(H, W)) * 2
    pole = np.array([W / 2, -400.0])
    stars = rng.uniform([-150, -50], [W + 150, H + 50], size=(400, 2))
    flux = 300 * rng.pareto(1.5, 400) + 60
    yy, xx = np.mgrid[0:H, 0:W]
    frames = []
    for k in range(n_frames):
        a = 0.01 * k
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        xy = (stars - pole) @ rot.T + pole
        img = 100 + 0.05 * xx + 0.03 * yy + rng.normal(0, 3, (H, W))
        inside = (xy[:, 0] > -5) & (xy[:, 0] < W + 5) & (xy[:, 1] > -5) & (xy[:, 1] < H + 5)
        for (sx, sy), f in zip(xy[inside], flux[inside]):
            y0, y1 = max(int(sy) - 5, 0), min(int(sy) + 6, H)
            x0, x1 = max(int(sx) - 5, 0), min(int(sx) + 6, W)
            if y1 > y0 and x1 > x0:
                img[y0:y1, x0:x1] += f / (2 * np.pi * 1.2**2) * np.exp(
                    -((xx[y0:y1, x0:x1] - sx) ** 2 + (yy[y0:y1, x0:x1] - sy) ** 2) / (2 * 1.2**2))
        img[ground] = ground_level + texture[ground] + rng.normal(0, 2, ground.sum())
        frames.append(img)
    return np.array(frames, dtype=np.float32), ground


# ---------------------------------------------------------------------------- automatic mask


def test_auto_mask_finds_the_still_ground_and_its_thin_branches():
    frames, ground = rotating_night()
    _, branches = landscape_truth()
    sky, info = find_sky_mask(np.median(frames, axis=0))
    found = ~sky
    assert iou(found, ground) >= 0.95, (iou(found, ground), info)
    # the 2-3 px branches are ground too, not only the hills
    assert found[branches].mean() >= 0.9, found[branches].mean()
    assert info["reason"] == "" and info["edge_width_px"] <= 6


def test_auto_mask_of_a_single_frame_also_finds_it():
    frames, ground = rotating_night(n_frames=1)
    sky, _ = find_sky_mask(frames[0])
    assert iou(~sky, ground) >= 0.9


@pytest.mark.parametrize("scene", ["stars", "vignetting", "nebula_and_dark_cloud", "black_frame"])
def test_auto_mask_finds_no_ground_in_deep_sky_frames(scene):
    """Gradients, vignetting, a bright nebula and a soft dark cloud are the sky's own
    structure: all soft-edged, so nothing is ground."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    img = 200 + 0.2 * xx + rng.normal(0, 4, (H, W))
    peaks = rng.integers([0, 0], [H, W], size=(300, 2))
    img[peaks[:, 0], peaks[:, 1]] += rng.uniform(50, 3000, 300)
    img = ndimage.gaussian_filter(img, 0.7)
    r2 = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / (W / 2) ** 2
    if scene == "vignetting":
        img *= 1 - 0.5 * r2
    if scene == "nebula_and_dark_cloud":
        img += 400 * np.exp(-((xx - 100) ** 2 + (yy - 120) ** 2) / (2 * 30**2))
        img -= 120 * np.exp(-((xx - 260) ** 2 + (yy - 60) ** 2) / (2 * 40**2))
    if scene == "black_frame":
        img = rng.normal(0, 1, (H, W))
    sky, info = find_sky_mask(img)
    assert sky.all(), info


# ---------------------------------------------------------------------------- fixed sources


def test_horizon_mask_is_the_bottom_fraction():
    sky = horizon_sky_mask(100, 50, 0.3)
    assert sky[:70].all() and not sky[70:].any()
    assert horizon_sky_mask(100, 50, 0.0).all()


def test_mask_image_white_is_sky_and_wrong_size_names_the_file(tmp_path):
    truth, _ = landscape_truth()
    path = tmp_path / "my_mask.png"
    Image.fromarray(np.where(truth, 0, 255).astype(np.uint8)).save(path)
    assert (read_mask_image(path, H, W) == ~truth).all()
    with pytest.raises(NightstackError, match=r"my_mask\.png is 320x240 px but the lights are 640x480"):
        read_mask_image(path, 480, 640)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(NightstackError, match="notes.png: cannot read"):
        read_mask_image(bad, H, W)
    with pytest.raises(NightstackError, match="missing.png: no such file"):
        read_mask_image(tmp_path / "missing.png", H, W)


def test_config_keeps_a_mask_path_and_rejects_bad_values():
    assert landscape_config_from_dict({"ground": "Masks/Sky.PNG"}).ground == "Masks/Sky.PNG"
    assert landscape_config_from_dict({"ground": " AUTO "}).ground == "auto"
    with pytest.raises(NightstackError, match="horizon_fraction"):
        landscape_config_from_dict({"horizon_fraction": 1.5})
    with pytest.raises(NightstackError, match="unknown landscape setting"):
        landscape_config_from_dict({"groud": "auto"})


def test_sky_mask_step_writes_uint8_mask_and_names_a_mask_of_the_wrong_size(tmp_path):
    frames, ground = rotating_night(n_frames=3)
    paths = []
    for k, frame in enumerate(frames):
        paths.append(tmp_path / f"f{k}.fits")
        write_fits_image(paths[-1], frame[None], {"NSSTATUS": "ok"})
    out = tmp_path / "sky_mask.fits"
    sky_mask_step("n", paths, out, {"ground": "auto"})
    with fits.open(out) as hdul:
        assert hdul[0].data.dtype == np.uint8 and set(np.unique(hdul[0].data)) == {0, 1}
        assert hdul[0].header["NSMASK"] == "auto"
        assert hdul[0].header["GNDFRAC"] == pytest.approx(ground.mean(), abs=0.02)
    assert iou(~read_sky_mask(out), ground) >= 0.9
    sky_mask_step("n", paths, out, {"ground": "horizon", "horizon_fraction": 0.25})
    assert fits.getheader(out)["GNDFRAC"] == pytest.approx(0.25)
    small = tmp_path / "small_mask.png"
    Image.new("L", (100, 80), 255).save(small)
    with pytest.raises(NightstackError, match="small_mask.png is 100x80 px but the lights are 320x240"):
        sky_mask_step("n", paths, out, {"ground": str(small)})


# ---------------------------------------------------------------------------- stacking


CAM = Camera(W, H, focal_px=400.0)
GROUND_ADU = 50.0  # far above any sky value: a sky pixel that took ground light is obvious


def sky_signal(xy):
    """Smooth sky with a grid of stars, at reference pixel positions xy (n, 2)."""
    x, y = xy[:, 0], xy[:, 1]
    out = 1.0 + 0.2 * np.sin(x / 37.0) * np.cos(y / 29.0)
    gx, gy = (x % 24) - 12, (y % 24) - 12
    return out + 5 * np.exp(-(gx**2 + gy**2) / (2 * 1.3**2))


@pytest.fixture(scope="module")
def panning_night(tmp_path_factory):
    """Six frames of a fixed camera whose sky turns (pan about the vertical axis, about 3 px per
    frame), ground at GROUND_ADU + texture replacing the sky; frame 0 is the reference."""
    folder = tmp_path_factory.mktemp("pan")
    ground, _ = landscape_truth()
    texture = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(H, W)), 1.5) * 10
    yy, xx = np.mgrid[0:H, 0:W]
    frame_xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    warps, frames = [], []
    for k in range(6):
        rot = rotation_matrix(np.array([0.0, 0.0075 * k, 0.002 * k]))
        ref_xy = map_frame_to_ref(frame_xy, CAM, CAM, rot)
        img = sky_signal(ref_xy).reshape(H, W)
        img[ground] = GROUND_ADU + texture[ground] + k * 0.1  # the ground's light is its own
        frames.append(img)
        path = folder / f"frame{k}.fits"
        write_fits_image(path, img[None].astype(np.float32), {"NSSTATUS": "ok"})
        warps.append(FrameWarp(path=str(path), ref_camera=CAM, frame_camera=CAM, rotation=rot,
                               offset=np.zeros(1), scale=np.ones(1), target_level=np.zeros(1)))
    return warps, np.array(frames), ground


def test_stack_keeps_ground_frozen_and_sky_clean(panning_night):
    """Ground pixels are the unregistered mean of the frames; sky pixels never take ground light
    (which is 50x brighter); deep in the sky the stack is the registered sky; across the seam
    every value lies between the registered sky and the frozen mean (no over/undershoot)."""
    warps, frames, ground = panning_night
    cfg = StackConfig(method="mean", interpolation="lanczos3")
    landscape = LandscapeStack(sky=~ground, feather_px=6, frozen_path=warps[0].path)
    image, _, _ = stack_frames(warps, (1, H, W), cfg, landscape=landscape)
    image = image[0]
    frozen_mean = frames.mean(axis=0)
    np.testing.assert_allclose(image[ground], frozen_mean[ground], atol=1e-4)
    sky = ~ground
    assert image[sky].max() < 7.0, image[sky].max()  # the sky's brightest star peak is ~6.2
    yy, xx = np.mgrid[0:H, 0:W]
    registered = sky_signal(np.column_stack([xx.ravel(), yy.ravel()]).astype(float)).reshape(H, W)
    weight = feather_weight(sky, 6, kernel_reach_px("lanczos3"))
    covered = np.ones((H, W), bool)
    covered[:, W - 25:] = False  # the right edge is not covered by the later frames
    deep = (weight >= 1) & covered
    assert np.abs(image[deep] - registered[deep]).max() < 0.05
    seam = (weight > 0) & (weight < 1) & covered
    lo, hi = np.minimum(registered, frozen_mean), np.maximum(registered, frozen_mean)
    assert seam.sum() > 500
    assert np.all(image[seam] >= lo[seam] - 0.05) and np.all(image[seam] <= hi[seam] + 0.05)


def test_without_landscape_the_ground_smears_into_the_sky(panning_night):
    """Control: the same frames registered as all sky put ground light into the sky."""
    warps, _, ground = panning_night
    image, _, _ = stack_frames(warps, (1, H, W), StackConfig(method="mean"))
    assert image[0][~ground].max() > 20


# ---------------------------------------------------------------------------- trails


def test_trails_gap_fill_leaves_the_ground_frozen(tmp_path):
    frames, ground = rotating_night(n_frames=4, ground_level=60.0)
    paths = []
    for k, frame in enumerate(frames):
        paths.append(str(tmp_path / f"t{k}.fits"))
        write_fits_image(paths[-1], frame[None], {"NSSTATUS": "ok"})
    cfg = TrailsConfig(gap_steps=4)
    masked, info = stack_trails(paths, cfg, sky=~ground)
    assert info["gaps_filled"] == 3
    sky_levels = np.median(frames[:, ::4, ::4].reshape(4, -1), axis=1)
    plain_max = (frames - sky_levels[:, None, None]).max(axis=0) + sky_levels.mean()
    np.testing.assert_allclose(masked[0][ground], plain_max[ground], atol=1e-3)
    unmasked, _ = stack_trails(paths, cfg)
    assert np.abs(unmasked[0][ground] - plain_max[ground]).max() > 10  # the control smears it


# ---------------------------------------------------------------------------- background


def test_light_pollution_model_is_fitted_on_the_sky_only():
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    plane = 100 + 0.1 * xx + 0.05 * yy
    ground, _ = landscape_truth()
    img = np.where(ground, 10.0, plane) + np.random.default_rng(2).normal(0, 1, (H, W))
    _, model = remove_background(img, not_sky=ground)
    near = ~ground & (ndimage.distance_transform_edt(~ground) < 20)
    assert np.abs(model[~ground] - plane[~ground]).max() < 3
    _, blind = remove_background(img)
    assert np.abs(blind[near] - plane[near]).max() > 10  # control: the ground pulls it down


def test_calibration_fits_the_gradient_on_the_sky_and_leaves_the_ground_level(tmp_path):
    """ground: horizon: the light-pollution gradient of the sky is removed, the ground (bottom
    30 %) only loses the model's median level, so its own texture and level stay; with
    ground: none the model follows the ground too and lifts it towards the sky's level."""
    from nightstack.steps import calibrate_step

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    light = 300 + 0.5 * xx + 0.3 * yy + rng.normal(0, 2, (H, W))
    ground_rows = slice(H - round(0.3 * H), H)
    texture = ndimage.gaussian_filter(rng.normal(size=(H, W)), 2) * 20
    light[ground_rows] = 60 + texture[ground_rows]
    path = tmp_path / "light.fits"
    fits.PrimaryHDU(light.astype(np.float32)).writeto(path)
    results = {}
    for ground in ("horizon", "none"):
        out = tmp_path / f"cal_{ground}.fits"
        calibrate_step(path, out, {}, {}, {"before_stars": True},
                       {"ground": ground, "horizon_fraction": 0.3}, frame_format="float32")
        results[ground] = np.asarray(fits.getdata(out), float).reshape(H, W)
        assert fits.getheader(out)["GNDFRAC"] == pytest.approx(0.3 if ground == "horizon" else 0.0)
    kept = results["horizon"][ground_rows] - light[ground_rows]
    assert np.ptp(kept) < 1e-3  # one constant for the whole ground
    sky = results["horizon"][: H - round(0.3 * H) - 20]
    assert np.ptp(ndimage.uniform_filter(sky, 15)[10:-10, 10:-10]) < 6  # gradient (~200 ADU) gone
    lifted = results["none"][ground_rows] - light[ground_rows]
    assert np.median(lifted) - np.median(kept) > 100


@pytest.mark.parametrize("with_ground", [False, True])
def test_frame_mask_of_a_large_frame_is_found_binned_at_full_size(with_ground):
    from nightstack.landscape import LandscapeConfig, frame_sky

    rng = np.random.default_rng(6)
    img = (100 + rng.normal(0, 3, (400, 3001))).astype(np.float32)  # binned by 2
    if with_ground:
        img[300:] = 10 + rng.normal(0, 3, (100, 3001))
    found = frame_sky(img, LandscapeConfig())
    if not with_ground:
        assert found is None
        return
    sky, fraction = found
    assert sky.shape == fraction.shape == img.shape
    assert sky[:296].all() and not sky[304:].any()
