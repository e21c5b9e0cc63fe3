"""Where the pixels of a reference tile fall in a frame, one pixel at a time (numba).

The stack warps every frame onto the reference grid tile by tile; each tile's pixels are
mapped through the frame's camera model (nightstack.camera: undistort in the reference camera,
homography, distort in the frame camera). In numpy that is a dozen passes over (n, 2) float64
arrays per tile and frame, plus a pixel grid and a second undistortion for the test that the
ray points in front of the frame camera: on 16 frames of 24 MP, 40 % of the stack's reading
threads. Here each pixel is mapped once, in registers, with the same arithmetic.

Kept apart from nightstack.camera so that jobs which only need the camera model do not load
numba (0.3 s a process).
"""

from __future__ import annotations

import numpy as np
from numba import njit

UNDISTORT_ITERATIONS = 12  # as Camera.undistort


def camera_terms(camera) -> np.ndarray:
    """(cx, cy, focal_px, k1, k2) float64 of a nightstack.camera.Camera."""
    cx, cy = camera.centre
    return np.array([cx, cy, camera.focal_px, camera.k1, camera.k2], dtype=np.float64)


@njit(cache=True, nogil=True)
def map_tile(y0, y1, x0, x1, homography, ray_z_row, ref_terms, frame_terms, width, height,
             tolerance_px):
    """Frame positions of the reference pixels [y0:y1, x0:x1], row-major.

    homography: 3x3 float64 from undistorted reference to undistorted frame pixels
    (camera.homography); ray_z_row: (3,) float64, the frame camera's depth of the ray through
    an undistorted reference pixel (x, y, 1): positive in front of the camera; ref_terms,
    frame_terms: camera_terms of the two cameras. Returns (xy (n, 2) float64 frame pixels,
    inside (n,) bool: in front of the camera and between the first and last pixel centres of
    a width x height frame, within tolerance_px).
    """
    n = (y1 - y0) * (x1 - x0)
    xy = np.empty((n, 2), dtype=np.float64)
    inside = np.empty(n, dtype=np.bool_)
    rcx, rcy, rf, rk1, rk2 = ref_terms[0], ref_terms[1], ref_terms[2], ref_terms[3], ref_terms[4]
    fcx, fcy, ff, fk1, fk2 = (frame_terms[0], frame_terms[1], frame_terms[2], frame_terms[3],
                              frame_terms[4])
    ref_distorted = rk1 != 0.0 or rk2 != 0.0
    frame_distorted = fk1 != 0.0 or fk2 != 0.0
    h = homography
    k = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            xu = np.float64(x)
            yu = np.float64(y)
            if ref_distorted:  # fixed-point iteration, as Camera.undistort
                tx = xu - rcx
                ty = yu - rcy
                dx = tx
                dy = ty
                for _ in range(UNDISTORT_ITERATIONS):
                    r2 = (dx * dx + dy * dy) / rf**2
                    factor = 1.0 + rk1 * r2 + rk2 * r2 * r2
                    dx = tx / factor
                    dy = ty / factor
                xu = rcx + dx
                yu = rcy + dy
            w = h[2, 0] * xu + h[2, 1] * yu + h[2, 2]
            fx = (h[0, 0] * xu + h[0, 1] * yu + h[0, 2]) / w
            fy = (h[1, 0] * xu + h[1, 1] * yu + h[1, 2]) / w
            if frame_distorted:  # as Camera.distort
                dx = fx - fcx
                dy = fy - fcy
                r2 = (dx * dx + dy * dy) / ff**2
                factor = 1.0 + fk1 * r2 + fk2 * r2 * r2
                fx = fcx + dx * factor
                fy = fcy + dy * factor
            xy[k, 0] = fx
            xy[k, 1] = fy
            in_front = xu * ray_z_row[0] + yu * ray_z_row[1] + ray_z_row[2] > 0.0
            # comparisons are False for NaN: a position that is not a number is outside
            inside[k] = (in_front and fx >= -tolerance_px and fx <= width - 1 + tolerance_px
                         and fy >= -tolerance_px and fy <= height - 1 + tolerance_px)
            k += 1
    return xy, inside
