"""Nights from two simulated cameras of the same sky (colour 800x533 at 1200 px focal length,
mono 640x480 at 900 px rolled by 25 degrees) and a night of another sky, through the whole
workflow: results/combined/ on the reference night's grid, star positions and the registration
against the generator's truth, noise against the inverse-variance expectation, sharpness, and
the night of another sky left out with its reason."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from astropy.io import fits
from workflow_helpers import fwhm_at, read_stack, snakemake, write_config

from nightstack.camera import Camera, apply_homography, map_ref_to_frame
from nightstack.combine import aperture_noise, sky_residual
from nightstack.demo import DemoConfig, generate_night
from nightstack.io import read_json
from nightstack.matching import mutual_nearest
from nightstack.stars import detect_stars

pytestmark = pytest.mark.workflow

SMALL = {"n_lights": 6, "n_biases": 4, "n_darks": 4, "n_flats": 4, "satellite_frame": -1,
         "n_hot_pixels": 40}
COLOUR = DemoConfig(width_px=800, height_px=533, focal_px=1200.0, seed=11, n_stars=800,
                    sky_radius_deg=35.0, **SMALL)
# the same seeing on the sky: the mono camera's larger pixels see smaller stars (in px)
MONO = DemoConfig(width_px=640, height_px=480, focal_px=900.0, seed=12, n_stars=800,
                  roll_deg=25.0, mono=True, fwhm_px=COLOUR.fwhm_px * 900.0 / 1200.0,
                  sky=asdict(COLOUR), **SMALL)
OTHER_SKY = DemoConfig(width_px=480, height_px=320, focal_px=700.0, seed=13, n_stars=400, **SMALL)


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    work = tmp_path_factory.mktemp("combine")
    truths = {}
    for name, cfg in (("colour", COLOUR), ("mono", MONO), ("other", OTHER_SKY)):
        truths[name] = generate_night(work / "nights" / name, cfg)
    nights = {n: str(work / "nights" / n) for n in truths}
    write_config(work, nights=nights, combine={"reference": "colour"})
    snakemake(work, timeout=2400)
    return work, truths


def camera_of(record) -> Camera:
    cam = record["camera"]
    return Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam["k1"], cam["k2"])


def sky_to_reference_frame(truth, sol) -> np.ndarray:
    """Truth: equatorial -> camera directions of the night's reference frame."""
    frame = next(f for f in truth["frames"] if f"light_{f['index']:03d}" == sol["reference"])
    return np.asarray(frame["rotation"]) @ np.asarray(truth["sky_to_reference"])


def truth_stars_on_reference(truth, sol) -> tuple[np.ndarray, np.ndarray]:
    """True positions (N, 2) of the stars on the night's reference frame grid, and fluxes."""
    frame = next(f for f in truth["frames"] if f"light_{f['index']:03d}" == sol["reference"])
    xy0 = np.array([[s["x"], s["y"]] for s in truth["stars"]])
    flux = np.array([s["flux_e"] for s in truth["stars"]])
    return apply_homography(np.asarray(frame["H"]), xy0), flux


def test_combined_outputs_on_the_reference_grid(combined):
    work, _ = combined
    out = work / "results" / "combined"
    with fits.open(out / "stack.fits") as hdul:
        assert hdul[0].data.shape == (3, 533, 800)
        assert hdul[0].header["NCOMBINE"] == 12
        assert int(hdul["COVERAGE"].data.max()) == 12
    assert (out / "stack.tif").stat().st_size > 0 and (out / "stack.png").stat().st_size > 0
    sol = read_json(out / "solution.json")
    by_name = {n["night"]: n for n in sol["nights"]}
    assert sol["reference"] == "colour" and by_name["colour"]["status"] == "reference"
    assert by_name["mono"]["status"] == "accepted" and by_name["mono"]["channels"] == "L"
    assert by_name["mono"]["matched_stars"] >= 20
    assert by_name["mono"]["residual_rms_px"] < 0.3


