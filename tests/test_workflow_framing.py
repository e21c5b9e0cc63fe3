"""Framing through the workflow: a small generated night whose frames turn ~12 degrees about the
pole, stacked with stacking.framing reference, crop and maximize."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from matplotlib.path import Path as PolygonPath
from PIL import Image
from workflow_helpers import snakemake, write_config

from nightstack.camera import Camera
from nightstack.demo import DemoConfig, frame_cameras, frame_rotations, generate_night
from nightstack.framing import box_from_header, footprints_of, output_box
from nightstack.io import read_json
from nightstack.stacking import COVERAGE_TOLERANCE_PX

pytestmark = pytest.mark.workflow

# 10 minutes between frames: the sky turns 2.5 degrees about the pole from one to the next
ROTATING = DemoConfig(n_lights=6, width_px=800, height_px=533, focal_px=1200.0, cadence_s=600.0,
                      n_biases=4, n_darks=4, n_flats=4)
FRAMINGS = ("reference", "crop", "maximize")


def _read(night, framing):
    """The night's stack files of one run, read into memory."""
    out = {}
    with fits.open(night / "stack_linear.fits") as hdul:
        out["linear"] = np.asarray(hdul[0].data, dtype=np.float64)
        out["coverage"] = np.asarray(hdul["COVERAGE"].data)
        out["linear_header"] = hdul[0].header.copy()
    with fits.open(night / "stack.fits") as hdul:
        out["final"] = np.asarray(hdul[0].data, dtype=np.float64)
        out["header"] = hdul[0].header.copy()
    out["info"] = read_json(night / "stack_linear.json")["info"]
    out["solution"] = read_json(night / "solution.json")
    out["png_size"] = Image.open(night / "stack.png").size
    out["png"] = np.asarray(Image.open(night / "stack.png").convert("L"))
    out["tif_shape"] = tifffile.imread(night / "stack.tif").shape
    assert (night / "plots" / "star_matches.png").is_file()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("framing")
    folder = work / "rotating"
    generate_night(folder, ROTATING)
    results = {}
    for framing in FRAMINGS:  # only stack, outputs and plots rerun after the first
        write_config(work, nights={"rotating": str(folder)}, stacking={"framing": framing})
        snakemake(work, timeout=1800)
        results[framing] = _read(work / "results" / "rotating", framing)
    return results


def solved_geometry(solution):
    """Warps-like geometry (ref_camera, frame_camera, rotation) of the accepted frames."""
    cam = solution["camera"]
    ref = Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam["k1"], cam["k2"])
    return [SimpleNamespace(ref_camera=ref, frame_camera=ref.with_focal(r["focal_px"]),
                            rotation=np.asarray(r["rotation"], float))
            for r in solution["frames"] if r["status"] == "accepted"]


def true_geometry(solution):
    """The generator's geometry of the same frames, on the solution's reference."""
    rotations, cameras = frame_rotations(ROTATING), frame_cameras(ROTATING)
    index = {f"light_{k:03d}": k for k in range(ROTATING.n_lights)}
    ref = index[solution["reference"]]
    return [SimpleNamespace(ref_camera=cameras[ref], frame_camera=cameras[index[r["frame"]]],
                            rotation=rotations[index[r["frame"]]] @ rotations[ref].T)
            for r in solution["frames"] if r["status"] == "accepted"]


def overlap(box, other):
    """Slices of ``box`` and of ``other`` (x0, y0, width, height) covering their common pixels."""
    x0, y0 = max(box[0], other[0]), max(box[1], other[1])
    x1, y1 = min(box[0] + box[2], other[0] + other[2]), min(box[1] + box[3], other[1] + other[3])
    return ((slice(y0 - box[1], y1 - box[1]), slice(x0 - box[0], x1 - box[0])),
            (slice(y0 - other[1], y1 - other[1]), slice(x0 - other[0], x1 - other[0])))


def as_tuple(box):
    return box.x0_px, box.y0_px, box.width_px, box.height_px


def test_all_frames_accepted_and_rotation_is_strong(runs):
    sol = runs["reference"]["solution"]
    assert sol["n_accepted"] == ROTATING.n_lights
    angles = [np.degrees(np.linalg.norm(r["rotvec"])) for r in sol["frames"]]
    assert max(angles) > 5.0, angles


def test_reference_framing_is_the_reference_grid(runs):
    ref = runs["reference"]
    assert ref["linear"].shape == (3, 533, 800) and ref["final"].shape == (3, 533, 800)
    assert as_tuple(box_from_header(ref["header"])) == (0, 0, 800, 533)
    assert ref["header"]["NSFRAMNG"] == "reference"
    # the edges no frame covers keep today's value, 0 (not NaN)
    assert np.isfinite(ref["linear"]).all() and np.all(ref["linear"][:, ref["coverage"] == 0] == 0)


