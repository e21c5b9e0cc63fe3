"""The rotation + focal-length camera model (seed 000), with optional radial distortion.

Stars are infinitely far away, so two exposures differ only by a rotation of the camera
(and, for a zoom lens, by its focal length). A camera maps a direction ``v`` to a pixel
``p ~ V R v`` with ``V = [[f, 0, cx], [0, f, cy], [0, 0, 1]]``; the principal point is the
image centre. Radial distortion, when enabled, acts on the undistorted pixel about the
centre: ``p_d = c + (p - c) * (1 + k1 r^2 + k2 r^4)`` with ``r = |p - c| / f``.

Pixel convention everywhere in nightstack: 0-based, x is the column, y the row, pixel
centres at integers. A frame's homography ``H`` maps a reference pixel ``(x, y, 1)`` to
the pixel of that frame that sees the same sky point (ignoring distortion).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class Camera:
    """Intrinsics of one exposure: image size (px), focal length (px), radial distortion."""

    width_px: int
    height_px: int
    focal_px: float
    k1: float = 0.0
    k2: float = 0.0

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.width_px - 1) / 2.0, (self.height_px - 1) / 2.0])

    @property
    def has_distortion(self) -> bool:
        return self.k1 != 0.0 or self.k2 != 0.0

    def intrinsic(self) -> np.ndarray:
        """3x3 matrix V from camera coordinates to (undistorted) pixels."""
        cx, cy = self.centre
        return np.array([[self.focal_px, 0.0, cx], [0.0, self.focal_px, cy], [0.0, 0.0, 1.0]])

    def with_focal(self, focal_px: float) -> "Camera":
        return replace(self, focal_px=float(focal_px))

    def distort(self, xy: np.ndarray) -> np.ndarray:
        """Undistorted pixel positions (N, 2) -> observed pixel positions (N, 2)."""
        if not self.has_distortion:
            return np.asarray(xy, dtype=float)
        d = np.asarray(xy, dtype=float) - self.centre
        r2 = np.sum(d * d, axis=-1, keepdims=True) / self.focal_px**2
        return self.centre + d * (1.0 + self.k1 * r2 + self.k2 * r2 * r2)

    def undistort(self, xy: np.ndarray, iterations: int = 12) -> np.ndarray:
        """Observed pixel positions (N, 2) -> undistorted positions, by fixed-point iteration."""
        xy = np.asarray(xy, dtype=float)
        if not self.has_distortion:
            return xy
        target = xy - self.centre
        d = target.copy()
        for _ in range(iterations):
            r2 = np.sum(d * d, axis=-1, keepdims=True) / self.focal_px**2
            d = target / (1.0 + self.k1 * r2 + self.k2 * r2 * r2)
        return self.centre + d


def rotation_matrix(rotvec) -> np.ndarray:
    """Rotation vector (radians, axis * angle) -> 3x3 rotation matrix."""
    return Rotation.from_rotvec(np.asarray(rotvec, dtype=float)).as_matrix()


def rotvec_from_matrix(matrix) -> np.ndarray:
    return Rotation.from_matrix(np.asarray(matrix, dtype=float)).as_rotvec()


def homography(ref_camera: Camera, frame_camera: Camera, rotation: np.ndarray) -> np.ndarray:
    """H = V_frame R V_ref^-1, normalised so H[2, 2] = 1.

    ``rotation`` (3x3) turns reference-camera directions into this frame's camera directions.
    """
    h = frame_camera.intrinsic() @ rotation @ np.linalg.inv(ref_camera.intrinsic())
    return h / h[2, 2]


def apply_homography(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homography to pixel positions (N, 2)."""
    xy = np.asarray(xy, dtype=float)
    x, y = xy[..., 0], xy[..., 1]
    # element-wise products: a matrix product with an inner size of 2 is several times slower
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    return np.stack([(h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w,
                     (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w], axis=-1)


def map_ref_to_frame(xy_ref, ref_camera: Camera, frame_camera: Camera, rotation) -> np.ndarray:
    """Observed reference pixels (N, 2) -> observed pixels of the frame (N, 2)."""
    h = homography(ref_camera, frame_camera, rotation)
    return frame_camera.distort(apply_homography(h, ref_camera.undistort(xy_ref)))


def map_frame_to_ref(xy_frame, ref_camera: Camera, frame_camera: Camera, rotation) -> np.ndarray:
    """Observed frame pixels (N, 2) -> observed reference pixels (N, 2)."""
    h_inv = np.linalg.inv(homography(ref_camera, frame_camera, rotation))
    return ref_camera.distort(apply_homography(h_inv, frame_camera.undistort(xy_frame)))


def default_focal_px(width_px: int, height_px: int, focal_mm=None, pixel_um=None) -> float:
    """A focal length guess in pixels: from the optics when known, else a normal lens.

    A normal lens (diagonal field ~ 47 degrees) has f about equal to the image diagonal.
    """
    if focal_mm and pixel_um and focal_mm > 0 and pixel_um > 0:
        return float(focal_mm * 1000.0 / pixel_um)
    return float(np.hypot(width_px, height_px))
