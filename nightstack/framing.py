"""Framing of a stack: which box of the reference pixel grid the output image covers.

* ``reference`` - the reference frame's own grid (the default; the stack is W x H).
* ``crop`` - the largest axis-aligned rectangle of whole reference pixels that every accepted
  frame covers: a stack with no empty or thin edges.
* ``maximize`` - the bounding box of the union of the frames: every pixel any frame saw. Each
  output pixel is the (weighted) mean of the frames that cover it, so edges seen by few frames
  are noisier but not darker; the stack's COVERAGE map counts them.

Output pixels are whole reference pixels: output pixel (row i, column j) is reference pixel
(x0 + j, y0 + i), so a framed stack is the reference-framed one cropped or padded, never
resampled again. Pixel convention of nightstack.camera (0-based, x = column, centres at integers).

Footprints. The stacker uses a frame at a reference pixel when the pixel maps inside the frame's
box of pixel centres, [0, W-1] x [0, H-1] (nightstack.stacking). A frame's footprint is that box's
boundary, sampled every BOUNDARY_STEP_PX, mapped into the reference grid with
``map_frame_to_ref`` (rotation, per-frame focal length and radial distortion: the stacker's own
mapping, inverted). Without distortion the edges are straight lines, so the polygon is exact;
with distortion the chords between samples deviate from the curved edge by about
curvature * step^2 / 8, far below 0.01 px at 8 px spacing.

Crop method. The intersection of the footprints is the intersection of the inner half-planes of
all their edges (scipy.spatial.HalfspaceIntersection, started from the Chebyshev centre found by
linprog). For convex footprints (no distortion: straight edges) this is the exact intersection.
With distortion the edges bow slightly, either way (the frame's and the reference's distortion
mostly cancel); a footprint with inward-bowed edges is replaced by its kernel, which lies inside
it, so the polygon stays fully covered. In the convex polygon {p : a.p <= c}, the largest
rectangle of a fixed aspect ratio r (width = r * height) is a linear programme: maximise h over
(x0, y0, h) subject to a_x x0 + a_y y0 + (max(a_x, 0) r + max(a_y, 0)) h <= c for every edge
(the corner furthest along each normal), solved exactly by HiGHS. Its log area is concave in
log r (the problem is log-concave), so a bounded scalar search finds the best aspect ratio to
1e-9 in log r. The continuous rectangle (accurate to ~1e-6 px) is snapped inwards to whole
pixel centres, then grown one pixel at a time on every side whose new row or column every
frame covers, checked pixel by pixel with the stacker's own forward mapping (exact for any
footprint shape), until no side can grow. Measured against a brute-force search of the
covered-pixel mask (tests/test_framing.py): the same area without distortion, within 0.1 %
with distortion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linprog, minimize_scalar
from scipy.spatial import ConvexHull, HalfspaceIntersection

from .camera import map_frame_to_ref, map_ref_to_frame
from .errors import NightstackError

FRAMINGS = ("reference", "crop", "maximize")
BOUNDARY_STEP_PX = 8.0  # spacing of the footprint samples along a frame's edges
INSIDE_TOLERANCE_PX = 1e-6  # round-off allowed when a point is tested against a polygon edge
MIN_COMMON_RADIUS_PX = 1.0  # the frames' common area must hold a disc this large
LOG_ASPECT_TOLERANCE = 1e-9
MAX_CANVAS_AREA_FACTOR = 16.0  # a maximize canvas larger than this x the reference is an error


@dataclass(frozen=True)
class OutputBox:
    """The box of reference pixels a stack covers (whole pixels, 0-based).

    Output pixel (row i, column j) is reference pixel (x0_px + j, y0_px + i).
    """

    framing: str
    x0_px: int
    y0_px: int
    width_px: int
    height_px: int

    def as_dict(self) -> dict:
        return asdict(self)


def reference_box(width_px: int, height_px: int) -> OutputBox:
    """The reference frame's own grid."""
    return OutputBox("reference", 0, 0, int(width_px), int(height_px))


# ---------------------------------------------------------------------------- footprints


