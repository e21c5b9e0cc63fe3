"""Framing of the stack (reference | crop | maximize) on generated geometry with known transforms."""

from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath

from nightstack.camera import map_ref_to_frame, rotation_matrix
from nightstack.demo import DemoConfig, frame_cameras, frame_rotations
from nightstack.errors import NightstackError
from nightstack.framing import footprints_of, output_box
from nightstack.io import write_fits_image
from nightstack.stacking import (
    COVERAGE_TOLERANCE_PX,
    FrameWarp,
    StackConfig,
    stack_frames,
)

# a tripod night: 6 frames 10 minutes apart (about 12 degrees about the pole), zooming a little
ROTATING = {"n_lights": 6, "width_px": 800, "height_px": 533, "focal_px": 1200.0,
            "cadence_s": 600.0, "zoom_steps": [1.0, 1.02, 0.98, 1.01, 1.0, 1.03]}
MEAN_LANCZOS = StackConfig(method="mean", interpolation="lanczos3", memory_mb=1)
REFERENCE_INDEX = 2


def night_geometry(**overrides):
    """Warps-like objects (ref_camera, frame_camera, rotation) of the demo's true geometry."""
    cfg = DemoConfig(**{**ROTATING, **overrides})
    rotations, cameras = frame_rotations(cfg), frame_cameras(cfg)
    ref_rot, ref_cam = rotations[REFERENCE_INDEX], cameras[REFERENCE_INDEX]
    return [SimpleNamespace(ref_camera=ref_cam, frame_camera=cam, rotation=rot @ ref_rot.T)
            for cam, rot in zip(cameras, rotations)]


def covered(warps, xy, tolerance_px=0.0) -> np.ndarray:
    """(n_frames, n) True where reference positions xy map inside a frame's pixel-centre box
    (the stacker's rule, computed directly by the forward mapping)."""
    out = []
    for w in warps:
        f = map_ref_to_frame(xy, w.ref_camera, w.frame_camera, w.rotation)
        t = tolerance_px
        out.append((f[:, 0] >= -t) & (f[:, 0] <= w.frame_camera.width_px - 1 + t)
                   & (f[:, 1] >= -t) & (f[:, 1] <= w.frame_camera.height_px - 1 + t))
    return np.array(out)


def pixels(x0, y0, x1, y1) -> np.ndarray:
    """Pixel centres (n, 2) of the inclusive box, row-major."""
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    return np.column_stack([xx.ravel(), yy.ravel()]).astype(float)


def largest_rectangle_in_mask(mask) -> int:
    """Brute force: area (px) of the largest all-True axis-aligned rectangle of a 2-D mask
    (row-by-row histogram, largest rectangle under each histogram with a stack)."""
    heights = np.zeros(mask.shape[1], int)
    best = 0
    for row in mask:
        heights = np.where(row, heights + 1, 0)
        stack = []  # (start column, height), heights increasing
        for col, h in enumerate([*heights, 0]):
            start = col
            while stack and stack[-1][1] >= h:
                start, top = stack.pop()
                best = max(best, top * (col - start))
            stack.append((start, h))
    return best


def footprint_counts(footprints, xy, radius_px):
    """Point-in-polygon counts (n,) with every polygon grown (or shrunk) by ``radius_px``."""
    counts = []
    for sign in (1.0, -1.0):
        inside = [PolygonPath(f).contains_points(xy, radius=sign * radius_px) for f in footprints]
        counts.append(np.sum(inside, axis=0))
    return np.minimum(*counts), np.maximum(*counts)


# ---------------------------------------------------------------------------- crop


@pytest.mark.parametrize("k1", [0.0, -0.05, 0.08])
def test_crop_is_covered_by_every_frame_and_cannot_grow(k1):
    warps = night_geometry(k1=k1)
    ref = warps[0].ref_camera
    box, details = output_box("crop", warps, ref.width_px, ref.height_px)
    x0, y0 = box.x0_px, box.y0_px
    x1, y1 = x0 + box.width_px - 1, y0 + box.height_px - 1
    assert covered(warps, pixels(x0, y0, x1, y1), tolerance_px=1e-5).all()
    # strong rotation: the crop is a real crop, not the reference frame
    assert box.width_px < ref.width_px and box.height_px < ref.height_px
    grown = {"left": (x0 - 1, y0, x0 - 1, y1), "top": (x0, y0 - 1, x1, y0 - 1),
             "right": (x1 + 1, y0, x1 + 1, y1), "bottom": (x0, y1 + 1, x1, y1 + 1)}
    for side, edge in grown.items():
        assert not covered(warps, pixels(*edge)).all(axis=0).all(), f"{side} could grow"
    # pixel centres span width - 1: at most one pixel per side less than the continuous optimum
    # (more with distortion, when the polygon is the footprints' slightly smaller kernels)
    cont = details["continuous_rectangle_ref_px"]
    assert cont["width"] - 2 <= box.width_px - 1 and cont["height"] - 2 <= box.height_px - 1
    if k1 == 0.0:
        assert box.width_px - 1 <= cont["width"] + 1e-6
        assert box.height_px - 1 <= cont["height"] + 1e-6