def test_crop_is_full_and_the_computed_rectangle(runs):
    crop = runs["crop"]
    n = crop["solution"]["n_accepted"]
    box, _ = output_box("crop", solved_geometry(crop["solution"]), 800, 533)
    assert crop["linear"].shape == (3, box.height_px, box.width_px)
    assert crop["final"].shape == crop["linear"].shape
    assert np.isfinite(crop["linear"]).all() and np.isfinite(crop["final"]).all()
    assert np.all(crop["coverage"] == n)
    assert as_tuple(box_from_header(crop["header"])) == as_tuple(box)
    assert crop["header"]["CRVAL1A"] == box.x0_px and crop["header"]["CRVAL2A"] == box.y0_px
    assert crop["info"]["framing"]["width_px"] == box.width_px
    assert crop["png_size"] == (box.width_px, box.height_px)
    assert crop["tif_shape"][:2] == (box.height_px, box.width_px)
    # the generator's true geometry gives the same rectangle to a pixel
    truth, _ = output_box("crop", true_geometry(crop["solution"]), 800, 533)
    assert np.all(np.abs(np.subtract(as_tuple(box), as_tuple(truth))) <= 1), (box, truth)
    assert box.width_px * box.height_px < 0.8 * 800 * 533  # a real crop


def test_framed_stacks_are_the_reference_stack_cropped_or_padded(runs):
    ref = runs["reference"]
    ref_box = (0, 0, 800, 533)
    for framing in ("crop", "maximize"):
        run = runs[framing]
        mine, theirs = overlap(as_tuple(box_from_header(run["header"])), ref_box)
        np.testing.assert_array_equal(run["coverage"][mine], ref["coverage"][theirs])
        seen = ref["coverage"][theirs] > 0
        np.testing.assert_array_equal(run["linear"][:, *mine][:, seen],
                                      ref["linear"][:, *theirs][:, seen])


def test_maximize_holds_every_frame_with_a_true_coverage_map(runs):
    run = runs["maximize"]
    geometry = solved_geometry(run["solution"])
    box, _ = output_box("maximize", geometry, 800, 533)
    assert as_tuple(box_from_header(run["header"])) == as_tuple(box)
    assert run["linear"].shape == (3, box.height_px, box.width_px)
    assert box.width_px > 800 and box.height_px > 533
    cov = run["coverage"]
    # brute force: in how many footprints each pixel centre lies
    yy, xx = np.mgrid[box.y0_px:box.y0_px + box.height_px, box.x0_px:box.x0_px + box.width_px]
    xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    r = 5 * COVERAGE_TOLERANCE_PX
    counts = [[PolygonPath(f).contains_points(xy, radius=s * r) for f in footprints_of(geometry)]
              for s in (1.0, -1.0)]
    lo, hi = (np.minimum(*np.sum(counts, axis=1)), np.maximum(*np.sum(counts, axis=1)))
    assert np.all((lo <= cov.ravel()) & (cov.ravel() <= hi))
    assert np.mean(lo == hi) > 0.99
    # no frame: NaN in both FITS, black in the preview
    empty = cov == 0
    assert empty.any()
    assert np.array_equal(np.isnan(run["linear"]).any(axis=0), empty)
    assert np.array_equal(np.isnan(run["final"]).any(axis=0), empty)
    assert run["png_size"] == (box.width_px, box.height_px) and np.all(run["png"][empty] == 0)


def sky_level(image, region):
    """Per-channel median (ADU) of the pixels in ``region``, its standard error, and the robust
    per-pixel noise (stars are a few bright outliers the median ignores). Neighbouring pixels
    are correlated by demosaicing and interpolation: the error counts one independent value per
    3x3 pixels."""
    values = image[:, region]
    med = np.median(values, axis=1)
    sigma = 1.4826 * np.median(np.abs(values - med[:, None]), axis=1)
    return med, 1.2533 * sigma / np.sqrt(values.shape[1] / 9.0), sigma


def edge_and_centre(run, stage):
    """Sky levels (median, error, noise per pixel) where one frame and where all frames cover."""
    cov = run["coverage"]
    single, full = cov == 1, cov == run["solution"]["n_accepted"]
    assert single.sum() > 5000 and full.sum() > 5000
    return sky_level(run[stage], single), sky_level(run[stage], full)


def test_maximize_edges_are_not_darker(runs):
    # the stack itself: each pixel the mean of the frames covering it. Allowed: 4 standard
    # errors, plus 0.1 sigma per pixel for the frames' own edges, a little brighter than their
    # centres after their gradient removal (measured +1.1 to 1.4 ADU, 0.05 sigma); a stack
    # darkened by missing frames would be off by 1/6 to 5/6 of the sky level (~70 to 360 ADU)
    (edge, edge_err, noise), (centre, centre_err, _) = edge_and_centre(runs["maximize"], "linear")
    tolerance = 4 * np.hypot(edge_err, centre_err) + 0.1 * noise
    assert np.all(np.abs(edge - centre) < tolerance), (edge, centre, tolerance)


def test_maximize_edges_are_not_darker_after_the_final_gradient_removal(runs):
    # the after-stack gradient fit ignores the NaN pixels; its one-sided star clipping biases
    # the noisier single-frame edges slightly up (measured +0.15 sigma), never down
    (edge, edge_err, noise), (centre, centre_err, _) = edge_and_centre(runs["maximize"], "final")
    assert np.all(edge - centre > -4 * np.hypot(edge_err, centre_err)), (edge, centre)
    assert np.all(np.abs(edge - centre) < 0.25 * noise), (edge, centre, noise)
