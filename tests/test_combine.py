"""Nights combined: registration of two stacks with a known transform, noise weights, the
mono/colour rule, the reference choice, and the demo's second camera of the same sky."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from astropy.io import fits

from nightstack import demo
from nightstack.camera import Camera, map_ref_to_frame, rotation_matrix
from nightstack.combine import (
    NightStack,
    aperture_noise,
    choose_reference,
    combine_nights,
    combine_planes,
    expected_noise,
    sky_residual,
)
from nightstack.config import check_combine, validate
from nightstack.errors import NightstackError
from nightstack.loading import load_frame

CAM_A = Camera(400, 300, 600.0)
CAM_B = Camera(320, 240, 450.0, k1=-0.03)
# reference camera directions -> night B's: a 20 degree roll and a small shift of the pointing
ROT_AB = rotation_matrix([0.0, 0.0, np.radians(20.0)]) @ rotation_matrix([0.01, -0.015, 0.0])


def render(camera: Camera, xy, flux_e, fwhm_px, sky_e, noise_seed, n_channels=1):
    """A stack-like image (C, H, W): Gaussian stars on a flat sky with Poisson noise."""
    cfg = demo.DemoConfig(psf="gaussian", fwhm_px=fwhm_px)
    ones = np.ones((camera.height_px, camera.width_px), dtype=np.int8)
    stars = demo.render_stars_e(xy, flux_e, np.ones((len(xy), 3)), ones, cfg)
    rng = np.random.default_rng(noise_seed)
    planes = [rng.poisson(stars + sky_e).astype(np.float32) for _ in range(n_channels)]
    return np.stack(planes)


def star_field(seed: int, n_stars: int = 250):
    """Reference-grid positions (N, 2), a margin beyond the frame, and fluxes (e)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform([-60, -60], [CAM_A.width_px + 60, CAM_A.height_px + 60], (n_stars, 2))
    return xy, 300.0 * 10 ** rng.uniform(0, 1.6, n_stars)


def two_nights(scale_b: float = 2.0, other_sky_for_b: bool = False):
    """Night A (colour, reference grid) and night B (mono, CAM_B, rotated by ROT_AB) of the same
    stars, B with scale_b times the flux; or, with other_sky_for_b, B of different stars."""
    xy, flux = star_field(1)
    a = NightStack("a", render(CAM_A, xy, flux, 2.4, 100.0, 2, n_channels=3), CAM_A)
    if other_sky_for_b:
        xy, flux = star_field(99)
    xy_b = map_ref_to_frame(xy, CAM_A, CAM_B, ROT_AB)
    b = NightStack("b", render(CAM_B, xy_b, scale_b * flux, 1.8, scale_b * 150.0, 3), CAM_B)
    return a, b


def test_registration_of_two_stacks_matches_the_known_transform():
    a, b = two_nights()
    _, results, ref = combine_nights([a, b], reference="a")
    res_b = next(r for r in results if r.name == "b")
    assert ref == "a" and res_b.status == "accepted", res_b.reason
    ys, xs = np.mgrid[20:280:20, 20:380:20]
    grid = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    true_xy = map_ref_to_frame(grid, CAM_A, CAM_B, ROT_AB)
    found_xy = map_ref_to_frame(grid, CAM_A, res_b.camera, res_b.pose.rotation())
    inside = (true_xy >= 10).all(axis=1) & (true_xy[:, 0] < 310) & (true_xy[:, 1] < 230)
    err = np.linalg.norm(found_xy - true_xy, axis=1)[inside]
    assert np.sqrt(np.mean(err**2)) < 0.1
    assert res_b.camera.focal_px == pytest.approx(CAM_B.focal_px, rel=0.01)
    # B is twice as bright per star, and its pixels are (600/450)^2 larger on the sky
    assert res_b.flux_scale == pytest.approx(2.0 * (600.0 / 450.0) ** 2, rel=0.03)


def test_noise_weights_give_the_inverse_variance_noise():
    a, b = two_nights()
    image, results, _ = combine_nights([a, b], reference="a")
    noise = {r.name: r.noise_adu for r in results}
    weights = {r.name: r.weight for r in results}
    assert weights["a"] + weights["b"] == pytest.approx(1.0)
    assert weights["a"] / weights["b"] == pytest.approx(noise["b"] ** 2 / noise["a"] ** 2)
    # noise of the combination where both cover, measured apart from the weights
    both = np.all([np.isfinite(r.warped).all(axis=0) for r in results], axis=0)
    resid, sky = sky_residual(image.mean(axis=0))
    combined = aperture_noise(np.where(both, resid, np.nan), sky & both)
    assert combined < min(noise.values())
    assert combined == pytest.approx(expected_noise(results), rel=0.12)


def test_a_night_without_common_stars_is_left_out_with_its_reason():
    a, b = two_nights(other_sky_for_b=True)
    image, results, _ = combine_nights([a, b], reference="a")
    res_b = next(r for r in results if r.name == "b")
    assert res_b.status == "rejected"
    assert "common" in res_b.reason or "match" in res_b.reason
    assert image.shape == a.image.shape and np.isfinite(image).all()