def test_night_of_another_sky_is_left_out_with_its_reason(combined):
    work, _ = combined
    sol = read_json(work / "results" / "combined" / "solution.json")
    other = next(n for n in sol["nights"] if n["night"] == "other")
    print(f"night 'other' left out: {other['reason']}")
    assert other["status"] == "rejected"
    assert "common" in other["reason"] or "match" in other["reason"], other["reason"]
    assert sol["n_used"] == 2


def test_registration_of_the_mono_night_matches_truth(combined):
    work, truths = combined
    results = work / "results"
    sol = read_json(results / "combined" / "solution.json")
    mono = next(n for n in sol["nights"] if n["night"] == "mono")
    sols = {n: read_json(results / n / "solution.json") for n in ("colour", "mono")}
    rot_true = sky_to_reference_frame(truths["mono"], sols["mono"]) @ sky_to_reference_frame(
        truths["colour"], sols["colour"]).T
    ref_true, mono_true = Camera(800, 533, 1200.0), Camera(640, 480, 900.0)
    ref_cam = camera_of(next(n for n in sol["nights"] if n["night"] == "colour"))
    xs, ys = np.meshgrid(np.linspace(0, 799, 25), np.linspace(0, 532, 17))
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    true_xy = map_ref_to_frame(grid, ref_true, mono_true, rot_true)
    found = map_ref_to_frame(grid, ref_cam, camera_of(mono), np.asarray(mono["rotation"]))
    inside = (true_xy[:, 0] > 0) & (true_xy[:, 0] < 639) & (true_xy[:, 1] > 0) & (true_xy[:, 1] < 479)
    err = np.linalg.norm(found - true_xy, axis=1)[inside]
    print(f"mono night -> reference: RMS {np.sqrt(np.mean(err**2)):.3f} px, max {err.max():.3f} px")
    assert np.sqrt(np.mean(err**2)) < 0.15


def test_stars_of_the_combined_image_sit_on_the_truth(combined):
    work, truths = combined
    results = work / "results"
    sol = read_json(results / "colour" / "solution.json")
    image = read_stack(results / "combined" / "stack.fits")
    found = detect_stars(image.astype(np.float32))
    found = found[(found["snr"] > 30) & (found["ellipticity"] < 0.2)]
    xy_true, _ = truth_stars_on_reference(truths["colour"], sol)
    xy = np.column_stack([found["x"], found["y"]])
    i_found, i_true = mutual_nearest(xy, xy_true, 1.0)
    d = xy[i_found] - xy_true[i_true]
    rms = float(np.sqrt(np.mean(np.sum(d**2, axis=1))))
    print(f"combined stars vs truth: {len(d)} stars, RMS {rms:.3f} px, mean {d.mean(axis=0)}")
    assert len(d) >= 40
    assert rms < 0.15


def test_combined_noise_is_the_inverse_variance_expectation(combined):
    work, _ = combined
    results = work / "results"
    sol = read_json(results / "combined" / "solution.json")
    noise = {n["night"]: n["noise_adu"] for n in sol["nights"] if n["status"] != "rejected"}
    with fits.open(results / "combined" / "stack.fits") as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float32)
        both = np.asarray(hdul["COVERAGE"].data) == 12
    resid, sky = sky_residual(np.where(both, image.mean(axis=0), np.nan))
    measured = aperture_noise(resid, sky & both)
    # the colour night's own stack, measured the same way on the same pixels
    colour = read_stack(results / "colour" / "stack.fits").astype(np.float32)
    resid_c, sky_c = sky_residual(np.where(both, colour.mean(axis=0), np.nan))
    colour_alone = aperture_noise(resid_c, sky_c & both)
    expected = 1.0 / np.sqrt(sum(1.0 / v**2 for v in noise.values()))
    print(f"noise: colour {colour_alone:.3f} (recorded {noise['colour']:.3f}), mono "
          f"{noise['mono']:.3f}, combined {measured:.3f}, expected {expected:.3f} ADU")
    assert measured < min(colour_alone, *noise.values())
    assert measured == pytest.approx(expected, rel=0.15)


