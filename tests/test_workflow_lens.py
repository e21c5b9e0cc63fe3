"""Wide lenses, zoom lenses and light pollution through the whole workflow, on generated nights
with known truth (the acceptance figures of the wide-lens/zoom/light-pollution issue).

Three small nights share their runs:
- a wide lens (about 14 mm on APS-C: focal 0.6 x width, barrel distortion k1 = -0.1) over a
  25-minute sequence, solved with ``distortion: auto`` and again with ``distortion: false``;
- a normal lens night and the same night (same seed) with the zoom turned +-5 % between frames;
- the normal lens night's calibrated frames with and without the light-pollution removal.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_background import aperture_flux
from workflow_helpers import snakemake, write_config

from nightstack.background import large_scale_residual, star_mask
from nightstack.camera import Camera, map_ref_to_frame
from nightstack.io import read_fits_image, read_json

pytestmark = pytest.mark.workflow

WIDE = {"n_lights": 6, "width_px": 1200, "height_px": 800, "seed": 7,
        "focal_px": 720.0, "k1": -0.1, "k2": 0.01, "cadence_s": 300.0}
NORMAL = {"n_lights": 6, "width_px": 1000, "height_px": 668, "seed": 11, "focal_px": 1500.0}
ZOOM_STEPS = [1.0, 1.05, 0.95, 1.0, 1.05, 0.95]
SOLUTION = "results/demo/solution.json"


def run_demo(work, demo: dict, **overrides):
    """Generate and process a demo night in ``work``; returns the work folder."""
    write_config(work, demo={"folder": "resources/demo-night", **demo}, **overrides)
    snakemake(work, timeout=2400)
    return work


def camera_of(record: dict) -> Camera:
    return Camera(record["width_px"], record["height_px"], record["focal_px"], record["k1"], record["k2"])


def truth_mapping_errors(truth: dict, sol: dict, n_grid: int = 41) -> dict:
    """Per accepted frame, RMS (px) of where the solution maps a grid of reference pixels minus
    where the truth does (observed, distorted pixels), over the grid points that land in the frame."""
    true_cam, cam = camera_of(truth["camera"]), camera_of(sol["camera"])
    w, h = true_cam.width_px, true_cam.height_px
    xs, ys = np.meshgrid(np.linspace(0, w - 1, n_grid), np.linspace(0, h - 1, n_grid * h // w))
    grid = np.column_stack([xs.ravel(), ys.ravel()])
    frames = {f"light_{t['index']:03d}": t for t in truth["frames"]}
    ref = frames[sol["reference"]]
    errors = {}
    for rec in sol["frames"]:
        if rec["status"] != "accepted":
            continue
        t = frames[rec["frame"]]
        rotation = np.asarray(t["rotation"]) @ np.asarray(ref["rotation"]).T
        true_xy = map_ref_to_frame(grid, true_cam.with_focal(ref["focal_px"]),
                                   true_cam.with_focal(t["focal_px"]), rotation)
        ours = map_ref_to_frame(grid, cam, cam.with_focal(rec["focal_px"]), np.asarray(rec["rotation"]))
        inside = (true_xy[:, 0] >= 0) & (true_xy[:, 0] <= w - 1) & (true_xy[:, 1] >= 0) & (true_xy[:, 1] <= h - 1)
        d = np.linalg.norm(ours - true_xy, axis=1)[inside]
        errors[rec["frame"]] = float(np.sqrt(np.mean(d**2)))
    return errors


# ----------------------------------------------------------------------------- wide lens


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The wide-lens night solved with distortion auto, then (pose and solve only) without."""
    work = run_demo(tmp_path_factory.mktemp("wide"), WIDE)
    auto = read_json(work / SOLUTION)
    write_config(work, demo={"folder": "resources/demo-night", **WIDE}, registration={"distortion": False})
    snakemake(work, SOLUTION)
    return {"truth": read_json(work / "resources/demo-night/truth.json"), "auto": auto,
            "off": read_json(work / SOLUTION)}


def test_wide_lens_switches_distortion_on_and_meets_the_corner_figures(wide):
    bundle = wide["auto"]["bundle"]
    assert bundle["distortion_used"], bundle
    assert bundle["rms_outer_px"] <= 0.3, bundle
    assert bundle["rms_outer_px"] <= 1.2 * bundle["rms_centre_px"], bundle
    cam = wide["auto"]["camera"]
    assert cam["k1"] == pytest.approx(WIDE["k1"], abs=0.01), cam
    assert cam["focal_px"] == pytest.approx(WIDE["focal_px"], rel=0.01), cam


def test_wide_lens_registration_matches_truth_over_the_frame(wide):
    errors = truth_mapping_errors(wide["truth"], wide["auto"])
    assert len(errors) == WIDE["n_lights"]
    assert max(errors.values()) < 0.1, errors


def test_wide_lens_without_distortion_fails_in_the_corners(wide):
    """The auto switch matters: without k1, k2 the outer third is far off, and so is the mapping."""
    on, off = wide["auto"]["bundle"], wide["off"]["bundle"]
    assert not off["distortion_used"]
    assert off["rms_outer_px"] > 1.5 * off["rms_centre_px"], off
    assert off["rms_outer_px"] > 2 * on["rms_outer_px"], (on, off)
    assert max(truth_mapping_errors(wide["truth"], wide["off"]).values()) > 0.3


