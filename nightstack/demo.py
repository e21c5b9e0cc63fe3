"""nightstack's demo night: a synthetic night of raw (DNG) frames with known ground truth.

A tripod-mounted camera watches the sky turn about the celestial pole, which sits above the
top edge of the frame. Every light is rendered from the same star field through the camera
model of :mod:`nightstack.camera`, so the truth (homographies, rotations, star positions)
uses the workflow's own conventions. The night is written as a folder that the workflow then
processes like any user's night::

    folder/lights/light_000.dng ...   folder/biases/bias_000.dng ...
    folder/darks/dark_000.dng ...     folder/flats/flat_000.dng ...
    folder/truth.json
    folder/truth_sky_mask.png          (landscape nights only; see below)

Signal chain of a light, per mosaic pixel (electrons unless stated): sky (airglow + an orange
light-pollution gradient) + stars (pixel-integrated PSFs) [+ satellite trail], times the optical
transmission (vignetting and dust), + dark current and hot pixels; Poisson noise; then to ADU
through the gain, + Gaussian read noise, + bias level with small column offsets; clipped to the
white level. Biases, darks and flats share the same bias, column pattern, dark current, hot
pixels, vignetting and dust, so calibration has something real to remove.

Landscape nights (``DemoConfig.landscape``): the tripod also sees a foreground that stays put
while the sky turns: hills with 1/f-rough outlines over the bottom 20-35% of the frame, plus a
few bare trees and a pole whose trunks and branches (2-8 px wide) rise into the sky. In every
light the foreground replaces the sky, stars and satellite trail behind it by its own dim,
textured light (10-40% of the sky level, the same texture in every light), then goes through
the same optics, dark current, noise and read-out as everything else. The exact sky mask is
written to ``truth_sky_mask.png`` at the night's root (8-bit, 255 = sky, 0 = ground): a pixel is
ground when its centre lies on or below the horizon line, or within half a width of a
trunk/branch segment (pixel-centre test, no partial coverage; the rendering uses the same mask).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from numba import njit
from scipy import ndimage
from scipy.special import erf

from .camera import Camera, homography, rotation_matrix, rotvec_from_matrix
from .errors import NightstackError
from .io import read_json, write_json

SIDEREAL_RATE_RAD_S = 7.2921e-5
CFA_LETTERS = "RGB"
NIGHT_START = dt.datetime(2024, 8, 10, 22, 30, 0)

# Where the camera points: the pole sits this far above the optical axis (beyond the top edge),
# and the frame is slightly rolled so the star trails are not axis-aligned.
POLE_OFFSET_DEG = 35.0
ROLL_DEG = 4.0

# Colours are relative to green (G = 1); the light-pollution glow is sodium/LED orange.
AIRGLOW_RGB = np.array([0.85, 1.0, 0.8])
GLOW_RGB = np.array([1.35, 1.0, 0.55])
FLAT_PANEL_RGB = np.array([0.75, 1.0, 0.6])
SATELLITE_RGB = np.array([1.0, 1.0, 0.95])

COUNTS_PER_MAG = 3.0  # star counts rise about x3 per magnitude
MOFFAT_BETA = 3.0
STAMP_HALF_SIZES_PX = (4, 8, 16, 32)
STAR_MARGIN_PX = 40.0  # stars this far outside a frame still spill light into it
FLAT_LEVEL_FRACTION = 0.45  # flats expose to about this fraction of the white level (in G)
FLAT_EXPTIME_S = 1.0
BIAS_EXPTIME_S = 1.0 / 4000.0
COLUMN_OFFSET_ADU = 1.0
N_DUST_DONUTS = 3

# Landscape foreground (DemoConfig.landscape): levels are fractions of the sky level in G.
SKY_MASK_FILE = "truth_sky_mask.png"  # at the night's root, beside truth.json
LANDSCAPE_STREAM = 5  # the foreground's own random stream, so other draws stay as without it
HORIZON_HEIGHT_FRACTIONS = (0.20, 0.35)  # the hills' height spans this range of the frame
HORIZON_ROUGHNESS = 1.3  # Fourier amplitudes of the hill profile fall as f^-roughness
GROUND_LEVEL_FRACTION = 0.25
GROUND_TEXTURE_FRACTION = 0.06  # standard deviation of the ground's texture
GROUND_LEVEL_RANGE = (0.10, 0.40)
TREE_LEVEL_FRACTION = 0.13
GROUND_RGB = np.array([1.25, 1.0, 0.7])  # lit by the orange glow
BRANCH_LEVELS = 3  # each segment forks into two, this many times


@dataclass
class DemoConfig:
    """Everything that shapes the demo night; units in the names, ADU are raw counts."""

    n_lights: int = 16
    width_px: int = 1600
    height_px: int = 1066
    focal_px: float = 2400.0  # a wide-ish lens (about 24 mm on APS-C at this resolution scale)
    k1: float = 0.0  # radial distortion of the lens (Camera.k1/k2)
    k2: float = 0.0
    cadence_s: float = 60.0  # time between frames; the sky turns 15.04 arcsec/s about the pole
    exptime_s: float = 20.0
    n_stars: int = 2500  # inside frame 0; magnitudes from a realistic power law
    fwhm_px: float = 2.6
    psf: str = "moffat"  # or "gaussian"
    sky_adu: float = 400.0
    gradient: float = 0.6  # light-pollution amplitude relative to sky, stronger in R
    read_noise_adu: float = 6.0
    gain_e_per_adu: float = 1.0
    bias_adu: float = 256.0  # also the DNG BlackLevel
    dark_current_adu_s: float = 0.2
    n_hot_pixels: int = 150
    vignetting: float = 0.3  # fractional fall-off at the corners
    satellite_frame: int = 5  # index of the light with a satellite trail (-1: none)
    n_biases: int = 8
    n_darks: int = 8
    n_flats: int = 8
    zoom_steps: list[float] | None = None  # optional per-light focal multipliers
    seed: int = 7
    cfa_pattern: str = "RGGB"
    white_level: int = 16383  # 14-bit sensor
    landscape: bool = False  # a fixed foreground (hills, trees, a pole) over the bottom
    # A second camera of the same sky (nights combined into one image):
    roll_deg: float = 0.0  # extra roll of the camera about its optical axis (deg)
    mono: bool = False  # a monochrome sensor (no Bayer filter): frames are written as FITS
    sky: dict | None = None  # DemoConfig fields of the night whose stars this night sees
    sky_radius_deg: float = 0.0  # the star field covers at least this radius about the axis


# ----------------------------------------------------------------------------- names


def frame_suffix(cfg: DemoConfig) -> str:
    """File suffix of the demo's frames: DNG for a colour (Bayer) camera, FITS for mono."""
    return ".fits" if cfg.mono else ".dng"


def light_names(cfg: DemoConfig) -> list[str]:
    """File names (in lights/) that generate_night writes, in frame order."""
    return [f"light_{k:03d}{frame_suffix(cfg)}" for k in range(cfg.n_lights)]


def calibration_names(kind: str, count: int, suffix: str = ".dng") -> list[str]:
    """File names of ``count`` calibration frames of ``kind`` ("bias", "dark", "flat")."""
    return [f"{kind}_{k:03d}{suffix}" for k in range(count)]


# ----------------------------------------------------------------------------- config