def test_mono_reference_night_with_a_colour_night_gives_colour_on_the_mono_grid():
    a, b = two_nights()
    image, results, ref = combine_nights([a, b])  # auto: B (wider, more stars) is the reference
    assert ref == "b" and image.shape == (3, CAM_B.height_px, CAM_B.width_px)
    res_a = next(r for r in results if r.name == "a")
    assert res_a.status == "accepted" and res_a.flux_scale == pytest.approx(
        0.5 * (450.0 / 600.0) ** 2, rel=0.03)


def test_mono_adds_to_luminance_and_colour_comes_from_colour_nights():
    colour = np.stack([np.full((4, 5), v, np.float32) for v in (1.0, 2.0, 3.0)])
    mono = np.full((1, 4, 5), 4.0, np.float32)
    mono[0, :, 0] = np.nan  # the mono night does not cover the first column
    out = combine_planes([colour, mono], [1.0, 3.0], [True, False])
    # L = (1 * 2 + 3 * 4) / 4 = 3.5; colour (-1, 0, +1) from the colour night
    assert out[:, 0, 1] == pytest.approx([2.5, 3.5, 4.5])
    assert out[:, 0, 0] == pytest.approx([1.0, 2.0, 3.0])
    only_mono = combine_planes([mono], [1.0], [False])
    assert only_mono.shape == (1, 4, 5)


def test_reference_choice():
    nights = [NightStack(n, np.zeros((1, 2, 2)), CAM_A) for n in ("n1", "n2", "n3")]
    assert choose_reference(nights, {"n1": 10, "n2": 30, "n3": 30}) == "n2"
    assert choose_reference(nights, {"n1": 10, "n2": 30, "n3": 5}, "n3") == "n3"
    with pytest.raises(NightstackError, match="nope"):
        choose_reference(nights, {"n1": 1, "n2": 1, "n3": 1}, "nope")


def test_combine_config_checks():
    check_combine({"combine": {"reference": "a"}}, ["a", "b"])
    with pytest.raises(NightstackError, match="'c' is not one of the nights"):
        check_combine({"combine": {"reference": "c"}}, ["a", "b"])
    with pytest.raises(NightstackError, match="combined"):
        check_combine({}, ["a", "combined"])
    validate({"nights": "x", "combine": {"reference": "auto"}})
    with pytest.raises(NightstackError, match="combine"):
        validate({"nights": "x", "combine": {"referense": "auto"}})


def test_aperture_noise_of_white_noise():
    rng = np.random.default_rng(5)
    image = rng.normal(100.0, 8.0, (256, 256)).astype(np.float32)
    resid, sky = sky_residual(image)
    assert aperture_noise(resid, sky, aperture_px=4) == pytest.approx(8.0 / 4, rel=0.06)


def test_demo_second_camera_sees_the_same_stars(tmp_path):
    small = {"n_lights": 2, "n_biases": 1, "n_darks": 1, "n_flats": 1, "n_stars": 300,
             "satellite_frame": -1, "n_hot_pixels": 5}
    cfg_a = demo.DemoConfig(width_px=200, height_px=150, focal_px=300.0, seed=3,
                            sky_radius_deg=45.0, **small)
    cfg_b = demo.DemoConfig(width_px=160, height_px=120, focal_px=220.0, seed=4, roll_deg=25.0,
                            mono=True, sky=asdict(cfg_a), **small)
    truth_a = demo.generate_night(tmp_path / "a", cfg_a)
    truth_b = demo.generate_night(tmp_path / "b", cfg_b)
    # the same directions, seen through each camera: B's positions follow from A's
    rot_ab = np.asarray(truth_b["sky_to_reference"]) @ np.asarray(truth_a["sky_to_reference"]).T
    assert np.degrees(np.arccos((np.trace(rot_ab) - 1) / 2)) == pytest.approx(25.0)
    xy_a = np.array([[s["x"], s["y"]] for s in truth_a["stars"]])
    xy_b = np.array([[s["x"], s["y"]] for s in truth_b["stars"]])
    cam_a, cam_b = Camera(200, 150, 300.0), Camera(160, 120, 220.0)
    seen = np.array([s["in_frame0"] for s in truth_b["stars"]])
    assert seen.sum() > 100
    assert np.allclose(map_ref_to_frame(xy_a[seen], cam_a, cam_b, rot_ab), xy_b[seen], atol=1e-6)
    # mono frames: FITS without a Bayer pattern, loaded as one plane
    light = tmp_path / "b" / "lights" / "light_000.fits"
    assert "BAYERPAT" not in fits.getheader(light)
    frame = load_frame(light)
    assert frame.cfa_pattern is None and frame.data.shape == (120, 160)
    with pytest.raises(NightstackError, match="sky_radius_deg"):
        demo.generate_night(tmp_path / "c", demo.DemoConfig(
            width_px=400, height_px=300, focal_px=150.0, seed=4, sky=asdict(cfg_a), **small))