def frame_boundary_px(width_px: int, height_px: int, step_px: float = BOUNDARY_STEP_PX) -> np.ndarray:
    """Points (n, 2) around the box of pixel centres [0, W-1] x [0, H-1], at most ``step_px``
    apart, corners included, in order (top edge left to right, then right, bottom, left)."""
    x_max, y_max = float(width_px - 1), float(height_px - 1)
    nx = max(math.ceil(x_max / step_px), 1)
    ny = max(math.ceil(y_max / step_px), 1)
    xs = np.linspace(0.0, x_max, nx + 1)[:-1]
    ys = np.linspace(0.0, y_max, ny + 1)[:-1]
    top = np.column_stack([xs, np.zeros_like(xs)])
    right = np.column_stack([np.full_like(ys, x_max), ys])
    bottom = np.column_stack([x_max - xs, np.full_like(xs, y_max)])
    left = np.column_stack([np.zeros_like(ys), y_max - ys])
    return np.concatenate([top, right, bottom, left])


def footprint_px(ref_camera, frame_camera, rotation, step_px: float = BOUNDARY_STEP_PX) -> np.ndarray:
    """A frame's footprint in the reference grid: polygon vertices (n, 2), reference px.

    ``rotation`` turns reference-camera directions into the frame camera's (FrameWarp.rotation).
    """
    boundary = frame_boundary_px(frame_camera.width_px, frame_camera.height_px, step_px)
    return map_frame_to_ref(boundary, ref_camera, frame_camera, np.asarray(rotation, float))


def footprints_of(warps, step_px: float = BOUNDARY_STEP_PX) -> list[np.ndarray]:
    """Footprints (list of (n, 2) polygons, reference px) of objects with ``ref_camera``,
    ``frame_camera`` and ``rotation`` (nightstack.stacking.FrameWarp)."""
    return [footprint_px(w.ref_camera, w.frame_camera, w.rotation, step_px) for w in warps]


def edge_halfplanes(polygon: np.ndarray) -> np.ndarray:
    """Inner half-planes of a polygon's edges as rows (a_x, a_y, c): a . p <= c inside.

    The normals (a_x, a_y) are unit outward normals, whatever the vertex order.
    """
    p = np.asarray(polygon, float)
    q = np.roll(p, -1, axis=0)
    signed_area = 0.5 * np.sum(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1])
    d = (q - p) * np.sign(signed_area)
    length = np.hypot(d[:, 0], d[:, 1])
    keep = length > 0
    normal = np.column_stack([d[keep, 1], -d[keep, 0]]) / length[keep, None]
    return np.column_stack([normal, np.sum(normal * p[keep], axis=1)])


# ---------------------------------------------------------------------------- crop


def _chebyshev_centre(halfplanes: np.ndarray):
    """Centre (2,) and radius (px) of the largest disc inside {p : a . p <= c} (unit normals)."""
    a, c = halfplanes[:, :2], halfplanes[:, 2]
    res = linprog([0.0, 0.0, -1.0], A_ub=np.column_stack([a, np.ones(len(a))]), b_ub=c,
                  bounds=[(None, None), (None, None), (0.0, None)], method="highs")
    if res.status != 0:
        return None, 0.0
    return res.x[:2], float(res.x[2])