def check_config(cfg: DemoConfig) -> None:
    """Raise NightstackError naming the first DemoConfig setting that cannot make a night."""
    if cfg.n_lights < 1:
        raise NightstackError("demo: n_lights must be at least 1")
    if cfg.width_px < 16 or cfg.height_px < 16:
        raise NightstackError("demo: width_px and height_px must be at least 16")
    if cfg.focal_px <= 0 or cfg.fwhm_px <= 0 or cfg.exptime_s <= 0 or cfg.gain_e_per_adu <= 0:
        raise NightstackError("demo: focal_px, fwhm_px, exptime_s and gain_e_per_adu must be > 0")
    if cfg.psf not in ("moffat", "gaussian"):
        raise NightstackError(f"demo: psf must be 'moffat' or 'gaussian', not {cfg.psf!r}")
    if sorted(cfg.cfa_pattern) != sorted("RGGB") or len(cfg.cfa_pattern) != 4:
        raise NightstackError(f"demo: cfa_pattern {cfg.cfa_pattern!r} is not a 2x2 Bayer pattern")
    if not -1 <= cfg.satellite_frame < cfg.n_lights:
        raise NightstackError(
            f"demo: satellite_frame {cfg.satellite_frame} is not a light index (or -1)"
        )
    if cfg.zoom_steps is not None and len(cfg.zoom_steps) != cfg.n_lights:
        raise NightstackError(
            f"demo: zoom_steps has {len(cfg.zoom_steps)} entries for {cfg.n_lights} lights"
        )
    if not 0 <= cfg.vignetting < 1:
        raise NightstackError("demo: vignetting must be in [0, 1)")
    if not 0 < cfg.bias_adu < cfg.white_level <= 65535:
        raise NightstackError("demo: need 0 < bias_adu < white_level <= 65535")
    if cfg.n_hot_pixels > cfg.width_px * cfg.height_px // 4:
        raise NightstackError("demo: too many hot pixels for the frame size")
    if cfg.sky is not None and DemoConfig(**cfg.sky).sky is not None:
        raise NightstackError("demo: sky names a night that itself borrows another's sky")


# ----------------------------------------------------------------------------- geometry


def reference_rotation(pole_offset_deg: float = POLE_OFFSET_DEG, roll_deg: float = ROLL_DEG):
    """R_0 (3x3): equatorial directions (pole = +z) -> camera directions of the first light.

    Camera axes: x right, y down, z along the optical axis; the pole lands
    ``pole_offset_deg`` above the centre (negative y), slightly rolled.
    """
    tilt = rotation_matrix([np.radians(pole_offset_deg), 0.0, 0.0])
    roll = rotation_matrix([0.0, 0.0, np.radians(roll_deg)])
    return roll @ tilt


def frame_times_s(cfg: DemoConfig) -> np.ndarray:
    """Start time of each light (s) after the first one."""
    return np.arange(cfg.n_lights) * float(cfg.cadence_s)


def frame_rotations(cfg: DemoConfig) -> list[np.ndarray]:
    """R_k = R_0 Rot(pole, omega t_k): equatorial -> camera directions of light k."""
    r0 = rotation_matrix([0.0, 0.0, np.radians(cfg.roll_deg)]) @ reference_rotation()
    return [r0 @ rotation_matrix([0.0, 0.0, SIDEREAL_RATE_RAD_S * t]) for t in frame_times_s(cfg)]


def frame_cameras(cfg: DemoConfig) -> list[Camera]:
    """Camera of each light: the configured lens, times the light's zoom step if any."""
    zooms = cfg.zoom_steps if cfg.zoom_steps is not None else [1.0] * cfg.n_lights
    return [
        Camera(cfg.width_px, cfg.height_px, cfg.focal_px * float(z), cfg.k1, cfg.k2) for z in zooms
    ]


def project(camera: Camera, rotation: np.ndarray, directions: np.ndarray):
    """Unit directions (N, 3, equatorial) -> observed pixels (N, 2) and in-front mask (N,)."""
    cam_dirs = directions @ rotation.T
    in_front = cam_dirs[:, 2] > 1e-6
    z = np.where(in_front, cam_dirs[:, 2], 1.0)
    undistorted = camera.intrinsic()[:2, :2] @ (cam_dirs[:, :2] / z[:, None]).T
    xy = undistorted.T + camera.centre
    return camera.distort(xy), in_front


def inside_frame(xy: np.ndarray, camera: Camera, margin_px: float = 0.0) -> np.ndarray:
    """Mask (N,) of pixel positions within the image, extended by ``margin_px``."""
    lo = -0.5 - margin_px
    return (
        (xy[:, 0] >= lo)
        & (xy[:, 0] <= camera.width_px - 0.5 + margin_px)
        & (xy[:, 1] >= lo)
        & (xy[:, 1] <= camera.height_px - 0.5 + margin_px)
    )


def field_radius_rad(cameras: list[Camera], rotation_span_rad: float) -> float:
    """Angle from the first optical axis that covers every light's field (with margins)."""
    widest = min(cameras, key=lambda cam: cam.focal_px)
    corner = np.array([[-STAR_MARGIN_PX, -STAR_MARGIN_PX]])
    off_axis = widest.undistort(corner) - widest.centre
    corner_rad = np.arctan(np.hypot(*off_axis[0]) / widest.focal_px)
    return float(min(corner_rad + rotation_span_rad + np.radians(2.0), np.radians(85.0)))


def random_directions_in_cap(rng, count: int, axis_rotation: np.ndarray, radius_rad: float):
    """``count`` uniform unit directions (N, 3) within ``radius_rad`` of the camera's axis.

    ``axis_rotation`` is the camera's rotation (equatorial -> camera); the result is equatorial.
    """
    cos_theta = rng.uniform(np.cos(radius_rad), 1.0, count)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    phi = rng.uniform(0.0, 2.0 * np.pi, count)
    cam_dirs = np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), cos_theta], axis=1)
    return cam_dirs @ axis_rotation


# ----------------------------------------------------------------------------- star field


def psf_peak_fraction(cfg: DemoConfig) -> float:
    """Fraction of a star's flux landing in its brightest pixel when centred on it."""
    stamp = psf_stamps(np.zeros((1, 2)), np.zeros((1, 2), dtype=int), 2, cfg)
    return float(stamp.max())


def star_fluxes_e(rng, count: int, cfg: DemoConfig) -> np.ndarray:
    """Fluxes (e per exposure, green) following star counts that rise x3 per magnitude.

    The faint end sits at half the sky noise in the peak pixel (invisible); the brightest
    few stars are pushed past saturation, as a wide field always holds a few bright stars.
    """
    peak = psf_peak_fraction(cfg)
    read_noise_e = cfg.read_noise_adu * cfg.gain_e_per_adu
    sky_noise_e = np.sqrt(cfg.sky_adu * cfg.gain_e_per_adu + read_noise_e**2)
    faint_flux_e = 0.5 * sky_noise_e / peak
    slope = np.log10(COUNTS_PER_MAG)
    span_mag = 12.0
    # Inverse CDF of counts ~ 10^(-slope d), d = magnitudes brighter than the faint end.
    u = rng.uniform(0.0, 1.0, count)
    brighter_mag = -np.log10(1.0 - u * (1.0 - 10.0 ** (-slope * span_mag))) / slope
    return faint_flux_e * 10.0 ** (0.4 * brighter_mag)