def test_combined_image_is_as_sharp_as_the_sharper_night(combined):
    work, truths = combined
    results = work / "results"
    sol = read_json(results / "colour" / "solution.json")
    xy_true, flux = truth_stars_on_reference(truths["colour"], sol)
    inside = (xy_true > 30).all(axis=1) & (xy_true[:, 0] < 770) & (xy_true[:, 1] < 503)
    pick = np.nonzero(inside)[0]
    pick = pick[np.argsort(flux[pick])[::-1][5:80]]  # bright, not saturated
    combined_fwhm = float(np.median(fwhm_at(read_stack(results / "combined" / "stack.fits"),
                                            xy_true[pick])))
    colour_fwhm = float(np.median(fwhm_at(read_stack(results / "colour" / "stack.fits"),
                                          xy_true[pick])))
    mono_sol = read_json(results / "mono" / "solution.json")
    comb = read_json(results / "combined" / "solution.json")
    mono = next(n for n in comb["nights"] if n["night"] == "mono")
    ref_cam = camera_of(next(n for n in comb["nights"] if n["night"] == "colour"))
    xy_mono = map_ref_to_frame(xy_true[pick], ref_cam, camera_of(mono), np.asarray(mono["rotation"]))
    ok = (xy_mono > 20).all(axis=1) & (xy_mono[:, 0] < 619) & (xy_mono[:, 1] < 459)
    mono_native = float(np.median(fwhm_at(read_stack(results / "mono" / "stack.fits"), xy_mono[ok])))
    mono_fwhm = mono_native * ref_cam.focal_px / mono["camera"]["focal_px"]  # on the reference grid
    print(f"FWHM: colour {colour_fwhm:.2f}, mono {mono_fwhm:.2f} (native {mono_native:.2f}, "
          f"{mono_sol['camera']['focal_px']:.0f} px focal), combined {combined_fwhm:.2f} px")
    assert combined_fwhm <= 1.10 * min(colour_fwhm, mono_fwhm)


# --------------------------------------------------------------------------- real frames

SEESTAR_SESSIONS = {"s2024": "_20240730-", "s2025": "_20250630-"}  # two units, two sites


@pytest.fixture(scope="module")
def seestar_sessions(tmp_path_factory):
    """The two Seestar S50 sessions of NGC 7023 as two nights (links to ../shared, no copies)."""
    from conftest import shared_dataset

    data = shared_dataset("seestar_ngc7023_s50")
    work = tmp_path_factory.mktemp("combine_real")
    nights = {}
    for night, tag in SEESTAR_SESSIONS.items():
        folder = work / "nights" / night
        folder.mkdir(parents=True)
        for light in sorted(data.glob(f"Light*{tag}*.fit")):
            (folder / light.name).symlink_to(light)
        nights[night] = str(folder)
    write_config(work, nights=nights)
    snakemake(work, timeout=2400)
    return work / "results"


@pytest.mark.realdata
def test_real_sessions_of_two_units_combine(seestar_sessions):
    sol = read_json(seestar_sessions / "combined" / "solution.json")
    by_name = {n["night"]: n for n in sol["nights"]}
    other = next(n for n in by_name.values() if n["status"] != "reference")
    assert other["status"] == "accepted", other["reason"]
    assert other["matched_stars"] >= 50 and other["residual_rms_px"] < 0.3
    assert 120.0 < other["angle_deg"] < 123.0  # the field rotation between the sessions
    with fits.open(seestar_sessions / "combined" / "stack.fits") as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float32)
        both = np.asarray(hdul["COVERAGE"].data) == 6
    resid, sky = sky_residual(np.where(both, image.mean(axis=0), np.nan))
    measured = aperture_noise(resid, sky & both)
    noise = [n["noise_adu"] for n in by_name.values()]
    expected = 1.0 / np.sqrt(sum(1.0 / v**2 for v in noise))
    print(f"Seestar sessions: {other['night']} -> {sol['reference']}: {other['angle_deg']:.2f} deg, "
          f"{other['matched_stars']} stars, RMS {other['residual_rms_px']:.3f} px; noise "
          f"{noise} -> {measured:.2f} ADU (expected {expected:.2f})")
    assert measured < min(noise)
    assert measured == pytest.approx(expected, rel=0.15)