def test_crop_area_equals_brute_force_largest_rectangle():
    warps = night_geometry()
    ref = warps[0].ref_camera
    box, _ = output_box("crop", warps, ref.width_px, ref.height_px)
    everywhere = covered(warps, pixels(0, 0, ref.width_px - 1, ref.height_px - 1)).all(axis=0)
    brute = largest_rectangle_in_mask(everywhere.reshape(ref.height_px, ref.width_px))
    assert box.width_px * box.height_px == brute


@pytest.mark.parametrize("k1", [-0.05, 0.08])
def test_crop_with_distortion_stays_covered_and_near_brute_force(k1):
    # bowed edges: the kernel of each footprint is used, then the rectangle grows pixel by pixel
    warps = night_geometry(k1=k1)
    ref = warps[0].ref_camera
    box, _ = output_box("crop", warps, ref.width_px, ref.height_px)
    x1, y1 = box.x0_px + box.width_px - 1, box.y0_px + box.height_px - 1
    assert covered(warps, pixels(box.x0_px, box.y0_px, x1, y1), tolerance_px=1e-5).all()
    everywhere = covered(warps, pixels(0, 0, ref.width_px - 1, ref.height_px - 1)).all(axis=0)
    brute = largest_rectangle_in_mask(everywhere.reshape(ref.height_px, ref.width_px))
    assert 0.97 * brute <= box.width_px * box.height_px <= brute


def test_crop_of_frames_without_common_area_is_an_error():
    warps = night_geometry()[:2]
    warps[1].rotation = rotation_matrix([0.0, 0.8, 0.0])  # 46 degrees aside: a 37 degree field
    with pytest.raises(NightstackError, match="no area in common"):
        output_box("crop", warps, 800, 533)


def test_reference_framing_is_the_reference_grid_and_unknown_framing_fails():
    warps = night_geometry()
    box, details = output_box("reference", warps, 800, 533)
    assert (box.x0_px, box.y0_px, box.width_px, box.height_px, details) == (0, 0, 800, 533, {})
    with pytest.raises(NightstackError, match="framing must be one of"):
        output_box("union", warps, 800, 533)


# ---------------------------------------------------------------------------- maximize


def test_maximize_canvas_holds_every_footprint_and_every_covered_pixel():
    warps = night_geometry(k1=-0.05)
    ref = warps[0].ref_camera
    box, _ = output_box("maximize", warps, ref.width_px, ref.height_px)
    x1, y1 = box.x0_px + box.width_px - 1, box.y0_px + box.height_px - 1
    points = np.concatenate(footprints_of(warps, step_px=1.0))
    assert np.all(points >= [box.x0_px, box.y0_px]) and np.all(points <= [x1, y1])
    # a margin of 40 px around the canvas: no frame covers any pixel there
    outer = pixels(box.x0_px - 40, box.y0_px - 40, x1 + 40, y1 + 40)
    outside = ((outer[:, 0] < box.x0_px) | (outer[:, 0] > x1)
               | (outer[:, 1] < box.y0_px) | (outer[:, 1] > y1))
    assert not covered(warps, outer[outside]).any()
    # and the canvas is tight: each of its edge rows/columns is (nearly) reached by a frame
    for edge in ((box.x0_px, box.y0_px, box.x0_px, y1), (x1, box.y0_px, x1, y1),
                 (box.x0_px, box.y0_px, x1, box.y0_px), (box.x0_px, y1, x1, y1)):
        assert covered(warps, pixels(*edge), tolerance_px=1.0).any()