def saturate_brightest(flux_e: np.ndarray, in_frame0: np.ndarray, rng, cfg: DemoConfig):
    """Copy of ``flux_e`` where the few brightest stars of frame 0 exceed saturation (2-8x)."""
    peak = psf_peak_fraction(cfg)
    headroom_e = (cfg.white_level - cfg.bias_adu - cfg.sky_adu) * cfg.gain_e_per_adu
    saturation_flux_e = headroom_e / peak
    n_bright = max(2, int(round(in_frame0.sum() / 600)))
    candidates = np.flatnonzero(in_frame0)
    brightest = candidates[np.argsort(flux_e[candidates])[::-1][:n_bright]]
    out = flux_e.copy()
    boost = saturation_flux_e * 10.0 ** rng.uniform(np.log10(2.0), np.log10(8.0), brightest.size)
    out[brightest] = np.maximum(out[brightest], boost)
    return out


def star_colours_rgb(rng, count: int) -> np.ndarray:
    """(N, 3) flux multipliers per channel (G = 1): a spread of bluish to reddish stars."""
    colour_index = np.clip(rng.normal(0.6, 0.35, count), -0.2, 1.8) - 0.6
    return np.stack(
        [
            np.clip(1.0 + 0.35 * colour_index, 0.3, None),
            np.ones(count),
            np.clip(1.0 - 0.35 * colour_index, 0.3, None),
        ],
        axis=1,
    )


def draw_star_field(rng, cfg: DemoConfig, cameras, rotations):
    """The sky's stars: equatorial directions (N, 3), fluxes (N,, e), colours (N, 3).

    Exactly ``cfg.n_stars`` fall inside the first light; the same density continues
    over every other light's field plus a margin.
    """
    span = SIDEREAL_RATE_RAD_S * abs(frame_times_s(cfg)[-1])
    radius = max(field_radius_rad(cameras, span), np.radians(cfg.sky_radius_deg))
    cam0 = cameras[0]
    cap_sr = 2.0 * np.pi * (1.0 - np.cos(radius))
    frame_sr_guess = cam0.width_px * cam0.height_px / cam0.focal_px**2
    batch = int(cfg.n_stars * 1.3 * cap_sr / frame_sr_guess) + 1000
    directions = np.empty((0, 3))
    in_frame0 = np.empty(0, dtype=bool)
    while in_frame0.sum() < cfg.n_stars:  # a handful of batches at most
        new = random_directions_in_cap(rng, batch, rotations[0], radius)
        xy, front = project(cam0, rotations[0], new)
        directions = np.vstack([directions, new])
        in_frame0 = np.concatenate([in_frame0, front & inside_frame(xy, cam0)])
    # Cut where frame 0 holds exactly n_stars so the density matches n_stars everywhere.
    stop = np.searchsorted(np.cumsum(in_frame0), cfg.n_stars) + 1 if cfg.n_stars > 0 else 0
    directions, in_frame0 = directions[:stop], in_frame0[:stop]
    # a sky shared with other cameras (sky_radius_deg) keeps its whole cap
    seen = np.full(len(directions), cfg.sky_radius_deg > 0)
    for camera, rotation in zip(cameras, rotations):
        xy, front = project(camera, rotation, directions)
        seen |= front & inside_frame(xy, camera, STAR_MARGIN_PX)
    directions, in_frame0 = directions[seen], in_frame0[seen]
    flux = star_fluxes_e(rng, len(directions), cfg)
    if len(directions):
        flux = saturate_brightest(flux, in_frame0, rng, cfg)
    return directions, flux, star_colours_rgb(rng, len(directions))


# ----------------------------------------------------------------------------- rendering