# ----------------------------------------------------------------------------- zoom


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    """The normal-lens night; its reference is fixed so the zoomed night compares frame by frame."""
    return run_demo(tmp_path_factory.mktemp("normal"), NORMAL, reference="light_000.dng")


@pytest.fixture(scope="module")
def zoomed(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("zoom"), {**NORMAL, "zoom_steps": ZOOM_STEPS},
                    reference="light_000.dng")


def frame_rms(sol: dict) -> dict:
    return {r["frame"]: r["residual_rms_px"] for r in sol["frames"] if r["status"] == "accepted"}


def test_zoomed_frames_register_as_well_as_fixed_ones(normal, zoomed):
    fixed, zoom = read_json(normal / SOLUTION), read_json(zoomed / SOLUTION)
    assert zoom["n_accepted"] == fixed["n_accepted"] == NORMAL["n_lights"]
    rms_fixed, rms_zoom = frame_rms(fixed), frame_rms(zoom)
    for frame, rms in rms_zoom.items():
        assert abs(rms - rms_fixed[frame]) <= 0.1, (frame, rms, rms_fixed[frame])
    zooms = {r["frame"]: r["zoom"] for r in zoom["frames"]}
    truth = read_json(zoomed / "resources/demo-night/truth.json")
    for t in truth["frames"]:
        assert zooms[f"light_{t['index']:03d}"] == pytest.approx(ZOOM_STEPS[t["index"]], abs=2e-4)
    errors = truth_mapping_errors(truth, zoom)
    assert max(errors.values()) < 0.1, errors


# ----------------------------------------------------------------------------- light pollution


@pytest.fixture(scope="module")
def unremoved(normal, tmp_path_factory):
    """The normal night's first light calibrated without the light-pollution removal."""
    work = tmp_path_factory.mktemp("no-lp")
    write_config(work, nights={"demo": str(normal / "resources/demo-night")},
                 demo={"folder": "no-demo-here"}, background={"before_stars": False})
    target = "results/demo/calibrated/light_000.fits"
    snakemake(work, target)
    return work / target


def read_image(path) -> np.ndarray:
    """The image of a nightstack FITS file (float32 or tile-compressed calibrated frame)."""
    data, _ = read_fits_image(path, memmap=False)
    return np.asarray(data, dtype=np.float64)


def bright_truth_stars(truth: dict, shape, n: int = 50, skip_brightest: int = 10):
    """(x, y) in frame 0 of its brightest stars short of the saturated few, away from the
    borders, with no brighter star within 15 px (whose wings would fill the annulus)."""
    stars = [s for s in truth["stars"] if s["in_frame0"]]  # brightest first
    xy = np.array([[s["x"], s["y"]] for s in stars])
    h, w = shape
    inside = (xy[:, 0] > 20) & (xy[:, 0] < w - 21) & (xy[:, 1] > 20) & (xy[:, 1] < h - 21)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    brighter_near = np.tril(d < 15, k=-1).any(axis=1)  # an earlier (brighter) star close by
    pick = np.flatnonzero(inside & ~brighter_near)
    return xy[pick[pick >= skip_brightest][:n]]  # the brightest are saturated on purpose


def test_light_pollution_drops_5x_and_star_fluxes_stay(normal, unremoved):
    removed = read_image(normal / "results/demo/calibrated/light_000.fits")
    before = read_image(unremoved)
    mask = star_mask(before.mean(axis=0))
    drops = [large_scale_residual(b, mask=mask) / large_scale_residual(a, mask=mask)
             for b, a in zip(before, removed)]
    assert min(drops) >= 5, drops
    truth = read_json(normal / "resources/demo-night/truth.json")
    xy = bright_truth_stars(truth, before.shape[1:])
    assert len(xy) >= 30
    for b, a in zip(before, removed):
        change = aperture_flux(a, xy[:, 0], xy[:, 1]) / aperture_flux(b, xy[:, 0], xy[:, 1]) - 1
        assert np.max(np.abs(change)) < 0.02, change


def test_stack_keeps_the_sky_flat_and_the_fluxes(normal, unremoved):
    """The stack (after its own removal) is as flat as the frames after theirs, and the second
    removal changes star fluxes by under 2 %."""
    night = normal / "results/demo"
    before = read_image(unremoved)
    linear, final = read_image(night / "stack_linear.fits"), read_image(night / "stack.fits")
    mask = star_mask(np.nanmean(final, axis=0)) | ~np.isfinite(final).all(axis=0)
    for b, f in zip(before, final):
        assert large_scale_residual(b, mask=mask) >= 5 * large_scale_residual(np.nan_to_num(f), mask=mask)
    truth = read_json(normal / "resources/demo-night/truth.json")
    xy = bright_truth_stars(truth, final.shape[1:])
    for lin, f in zip(linear, final):
        change = aperture_flux(f, xy[:, 0], xy[:, 1]) / aperture_flux(lin, xy[:, 0], xy[:, 1]) - 1
        assert np.max(np.abs(change)) < 0.02, change