def test_footprint_coverage_counts_match_point_in_polygon():
    warps = night_geometry(k1=-0.05)
    ref = warps[0].ref_camera
    box, _ = output_box("maximize", warps, ref.width_px, ref.height_px)
    rng = np.random.default_rng(3)
    xy = rng.uniform([box.x0_px, box.y0_px],
                     [box.x0_px + box.width_px, box.y0_px + box.height_px], size=(40000, 2))
    lo, hi = footprint_counts(footprints_of(warps), xy, radius_px=0.05)
    direct = covered(warps, xy).sum(axis=0)
    assert np.all((lo <= direct) & (direct <= hi))
    assert np.mean(lo == hi) > 0.99 and set(np.unique(direct)) == set(range(len(warps) + 1))


# ---------------------------------------------------------------------------- stacking


@pytest.fixture(scope="module")
def small_rotating_night(tmp_path_factory):
    """Flat frames (level 100 + noise) on the true geometry of a small rotating night."""
    folder = tmp_path_factory.mktemp("framing")
    geometry = night_geometry(width_px=200, height_px=133, focal_px=300.0, k1=-0.02)
    rng = np.random.default_rng(11)
    warps = []
    for i, g in enumerate(geometry):
        shape = (1, g.frame_camera.height_px, g.frame_camera.width_px)
        path = folder / f"frame{i}.fits"
        write_fits_image(path, (100.0 + 10.0 * i + rng.normal(0.0, 1.0, shape)).astype(np.float32))
        warps.append(FrameWarp(str(path), g.ref_camera, g.frame_camera, g.rotation,
                               offset=np.array([10.0 * i]), scale=np.ones(1),
                               target_level=np.zeros(1)))
    return warps


def framed_stack(warps, framing, cfg=MEAN_LANCZOS):
    ref = warps[0].ref_camera
    box, _ = output_box(framing, warps, ref.width_px, ref.height_px)
    origin = None if framing == "reference" else (box.x0_px, box.y0_px)
    image, coverage, _ = stack_frames(warps, (1, box.height_px, box.width_px), cfg,
                                      origin_px=origin,
                                      fill_value=0.0 if origin is None else np.nan)
    return box, image[0], coverage


def test_framed_stacks_are_the_reference_stack_cropped_or_padded(small_rotating_night):
    warps = small_rotating_night
    ref_box, reference, ref_cov = framed_stack(warps, "reference")
    for framing in ("crop", "maximize"):
        box, image, coverage = framed_stack(warps, framing)
        # the overlap of the two boxes, in each image's own pixels
        ox0, oy0 = max(box.x0_px, 0), max(box.y0_px, 0)
        ox1 = min(box.x0_px + box.width_px, ref_box.width_px)
        oy1 = min(box.y0_px + box.height_px, ref_box.height_px)
        mine = (slice(oy0 - box.y0_px, oy1 - box.y0_px), slice(ox0 - box.x0_px, ox1 - box.x0_px))
        theirs = (slice(oy0, oy1), slice(ox0, ox1))
        np.testing.assert_array_equal(coverage[mine], ref_cov[theirs])
        seen = ref_cov[theirs] > 0
        np.testing.assert_array_equal(image[mine][seen], reference[theirs][seen])


def test_crop_stack_is_full_and_maximize_stack_is_not_darker_at_the_edges(small_rotating_night):
    warps = small_rotating_night
    _, crop, crop_cov = framed_stack(warps, "crop")
    assert np.isfinite(crop).all() and np.all(crop_cov == len(warps))
    _, image, coverage = framed_stack(warps, "maximize")
    assert np.array_equal(np.isfinite(image), coverage > 0)
    # every frame is normalised to 100: a mean over the frames present keeps 100 everywhere
    single, full = image[coverage == 1], image[coverage == len(warps)]
    assert single.size > 200 and full.size > 200
    noise = 1.0  # per frame and pixel
    assert abs(np.mean(single) - 100.0) < 5 * noise / np.sqrt(single.size / 9)
    assert abs(np.mean(full) - 100.0) < 5 * noise / np.sqrt(full.size / 9)


def test_stack_coverage_matches_point_in_polygon(small_rotating_night):
    warps = small_rotating_night
    box, _, coverage = framed_stack(warps, "maximize")
    xy = pixels(box.x0_px, box.y0_px, box.x0_px + box.width_px - 1, box.y0_px + box.height_px - 1)
    # the stacker counts a frame up to COVERAGE_TOLERANCE_PX beyond its edge pixels
    lo, hi = footprint_counts(footprints_of(warps), xy, radius_px=5 * COVERAGE_TOLERANCE_PX)
    cov = coverage.ravel()
    assert np.all((lo <= cov) & (cov <= hi))
    assert np.mean(lo == hi) > 0.97