def cfa_channel_map(pattern: str, height_px: int, width_px: int) -> np.ndarray:
    """(H, W) int8 channel index (0=R, 1=G, 2=B) of each mosaic pixel for a 2x2 pattern."""
    cell = np.array([CFA_LETTERS.index(c) for c in pattern.upper()], dtype=np.int8).reshape(2, 2)
    reps = ((height_px + 1) // 2, (width_px + 1) // 2)
    return np.tile(cell, reps)[:height_px, :width_px]


def moffat_alpha_px(fwhm_px: float, beta: float = MOFFAT_BETA) -> float:
    return fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def psf_stamps(xy: np.ndarray, origin: np.ndarray, size: int, cfg: DemoConfig) -> np.ndarray:
    """Unit-flux PSFs integrated over pixels: (N, size, size) stamps.

    ``xy`` (N, 2) star centres, ``origin`` (N, 2) integer pixel (x, y) of each stamp's
    top-left pixel. Gaussians integrate exactly (erf); Moffats average a 3x3 subpixel grid.
    """
    grid = np.arange(size)
    dx = origin[:, 0, None] + grid[None, :] - xy[:, 0, None]  # (N, size): pixel centre - star
    dy = origin[:, 1, None] + grid[None, :] - xy[:, 1, None]
    if cfg.psf == "gaussian":
        scale = np.sqrt(2.0) * cfg.fwhm_px / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        ex = 0.5 * (erf((dx + 0.5) / scale) - erf((dx - 0.5) / scale))
        ey = 0.5 * (erf((dy + 0.5) / scale) - erf((dy - 0.5) / scale))
        return ey[:, :, None] * ex[:, None, :]
    return moffat_pixel_means(dx, dy, moffat_alpha_px(cfg.fwhm_px), MOFFAT_BETA)


@njit(cache=True, nogil=True)
def moffat_pixel_means(dx_px, dy_px, alpha_px, beta):
    """Unit-flux Moffat PSFs averaged over a 3x3 subpixel grid: (N, size, size) stamps.

    ``dx_px`` (N, size) pixel-centre x minus star x per stamp column, ``dy_px`` (N, size) the
    same for rows. Compiled because the (N, size, size, 3, 3) temporaries of the array form
    made a 24 MP light take 12 s.
    """
    n_stars, size = dx_px.shape
    stamps = np.empty((n_stars, size, size))
    inv_alpha2 = 1.0 / (alpha_px * alpha_px)
    norm = (beta - 1.0) / (np.pi * alpha_px * alpha_px) / 9.0
    for k in range(n_stars):
        for row in range(size):
            for col in range(size):
                total = 0.0
                for sub_y in range(-1, 2):
                    y = dy_px[k, row] + sub_y / 3.0
                    for sub_x in range(-1, 2):
                        x = dx_px[k, col] + sub_x / 3.0
                        base = 1.0 + (x * x + y * y) * inv_alpha2
                        if beta == 3.0:  # the demo's beta: three multiplies, not a pow
                            total += 1.0 / (base * base * base)
                        else:
                            total += base**-beta
                stamps[k, row, col] = norm * total
    return stamps


def stamp_half_size_px(flux_e: np.ndarray, cfg: DemoConfig) -> np.ndarray:
    """Per star, the smallest stamp half-size (from STAMP_HALF_SIZES_PX) outside which
    its PSF drops below ~0.3 e per pixel."""
    if cfg.psf == "gaussian":
        sigma = cfg.fwhm_px / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        ratio = np.maximum(flux_e / (2.0 * np.pi * sigma**2 * 0.3), 1.0)
        radius = sigma * np.sqrt(2.0 * np.log(ratio))
    else:
        alpha = moffat_alpha_px(cfg.fwhm_px)
        ratio = np.maximum(flux_e * (MOFFAT_BETA - 1.0) / (np.pi * alpha**2 * 0.3), 1.0)
        radius = alpha * np.sqrt(ratio ** (1.0 / MOFFAT_BETA) - 1.0)
    sizes = np.array(STAMP_HALF_SIZES_PX)
    return sizes[np.minimum(np.searchsorted(sizes, radius + 1.0), len(sizes) - 1)]


def render_stars_e(xy, flux_e, rgb, channel_map: np.ndarray, cfg: DemoConfig) -> np.ndarray:
    """Mosaic (H, W) of star electrons: each star's PSF, weighted by its colour per CFA site."""
    image = np.zeros(channel_map.shape)
    half_sizes = stamp_half_size_px(flux_e, cfg)
    for half in np.unique(half_sizes):  # a few stamp sizes, each rendered as one batch
        pick = half_sizes == half
        size = 2 * half + 1
        centres = xy[pick]
        origin = np.round(centres).astype(int) - half
        stamps = psf_stamps(centres, origin, size, cfg)
        add_stamps(image, stamps, origin, flux_e[pick], rgb[pick], channel_map)
    return image


@njit(cache=True, nogil=True)
def add_stamps(image_e, stamps, origin_xy, flux_e, rgb, channel_map) -> None:
    """Add each unit-flux stamp (N, size, size) at its integer top-left ``origin_xy`` (N, 2)
    into ``image_e`` (H, W), times the star's flux (N,, e) and its colour (N, 3) at each
    pixel's CFA channel; parts off the chip are dropped. One pass, no (N, size, size) indices."""
    height, width = image_e.shape
    n_stars, size = stamps.shape[0], stamps.shape[1]
    for k in range(n_stars):
        for row in range(size):
            y = origin_xy[k, 1] + row
            if y < 0 or y >= height:
                continue
            for col in range(size):
                x = origin_xy[k, 0] + col
                if 0 <= x < width:
                    image_e[y, x] += stamps[k, row, col] * flux_e[k] * rgb[k, channel_map[y, x]]


def normalised_coordinates(height_px: int, width_px: int):
    """(u, v) grids in [-1, 1] across the columns and rows, centre 0."""
    v, u = np.mgrid[0:height_px, 0:width_px].astype(float)
    return 2.0 * u / max(width_px - 1, 1) - 1.0, 2.0 * v / max(height_px - 1, 1) - 1.0


def sky_e(channel_map: np.ndarray, cfg: DemoConfig) -> np.ndarray:
    """Mosaic (H, W) of sky electrons per exposure: airglow plus an orange glow.

    The glow rises towards the bottom-left (a town below the horizon), mostly linear with a
    little curvature, reaching ``gradient`` x sky at the brightest corner in G.
    """
    u, v = normalised_coordinates(*channel_map.shape)
    toward_town = np.clip((0.35 * -u + 0.65 * v + 1.0) / 2.0, 0.0, 1.0)
    glow = 0.75 * toward_town + 0.25 * toward_town**2
    base_e = cfg.sky_adu * cfg.gain_e_per_adu
    return base_e * (AIRGLOW_RGB[channel_map] + cfg.gradient * glow * GLOW_RGB[channel_map])


def vignetting_map(height_px: int, width_px: int, corner_falloff: float) -> np.ndarray:
    """(H, W) cos^4-like transmission: 1 at the centre, 1 - corner_falloff at the corners."""
    if corner_falloff <= 0:
        return np.ones((height_px, width_px))
    y, x = np.mgrid[0:height_px, 0:width_px].astype(float)
    r2 = (x - (width_px - 1) / 2.0) ** 2 + (y - (height_px - 1) / 2.0) ** 2
    corner_r2 = ((width_px - 1) / 2.0) ** 2 + ((height_px - 1) / 2.0) ** 2
    tan2_at_corner = (1.0 - corner_falloff) ** -0.5 - 1.0  # cos^4 = (1 + tan^2)^-2
    return (1.0 + tan2_at_corner * r2 / corner_r2) ** -2.0


def draw_dust(rng, height_px: int, width_px: int) -> list[dict]:
    """A few dust donuts: centre (px), ring radius (px), depth (fractional dimming)."""
    scale = min(height_px, width_px)
    return [
        {
            "x": float(rng.uniform(0.1, 0.9) * (width_px - 1)),
            "y": float(rng.uniform(0.1, 0.9) * (height_px - 1)),
            "radius_px": float(rng.uniform(0.02, 0.04) * scale),
            "depth": float(rng.uniform(0.03, 0.07)),
        }
        for _ in range(N_DUST_DONUTS)
    ]


def dust_map(donuts: list[dict], height_px: int, width_px: int) -> np.ndarray:
    """(H, W) transmission of the dust donuts (out-of-focus shadows: a dim ring, lighter centre)."""
    transmission = np.ones((height_px, width_px))
    y, x = np.mgrid[0:height_px, 0:width_px].astype(float)
    for donut in donuts:  # a handful of donuts
        r = np.hypot(x - donut["x"], y - donut["y"])
        ring_width = 0.3 * donut["radius_px"]
        ring = np.exp(-0.5 * ((r - donut["radius_px"]) / ring_width) ** 2)
        disc = 0.5 * (r < donut["radius_px"])
        transmission *= 1.0 - donut["depth"] * np.maximum(ring, disc)
    return transmission


def draw_satellite(rng, height_px: int, width_px: int) -> dict:
    """A straight trail through the middle half of the frame at a random angle."""
    return {
        "x": float(rng.uniform(0.3, 0.7) * (width_px - 1)),
        "y": float(rng.uniform(0.3, 0.7) * (height_px - 1)),
        "angle_deg": float(rng.uniform(0.0, 180.0)),
        "sigma_px": 1.3,
        "peak_e": 2500.0,
    }


def satellite_e(trail: dict, channel_map: np.ndarray) -> np.ndarray:
    """Mosaic (H, W) of trail electrons: a Gaussian cross-section along an infinite line."""
    height, width = channel_map.shape
    y, x = np.mgrid[0:height, 0:width].astype(float)
    angle = np.radians(trail["angle_deg"])
    distance = (x - trail["x"]) * np.sin(angle) - (y - trail["y"]) * np.cos(angle)
    profile = np.exp(-0.5 * (distance / trail["sigma_px"]) ** 2)
    return trail["peak_e"] * profile * SATELLITE_RGB[channel_map]


def trail_endpoints(trail: dict, height_px: int, width_px: int) -> list[list[float]]:
    """Where the trail's line enters and leaves the image: [[x0, y0], [x1, y1]] (px)."""
    angle = np.radians(trail["angle_deg"])
    direction = np.array([np.cos(angle), np.sin(angle)])
    point = np.array([trail["x"], trail["y"]])
    bounds = np.array([[0.0, width_px - 1.0], [0.0, height_px - 1.0]])
    t_lo, t_hi = -np.inf, np.inf
    for axis in range(2):  # clip the line to the image box, one axis at a time
        if abs(direction[axis]) < 1e-12:
            continue
        ts = (bounds[axis] - point[axis]) / direction[axis]
        t_lo, t_hi = max(t_lo, ts.min()), min(t_hi, ts.max())
    return [(point + t_lo * direction).tolist(), (point + t_hi * direction).tolist()]


# ----------------------------------------------------------------------------- landscape


def fractal_profile(rng, n: int, roughness: float) -> np.ndarray:
    """(n,) zero-mean, unit-std random profile whose Fourier amplitudes fall as f^-roughness.

    Drawn over twice the length and cropped, so its two ends do not wrap onto each other.
    """
    freqs = np.fft.rfftfreq(2 * n)
    amplitude = np.zeros_like(freqs)
    amplitude[1:] = freqs[1:] ** -roughness
    spectrum = amplitude * (rng.normal(size=freqs.size) + 1j * rng.normal(size=freqs.size))
    profile = np.fft.irfft(spectrum, 2 * n)[:n]
    return (profile - profile.mean()) / max(profile.std(), 1e-12)


def fractal_field(rng, shape, roughness: float) -> np.ndarray:
    """(H, W) zero-mean, unit-std random field whose Fourier amplitudes fall as f^-roughness."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.hypot(fx, fy)
    amplitude = np.where(f > 0, np.maximum(f, 1e-12) ** -roughness, 0.0)
    noise = rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)
    field = np.fft.irfft2(amplitude * noise, shape)
    return (field - field.mean()) / max(field.std(), 1e-12)


def draw_horizon_px(rng, height_px: int, width_px: int) -> np.ndarray:
    """(W,) row (px, y down) of the horizon at each column centre; the ground lies below it.

    Rolling hills with 1/f roughness whose height above the bottom edge spans
    HORIZON_HEIGHT_FRACTIONS of the frame height across the width.
    """
    lo, hi = HORIZON_HEIGHT_FRACTIONS
    profile = fractal_profile(rng, width_px, HORIZON_ROUGHNESS)
    profile = (profile - profile.min()) / max(np.ptp(profile), 1e-12)
    ground_height_px = height_px * (lo + (hi - lo) * profile)
    return height_px - 0.5 - ground_height_px


def branch_segments(rng, trunks: np.ndarray) -> np.ndarray:
    """Trunks (N, 5: x0, y0, x1, y1, width_px) -> trunks plus BRANCH_LEVELS of forks.

    Every segment forks into two branches turned 20-50 deg to either side, 50-70% as long and
    50-70% as wide (at least 2 px): one carries on from its tip, the other leaves it 50-85% of
    the way up (the side of each is random).
    """
    levels = [trunks]
    parent = trunks
    for _ in range(BRANCH_LEVELS):  # three levels; each level is one array
        p = np.repeat(parent, 2, axis=0)
        n = len(p)
        vec = p[:, 2:4] - p[:, 0:2]
        length_px = np.hypot(vec[:, 0], vec[:, 1])
        angle = np.arctan2(vec[:, 0], -vec[:, 1])  # from straight up, positive to the right
        side = np.tile([-1.0, 1.0], len(parent)) * np.repeat(rng.choice([-1.0, 1.0], n // 2), 2)
        angle = np.clip(angle + side * np.radians(rng.uniform(20.0, 50.0, n)), -1.8, 1.8)
        along = np.where(np.arange(n) % 2 == 0, 1.0, rng.uniform(0.5, 0.85, n))
        start = p[:, 0:2] + along[:, None] * vec
        new_length_px = length_px * rng.uniform(0.5, 0.7, n)
        end = start + new_length_px[:, None] * np.stack([np.sin(angle), -np.cos(angle)], axis=1)
        width_px = np.maximum(p[:, 4] * rng.uniform(0.5, 0.7, n), 2.0)
        parent = np.column_stack([start, end, width_px])
        levels.append(parent)
    return np.vstack(levels)


def draw_foreground_segments(rng, horizon_px: np.ndarray, height_px: int) -> np.ndarray:
    """Segments (N, 5: x0, y0, x1, y1, width_px) of 2-3 bare trees and a pole with a cross-arm.

    Trunks are 5-8 px wide and 15-30% of the frame height tall, rooted a little below the
    horizon; branches thin down to 2 px. The pole is 3 px wide, its cross-arm 2 px.
    """
    width_px = horizon_px.size
    n_trees = int(rng.integers(2, 4))
    base_x = rng.uniform(0.08, 0.92, n_trees + 1) * (width_px - 1)
    base_y = horizon_px[np.round(base_x).astype(int)] + 0.03 * height_px
    tall_px = rng.uniform(0.15, 0.30, n_trees + 1) * height_px
    lean = np.radians(rng.uniform(-8.0, 8.0, n_trees))
    trunks = np.column_stack(
        [
            base_x[:n_trees],
            base_y[:n_trees],
            base_x[:n_trees] + tall_px[:n_trees] * np.sin(lean),
            base_y[:n_trees] - tall_px[:n_trees] * np.cos(lean),
            rng.uniform(5.0, 8.0, n_trees),
        ]
    )
    x, y, tall = base_x[-1], base_y[-1], tall_px[-1]
    arm_px = 0.025 * width_px
    pole = np.array(
        [
            [x, y, x, y - tall, 3.0],
            [x - arm_px, y - 0.9 * tall, x + arm_px, y - 0.9 * tall, 2.0],
        ]
    )
    return np.vstack([branch_segments(rng, trunks), pole])


def segments_mask(segments: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """(H, W) True where a pixel centre lies within width_px/2 of a segment (a capsule)."""
    mask = np.zeros((height_px, width_px), dtype=bool)
    for x0, y0, x1, y1, w in segments:  # a few dozen segments, each over its bounding box
        half = w / 2.0
        c0, c1 = max(int(np.floor(min(x0, x1) - half)), 0), int(np.ceil(max(x0, x1) + half)) + 1
        r0, r1 = max(int(np.floor(min(y0, y1) - half)), 0), int(np.ceil(max(y0, y1) + half)) + 1
        c1, r1 = min(c1, width_px), min(r1, height_px)
        if c0 >= c1 or r0 >= r1:
            continue
        y, x = np.mgrid[r0:r1, c0:c1].astype(float)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        mask[r0:r1, c0:c1] |= np.hypot(x - x0 - t * dx, y - y0 - t * dy) <= half
    return mask


def ground_e(rng, horizon_px, segments_px, channel_map: np.ndarray, cfg: DemoConfig):
    """The foreground's light: (sky mask (H, W) bool, True = sky; electrons (H, W), 0 in the sky).

    Ground: GROUND_LEVEL_FRACTION of the sky level with rock-like (1/f) and grass-like
    (vertical streaks) texture, clipped to GROUND_LEVEL_RANGE; trees and the pole darker.
    """
    height_px, width_px = channel_map.shape
    rows = np.arange(height_px)[:, None]
    trees = segments_mask(segments_px, height_px, width_px)
    ground = (rows >= horizon_px[None, :]) | trees
    grass = ndimage.gaussian_filter(rng.normal(size=channel_map.shape), sigma=(2.5, 0.6))
    texture = 0.8 * fractal_field(rng, channel_map.shape, 1.0) + 0.6 * grass / grass.std()
    level = np.where(
        trees & (rows < horizon_px[None, :]),
        TREE_LEVEL_FRACTION + 0.2 * GROUND_TEXTURE_FRACTION * texture,
        GROUND_LEVEL_FRACTION + GROUND_TEXTURE_FRACTION * texture,
    )
    level = np.clip(level, *GROUND_LEVEL_RANGE)
    base_e = cfg.sky_adu * cfg.gain_e_per_adu
    return ~ground, np.where(ground, base_e * level * GROUND_RGB[channel_map], 0.0)


def draw_landscape(cfg: DemoConfig, channel_map: np.ndarray) -> dict:
    """The fixed foreground of a landscape night, from its own random stream of the seed.

    Returns horizon_px (W,), segments_px (N, 5), sky_mask (H, W, True = sky) and ground_e
    (H, W electrons per exposure before the optics, 0 in the sky).
    """
    rng = np.random.default_rng([cfg.seed, LANDSCAPE_STREAM])
    horizon_px = draw_horizon_px(rng, cfg.height_px, cfg.width_px)
    segments_px = draw_foreground_segments(rng, horizon_px, cfg.height_px)
    sky_mask, light_e = ground_e(rng, horizon_px, segments_px, channel_map, cfg)
    return {
        "horizon_px": horizon_px,
        "segments_px": segments_px,
        "sky_mask": sky_mask,
        "ground_e": light_e,
    }


def write_sky_mask(path, sky_mask: np.ndarray) -> None:
    """Write a sky mask (H, W) bool as an 8-bit greyscale PNG: 255 = sky, 0 = ground."""
    from PIL import Image

    Image.fromarray(np.where(sky_mask, 255, 0).astype(np.uint8), mode="L").save(path)


def read_sky_mask(path) -> np.ndarray:
    """The (H, W) bool sky mask (True = sky) of a PNG written by write_sky_mask."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L")) >= 128