def common_polygon(footprints: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The area every footprint covers, as a convex polygon.

    Returns (vertices (m, 2) in order, halfplanes (m, 3) rows (a_x, a_y, c) with a . p <= c
    inside). Raises NightstackError when the frames share no area.
    """
    halfplanes = np.concatenate([edge_halfplanes(f) for f in footprints])
    centre, radius = _chebyshev_centre(halfplanes)
    if centre is None or radius < MIN_COMMON_RADIUS_PX:
        raise NightstackError("framing crop: the accepted frames have no area in common")
    scipy_form = np.column_stack([halfplanes[:, :2], -halfplanes[:, 2]])  # a . p - c <= 0
    corners = HalfspaceIntersection(scipy_form, centre).intersections
    hull = ConvexHull(corners)
    equations = hull.equations  # unit normal . p + offset <= 0 inside
    return corners[hull.vertices], np.column_stack([equations[:, :2], -equations[:, 2]])


def _largest_rectangle_of_aspect(halfplanes: np.ndarray, aspect: float):
    """Largest rectangle of width = aspect * height inside {a . p <= c}: (x0, y0, width, height)."""
    a, c = halfplanes[:, :2], halfplanes[:, 2]
    reach = np.maximum(a[:, 0], 0.0) * aspect + np.maximum(a[:, 1], 0.0)
    res = linprog([0.0, 0.0, -1.0], A_ub=np.column_stack([a, reach]), b_ub=c,
                  bounds=[(None, None), (None, None), (0.0, None)], method="highs")
    if res.status != 0:
        raise NightstackError(f"framing crop: rectangle search failed ({res.message})")
    x0, y0, height = res.x
    return float(x0), float(y0), float(aspect * height), float(height)


def largest_rectangle(halfplanes: np.ndarray, vertices: np.ndarray):
    """Largest-area axis-aligned rectangle (x0, y0, width, height), reference px, in a convex
    polygon (continuous; see the module docstring)."""
    span = np.ptp(vertices, axis=0)

    def neg_log_area(log_aspect):
        _, _, width, height = _largest_rectangle_of_aspect(halfplanes, math.exp(log_aspect))
        return -math.log(max(width * height, 1e-300))

    bounds = (math.log(1.0 / max(span[1], 1.0)), math.log(max(span[0], 1.0)))
    best = minimize_scalar(neg_log_area, bounds=bounds, method="bounded",
                           options={"xatol": LOG_ASPECT_TOLERANCE})
    return _largest_rectangle_of_aspect(halfplanes, math.exp(best.x))


def pixels_covered(warps, x0: int, y0: int, x1: int, y1: int,
                   tolerance_px: float = INSIDE_TOLERANCE_PX) -> bool:
    """True if every reference pixel centre of the inclusive box [x0, x1] x [y0, y1] maps inside
    every frame's box of pixel centres (the stacker's rule, computed by the forward mapping)."""
    yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    for w in warps:
        f = map_ref_to_frame(xy, w.ref_camera, w.frame_camera, np.asarray(w.rotation, float))
        high = np.array([w.frame_camera.width_px - 1, w.frame_camera.height_px - 1], float)
        if not np.all((f >= -tolerance_px) & (f <= high + tolerance_px)):
            return False
    return True


SIDES = {"left": (0, -1), "top": (1, -1), "right": (2, 1), "bottom": (3, 1)}


def _new_edge(box, side: str):
    """The row or column of pixels (x0, y0, x1, y1) that growing ``box`` on ``side`` adds."""
    index, step = SIDES[side]
    edge = list(box)
    edge[index] += step
    edge[(index + 2) % 4] = edge[index]
    return edge


def snap_rectangle(warps, rectangle) -> tuple[int, int, int, int]:
    """Whole-pixel rectangle (x0, y0, x1, y1), inclusive pixel centres, covered by every frame:
    the continuous ``rectangle`` (x0, y0, width, height) snapped inwards, then grown one pixel
    at a time on every side whose new row or column of pixels all frames cover, until no side
    can grow."""
    x, y, width, height = rectangle
    tol = INSIDE_TOLERANCE_PX
    box = [math.ceil(x - tol), math.ceil(y - tol),
           math.floor(x + width + tol), math.floor(y + height + tol)]
    if box[2] < box[0] or box[3] < box[1]:
        raise NightstackError("framing crop: the common area holds no whole pixel")
    # covered edges of a rectangle in simply connected footprints: covered inside too
    edges = [(box[0], box[1], box[2], box[1]), (box[0], box[3], box[2], box[3]),
             (box[0], box[1], box[0], box[3]), (box[2], box[1], box[2], box[3])]
    if not all(pixels_covered(warps, *edge) for edge in edges):
        raise NightstackError("framing crop: the rectangle found is not covered by every frame")
    grew = True
    while grew:
        grew = False
        for side, (index, step) in SIDES.items():
            if pixels_covered(warps, *_new_edge(box, side)):
                box[index] += step
                grew = True
    return tuple(int(v) for v in box)


# ---------------------------------------------------------------------------- framings


def crop_box(warps, footprints: list[np.ndarray]) -> tuple[OutputBox, dict]:
    """The crop framing of frames and their footprints (reference px) -> (box, details)."""
    vertices, halfplanes = common_polygon(footprints)
    rectangle = largest_rectangle(halfplanes, vertices)
    x0, y0, x1, y1 = snap_rectangle(warps, rectangle)
    box = OutputBox("crop", x0, y0, x1 - x0 + 1, y1 - y0 + 1)
    details = {
        "common_polygon_ref_px": np.round(vertices, 3).tolist(),
        "continuous_rectangle_ref_px": dict(zip(("x0", "y0", "width", "height"),
                                                (round(v, 6) for v in rectangle))),
    }
    return box, details


def maximize_box(footprints: list[np.ndarray], ref_width_px: int, ref_height_px: int
                 ) -> tuple[OutputBox, dict]:
    """The maximize framing: the whole-pixel bounding box of all footprints and the reference."""
    points = np.concatenate([*footprints, [[0.0, 0.0], [ref_width_px - 1.0, ref_height_px - 1.0]]])
    lo = np.floor(points.min(axis=0) + INSIDE_TOLERANCE_PX).astype(int)
    hi = np.ceil(points.max(axis=0) - INSIDE_TOLERANCE_PX).astype(int)
    width, height = (int(v) for v in hi - lo + 1)
    if width * height > MAX_CANVAS_AREA_FACTOR * ref_width_px * ref_height_px:
        raise NightstackError(
            f"framing maximize: the frames span {width}x{height} px, more than "
            f"{MAX_CANVAS_AREA_FACTOR:g} times the reference frame; is a frame misregistered?")
    box = OutputBox("maximize", int(lo[0]), int(lo[1]), width, height)
    return box, {"footprint_extent_ref_px": {
        "x_min": float(points[:, 0].min()), "x_max": float(points[:, 0].max()),
        "y_min": float(points[:, 1].min()), "y_max": float(points[:, 1].max())}}


def output_box(framing: str, warps, ref_width_px: int, ref_height_px: int
               ) -> tuple[OutputBox, dict]:
    """The output box of a stack for a framing, with details for the provenance record.

    warps: objects with ref_camera, frame_camera and rotation (the frames to stack).
    """
    if framing not in FRAMINGS:
        raise NightstackError(f"framing must be one of {', '.join(FRAMINGS)} (got {framing!r})")
    if framing == "reference":
        return reference_box(ref_width_px, ref_height_px), {}
    footprints = footprints_of(warps)
    if framing == "crop":
        return crop_box(warps, footprints)
    return maximize_box(footprints, ref_width_px, ref_height_px)


# ---------------------------------------------------------------------------- FITS header


def framing_cards(box: OutputBox) -> list[tuple]:
    """FITS cards recording the framing: NSFRAMNG, NSREFX0/NSREFY0 (reference pixel, 0-based,
    of stack pixel [0, 0]), and an alternate linear WCS 'A' (WCSNAMEA = REFERENCE) mapping
    FITS pixels (1-based) of the stack to 0-based reference pixels."""
    return [
        ("NSFRAMNG", box.framing, "framing: reference | crop | maximize"),
        ("NSREFX0", box.x0_px, "reference x (0-based) of stack column 0"),
        ("NSREFY0", box.y0_px, "reference y (0-based) of stack row 0"),
        ("WCSNAMEA", "REFERENCE", "WCS A: reference frame pixels, 0-based"),
        ("CTYPE1A", "REFX", "reference frame column"),
        ("CTYPE2A", "REFY", "reference frame row"),
        ("CRPIX1A", 1.0, "stack FITS column 1"),
        ("CRPIX2A", 1.0, "stack FITS row 1"),
        ("CRVAL1A", float(box.x0_px), "its reference x (0-based)"),
        ("CRVAL2A", float(box.y0_px), "its reference y (0-based)"),
        ("CDELT1A", 1.0, "reference px per stack px"),
        ("CDELT2A", 1.0, "reference px per stack px"),
    ]


FRAMING_KEYWORDS = tuple(card[0] for card in framing_cards(OutputBox("reference", 0, 0, 1, 1)))


def box_from_header(header) -> OutputBox | None:
    """The OutputBox recorded by ``framing_cards`` in a stack header (None if absent)."""
    if "NSFRAMNG" not in header:
        return None
    height_px, width_px = int(header["NAXIS2"]), int(header["NAXIS1"])
    return OutputBox(str(header["NSFRAMNG"]), int(header["NSREFX0"]), int(header["NSREFY0"]),
                     width_px, height_px)