# ----------------------------------------------------------------------------- sensor


@dataclass
class Sensor:
    """The fixed sensor defects every frame shares: column offsets (ADU, (W,)) and hot pixels."""

    column_offsets_adu: np.ndarray
    hot_rows: np.ndarray
    hot_cols: np.ndarray
    hot_dark_adu_s: np.ndarray

    def dark_e(self, shape, cfg: DemoConfig, exptime_s: float) -> np.ndarray:
        """(H, W) dark-current electrons of one exposure, hot pixels included."""
        rate_adu_s = np.full(shape, cfg.dark_current_adu_s)
        rate_adu_s[self.hot_rows, self.hot_cols] += self.hot_dark_adu_s
        return rate_adu_s * exptime_s * cfg.gain_e_per_adu


def draw_sensor(rng, cfg: DemoConfig) -> Sensor:
    """Column offsets (ADU) and hot pixels (unique positions, 20-200 ADU/s, log-uniform)."""
    flat_index = rng.choice(cfg.width_px * cfg.height_px, size=cfg.n_hot_pixels, replace=False)
    rows, cols = np.divmod(flat_index, cfg.width_px)
    return Sensor(
        column_offsets_adu=rng.normal(0.0, COLUMN_OFFSET_ADU, cfg.width_px),
        hot_rows=rows,
        hot_cols=cols,
        hot_dark_adu_s=10.0 ** rng.uniform(np.log10(20.0), np.log10(200.0), cfg.n_hot_pixels),
    )


def read_out(signal_e: np.ndarray, rng, sensor: Sensor, cfg: DemoConfig) -> np.ndarray:
    """Expected electrons (H, W) -> raw uint16 mosaic: shot noise, gain, read noise, bias, clip."""
    electrons = rng.poisson(np.maximum(signal_e, 0.0)).astype(float)
    adu = electrons / cfg.gain_e_per_adu
    adu += rng.normal(0.0, cfg.read_noise_adu, signal_e.shape)
    adu += cfg.bias_adu + sensor.column_offsets_adu[None, :]
    return np.clip(np.round(adu), 0, cfg.white_level).astype(np.uint16)


def frame_rng(cfg: DemoConfig, kind: str, index: int):
    """An independent, reproducible noise stream for one frame."""
    kind_code = {"light": 1, "bias": 2, "dark": 3, "flat": 4}[kind]
    return np.random.default_rng([cfg.seed, kind_code, index])


# ----------------------------------------------------------------------------- DNG


def write_dng(
    path,
    mosaic_uint16,
    cfa_pattern,
    exptime_s,
    date_obs,
    black_level,
    white_level,
    make="nightstack",
    model="demo camera",
) -> None:
    """Write a CFA mosaic (H, W) uint16 as a minimal uncompressed DNG that rawpy/LibRaw reads.

    ``date_obs``: datetime or ISO string (stored to the second); ``exptime_s`` in seconds.
    """
    import tifffile

    mosaic = np.asarray(mosaic_uint16)
    if mosaic.ndim != 2 or mosaic.dtype != np.uint16:
        raise NightstackError(f"{path}: a DNG mosaic must be a 2-D uint16 array")
    if isinstance(date_obs, str):
        date_obs = dt.datetime.fromisoformat(date_obs)
    pattern = [CFA_LETTERS.index(c) for c in cfa_pattern.upper()]
    exposure = Fraction(float(exptime_s)).limit_denominator(1_000_000)
    camera_name = f"{make} {model}"
    identity_srational = [v for i in range(9) for v in ((1, 1) if i % 4 == 0 else (0, 1))]
    tags = [
        (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
        (33422, "B", 4, tuple(pattern), True),  # CFAPattern
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
        (50708, "s", 0, camera_name, True),  # UniqueCameraModel
        (50714, "H", 1, int(black_level), True),  # BlackLevel
        (50717, "H", 1, int(white_level), True),  # WhiteLevel
        (50721, "2i", 9, tuple(identity_srational), True),  # ColorMatrix1
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral
        (50778, "H", 1, 21, True),  # CalibrationIlluminant1 = D65
        (33434, "2I", 1, (exposure.numerator, exposure.denominator), True),  # ExposureTime
        (306, "s", 0, date_obs.strftime("%Y:%m:%d %H:%M:%S"), True),  # DateTime
        (271, "s", 0, make, True),
        (272, "s", 0, model, True),
    ]
    tifffile.imwrite(
        path,
        mosaic,
        photometric=32803,  # CFA
        compression=None,
        subfiletype=0,
        metadata=None,
        extratags=tags,
    )


def write_mono_fits(path, image_uint16, exptime_s, date_obs, model="demo mono camera") -> None:
    """Write a mono raw frame (H, W) uint16 as FITS with EXPTIME (s), DATE-OBS and INSTRUME."""
    from astropy.io import fits

    if isinstance(date_obs, str):
        date_obs = dt.datetime.fromisoformat(date_obs)
    header = fits.Header()
    header["EXPTIME"] = (float(exptime_s), "[s]")
    header["DATE-OBS"] = date_obs.strftime("%Y-%m-%dT%H:%M:%S")
    header["INSTRUME"] = f"nightstack {model}"
    fits.PrimaryHDU(np.asarray(image_uint16, dtype=np.uint16), header).writeto(path)


def write_raw(path, mosaic_uint16, cfg: DemoConfig, exptime_s, date_obs) -> None:
    """Write one raw frame as the demo camera does: DNG (Bayer) or FITS (mono)."""
    if cfg.mono:
        write_mono_fits(path, mosaic_uint16, exptime_s, date_obs)
    else:
        write_dng(path, mosaic_uint16, cfg.cfa_pattern, exptime_s, date_obs, cfg.bias_adu,
                  cfg.white_level)


# ----------------------------------------------------------------------------- the night


def frame_truth(k, name, time_s, ref_camera, camera, rotation_ref_to_frame) -> dict:
    """The truth entry of light k: file, time, H (ref px -> frame px), rotation, focal."""
    return {
        "index": k,
        "file": f"lights/{name}",
        "time_s": float(time_s),
        "date_obs": (NIGHT_START + dt.timedelta(seconds=float(time_s))).isoformat(),
        "H": homography(ref_camera, camera, rotation_ref_to_frame),
        "rotation": rotation_ref_to_frame,
        "rotvec": rotvec_from_matrix(rotation_ref_to_frame),
        "focal_px": camera.focal_px,
    }


def write_calibration(folder: Path, cfg: DemoConfig, sensor: Sensor, transmission, channel_map):
    """Write biases/, darks/ and flats/ into ``folder``; flats see vignetting and dust."""
    shape = channel_map.shape
    clock = NIGHT_START + dt.timedelta(seconds=float(frame_times_s(cfg)[-1]) + 600.0)
    flat_e = (
        FLAT_LEVEL_FRACTION
        * (cfg.white_level - cfg.bias_adu)
        * cfg.gain_e_per_adu
        * FLAT_PANEL_RGB[channel_map]
        * transmission
    )
    kinds = [
        ("bias", "biases", cfg.n_biases, BIAS_EXPTIME_S, None),
        ("dark", "darks", cfg.n_darks, cfg.exptime_s, None),
        ("flat", "flats", cfg.n_flats, FLAT_EXPTIME_S, flat_e),
    ]
    for kind, subfolder, count, exptime_s, light_e in kinds:
        (folder / subfolder).mkdir()
        for i, name in enumerate(calibration_names(kind, count, frame_suffix(cfg))):
            signal = sensor.dark_e(shape, cfg, exptime_s)
            if light_e is not None:
                signal += light_e
            mosaic = read_out(signal, frame_rng(cfg, kind, i), sensor, cfg)
            write_raw(folder / subfolder / name, mosaic, cfg, exptime_s, clock)
            clock += dt.timedelta(seconds=exptime_s + 2.0)  # one after the other, as shot


def render_light(k: int, cfg: DemoConfig, scene: dict, sensor: Sensor) -> np.ndarray:
    """Raw uint16 mosaic (H, W) of light ``k``: sky, stars, trail, [foreground,] optics, dark,
    noise. The foreground replaces whatever sky lies behind it."""
    channel_map = scene["channel_map"]
    camera, rotation = scene["cameras"][k], scene["rotations"][k]
    xy, front = project(camera, rotation, scene["directions"])
    near = front & inside_frame(xy, camera, STAR_MARGIN_PX)
    sky_and_stars = scene["sky_e"] + render_stars_e(
        xy[near], scene["flux_e"][near], scene["rgb"][near], channel_map, cfg
    )
    if k == cfg.satellite_frame:
        sky_and_stars += satellite_e(scene["satellite"], channel_map)
    if scene["landscape"] is not None:
        land = scene["landscape"]
        sky_and_stars = np.where(land["sky_mask"], sky_and_stars, land["ground_e"])
    signal = sky_and_stars * scene["transmission"] + sensor.dark_e(
        channel_map.shape, cfg, cfg.exptime_s
    )
    return read_out(signal, frame_rng(cfg, "light", k), sensor, cfg)


def write_light(k: int, folder: Path, cfg: DemoConfig, scene: dict, sensor: Sensor) -> None:
    """Render light ``k`` and write it into ``folder/lights``."""
    date_obs = NIGHT_START + dt.timedelta(seconds=float(frame_times_s(cfg)[k]))
    path = folder / "lights" / light_names(cfg)[k]
    write_raw(path, render_light(k, cfg, scene, sensor), cfg, cfg.exptime_s, date_obs)


_forked_night: tuple = ()  # (folder, cfg, scene, sensor) inside a light-writing worker only


def _inherit_night(folder, cfg, scene, sensor) -> None:
    global _forked_night
    _forked_night = (folder, cfg, scene, sensor)


def _write_forked_light(k: int) -> None:
    write_light(k, *_forked_night)


def write_lights(folder: Path, cfg: DemoConfig, scene: dict, sensor: Sensor, workers: int = 1) -> None:
    """Render and write every light of the night into ``folder/lights``, in ``workers``
    processes (forked, so the scene's full-frame arrays are shared, not copied). Every light
    has its own noise stream, so the files are the same for any number of workers."""
    (folder / "lights").mkdir()
    if workers <= 1 or cfg.n_lights <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for k in range(cfg.n_lights):
            write_light(k, folder, cfg, scene, sensor)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, cfg.n_lights),
        mp_context=multiprocessing.get_context("fork"),
        initializer=_inherit_night,
        initargs=(folder, cfg, scene, sensor),
    ) as pool:
        list(pool.map(_write_forked_light, range(cfg.n_lights)))


def shared_star_field(cfg: DemoConfig, cameras, rotations):
    """The star field of the night ``cfg.sky`` describes (drawn exactly as that night draws
    it), for a night of another camera under the same sky: directions (N, 3), fluxes (N,, e),
    colours (N, 3). NightstackError if this night's field reaches beyond that star field."""
    sky_cfg = DemoConfig(**cfg.sky)
    sky_cameras, sky_rotations = frame_cameras(sky_cfg), frame_rotations(sky_cfg)
    span = SIDEREAL_RATE_RAD_S * abs(frame_times_s(sky_cfg)[-1])
    sky_radius = max(field_radius_rad(sky_cameras, span), np.radians(sky_cfg.sky_radius_deg))
    axis = np.array([0.0, 0.0, 1.0])
    apart = np.arccos(np.clip((rotations[0].T @ axis) @ (sky_rotations[0].T @ axis), -1, 1))
    own = field_radius_rad(cameras, SIDEREAL_RATE_RAD_S * abs(frame_times_s(cfg)[-1]))
    if own + apart > sky_radius:
        raise NightstackError(
            f"demo: this camera sees {np.degrees(own + apart):.1f} deg from the sky night's axis "
            f"but its star field reaches {np.degrees(sky_radius):.1f} deg; raise sky_radius_deg"
        )
    rng = np.random.default_rng(sky_cfg.seed)
    return draw_star_field(rng, sky_cfg, sky_cameras, sky_rotations)


def build_scene(cfg: DemoConfig) -> dict:
    """Everything fixed over the night: geometry, stars, sky, optics, satellite, sensor."""
    rng = np.random.default_rng(cfg.seed)
    cameras, rotations = frame_cameras(cfg), frame_rotations(cfg)
    if cfg.sky is None:
        directions, flux_e, rgb = draw_star_field(rng, cfg, cameras, rotations)
    else:
        directions, flux_e, rgb = shared_star_field(cfg, cameras, rotations)
    if cfg.mono:  # every pixel sees the green band's response: one plane, no mosaic
        channel_map = np.ones((cfg.height_px, cfg.width_px), dtype=np.int8)
    else:
        channel_map = cfa_channel_map(cfg.cfa_pattern, cfg.height_px, cfg.width_px)
    dust = draw_dust(rng, cfg.height_px, cfg.width_px)
    transmission = vignetting_map(cfg.height_px, cfg.width_px, cfg.vignetting) * dust_map(
        dust, cfg.height_px, cfg.width_px
    )
    return {
        "cameras": cameras,
        "rotations": rotations,
        "directions": directions,
        "flux_e": flux_e,
        "rgb": rgb,
        "channel_map": channel_map,
        "sky_e": sky_e(channel_map, cfg),
        "dust": dust,
        "transmission": transmission,
        "satellite": draw_satellite(rng, cfg.height_px, cfg.width_px),
        "sensor": draw_sensor(rng, cfg),
        "landscape": draw_landscape(cfg, channel_map) if cfg.landscape else None,
    }


def night_truth(cfg: DemoConfig, scene: dict, sensor: Sensor) -> dict:
    """The truth dict written to truth.json (see generate_night)."""
    cameras, rotations = scene["cameras"], scene["rotations"]
    ref = cameras[0]
    xy_ref, front = project(ref, rotations[0], scene["directions"])
    in_frame0 = front & inside_frame(xy_ref, ref)
    pole_xy, _ = project(ref, rotations[0], np.array([[0.0, 0.0, 1.0]]))
    frames = [
        frame_truth(k, name, t, ref, cameras[k], rotations[k] @ rotations[0].T)
        for k, (name, t) in enumerate(zip(light_names(cfg), frame_times_s(cfg)))
    ]
    satellite = None
    if cfg.satellite_frame >= 0:
        satellite = dict(
            scene["satellite"],
            frame=cfg.satellite_frame,
            endpoints_px=trail_endpoints(scene["satellite"], cfg.height_px, cfg.width_px),
        )
    order = np.argsort(scene["flux_e"])[::-1]
    stars = [
        {
            "x": xy_ref[i, 0],
            "y": xy_ref[i, 1],
            "flux_e": scene["flux_e"][i],
            "rgb": scene["rgb"][i],
            "in_frame0": bool(in_frame0[i]),
        }
        for i in order  # a JSON record per star; no arithmetic here
    ]
    truth = {
        "generator": "nightstack.demo",
        "config": asdict(cfg),
        "camera": {
            "width_px": ref.width_px,
            "height_px": ref.height_px,
            "focal_px": ref.focal_px,
            "k1": ref.k1,
            "k2": ref.k2,
        },
        "reference_frame": 0,
        "sky_to_reference": rotations[0],  # equatorial -> camera directions of light 0
        "frames": frames,
        "pole_ref_px": pole_xy[0],
        "stars": stars,
        "hot_pixels": [
            {"x": int(c), "y": int(r), "dark_adu_s": float(a)}
            for r, c, a in zip(sensor.hot_rows, sensor.hot_cols, sensor.hot_dark_adu_s)
        ],
        "satellite_frame": cfg.satellite_frame,
        "satellite": satellite,
        "dust": scene["dust"],
        "exptime_s": cfg.exptime_s,
        "cadence_s": cfg.cadence_s,
        "cfa_pattern": cfg.cfa_pattern,
        "black_level": cfg.bias_adu,
        "white_level": cfg.white_level,
        "gain_e_per_adu": cfg.gain_e_per_adu,
        "n_biases": cfg.n_biases,
        "n_darks": cfg.n_darks,
        "n_flats": cfg.n_flats,
    }
    if scene["landscape"] is not None:
        truth["landscape"] = landscape_truth(scene["landscape"])
    return truth


def landscape_truth(land: dict) -> dict:
    """The truth.json entry of a landscape night (see generate_night)."""
    return {
        "sky_mask": SKY_MASK_FILE,
        "mask_rule": "pixel centre test: ground if the centre is on/below the horizon or "
        "within width_px/2 of a segment; 255 = sky",
        "ground_fraction": float(1.0 - land["sky_mask"].mean()),
        "horizon_px": land["horizon_px"],
        "segments_px": [
            dict(zip(("x0", "y0", "x1", "y1", "width_px"), map(float, seg)))
            for seg in land["segments_px"]  # a JSON record per segment
        ],
    }


def _prepare_destination(folder: Path) -> None:
    """Refuse to overwrite anything but an earlier demo night (one with a truth.json)."""
    if folder.exists() and any(folder.iterdir()) and not (folder / "truth.json").is_file():
        raise NightstackError(
            f"{folder}: exists and is not a demo night (no truth.json); not overwriting it"
        )


def _apply_umask(built: Path) -> None:
    """Give the built folder and truth.json ordinary permissions (mkdtemp/mkstemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(built, 0o777 & ~umask)
    os.chmod(built / "truth.json", 0o666 & ~umask)


def _move_into_place(built: Path, folder: Path) -> None:
    """Rename ``built`` onto ``folder``, swapping out any earlier demo night."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(built, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate_night(folder, cfg: DemoConfig | None = None, workers: int = 1) -> dict:
    """Write the demo night into ``folder`` (lights/, biases/, darks/, flats/, truth.json),
    rendering the lights in ``workers`` processes (the files do not depend on it).

    The folder is built beside its destination and renamed into place at the end, so it
    never appears half-written. Returns the truth dict (also in truth.json):

    - ``camera``: width_px, height_px, focal_px, k1, k2 of the reference (frame 0);
    - ``frames``: per light, ``file``, ``time_s``, ``date_obs``, ``H`` (3x3, reference pixel ->
      frame pixel, undistorted), ``rotation`` (3x3, reference -> frame camera directions),
      ``rotvec`` (rad), ``focal_px``;
    - ``stars``: records x, y (observed px in frame 0, may lie outside it), flux_e (total
      electrons per exposure in a green pixel, before vignetting), rgb (channel multipliers),
      in_frame0; brightest first;
    - ``hot_pixels``: x, y, dark_adu_s; ``satellite_frame`` and ``satellite`` (line, endpoints);
      ``dust``; ``pole_ref_px``; exposure, cadence, CFA pattern, black/white level, gain, config;
    - ``landscape`` (landscape nights only): ``sky_mask`` (file name at the night's root,
      8-bit PNG, 255 = sky, pixel-centre test; read with read_sky_mask), ``ground_fraction``,
      ``mask_rule``, ``horizon_px`` (per column, y of the horizon), ``segments_px`` (trees,
      pole: x0, y0, x1, y1, width_px).
    - ``sky_to_reference``: 3x3, equatorial -> camera directions of light 0 (nights sharing a
      sky, ``DemoConfig.sky``, relate through it: night B's light 0 sees ``S_B S_A^T`` of A's).
    """
    cfg = cfg if cfg is not None else DemoConfig()
    check_config(cfg)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _prepare_destination(folder)
    built = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        scene = build_scene(cfg)
        sensor = scene["sensor"]
        write_lights(built, cfg, scene, sensor, workers)
        write_calibration(built, cfg, sensor, scene["transmission"], scene["channel_map"])
        if scene["landscape"] is not None:
            write_sky_mask(built / SKY_MASK_FILE, scene["landscape"]["sky_mask"])
        write_json(built / "truth.json", night_truth(cfg, scene, sensor))
        truth = read_json(built / "truth.json")  # plain lists, exactly what the file holds
        _apply_umask(built)
        _move_into_place(built, folder)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return truth
