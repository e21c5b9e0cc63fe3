"""Nights combined into one image: every night's stack registered on a reference night's stack.

Each night is stacked on its own (its own masters, its own solution.json, its own camera);
this module then treats each night's linear stack (``stack.fits``: gradient removed, before
any stretch) as one exposure of its night's reference camera and

1. registers it on the reference night's stack with the workflow's own tools: stars from
   :func:`nightstack.stars.detect_stars`, the triangle matcher and the rotation + focal camera
   model (:func:`nightstack.registration.estimate_pose` with the night's own camera: size,
   focal length and distortion from its solution.json; its focal length is refined, since
   a night's focal length is only as good as its rotation about the pole lets it be);
2. warps it onto the reference night's pixel grid with the stacker's Lanczos-3 warp
   (:func:`nightstack.stacking.warp_tile`);
3. brings it to the reference night's flux scale: background-subtracted aperture sums of the
   matched stars on the common grid, median ratio (this absorbs exposure, gain, aperture and
   pixel scale at once);
4. measures its noise in empty-sky apertures on that grid (``APERTURE_PX`` square boxes away
   from stars, robust sigma), so the interpolation's correlated noise is counted;
5. combines: weight = 1 / noise^2.

Colour and mono: the luminance L (mean of R, G, B; a mono night's plane) of the result is the
noise-weighted mean of every night's L; the colour (each channel minus L) is the
noise-weighted mean of the colour nights' only. The result is R, G, B = L + colour when any
night is colour (grey where only mono nights cover), else one plane. With colour nights only
this is exactly the weighted mean of each channel.

The reference night (``combine: reference: auto``) is the night whose stack shows the most
stars (the deepest, widest view; ties go to the first night listed), or the night named.
A night whose stack cannot be registered (no stars in common, too few matches, a residual over
``registration.max_rms_px``) is left out with its reason; the others still combine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from .camera import Camera
from .errors import NightstackError
from .noise import large_scale_background, robust_sigma, sky_mask
from .registration import Pose, RegistrationConfig, StarList, estimate_pose
from .stacking import FrameWarp, warp_tile
from .stars import StarConfig, detect_stars, luminance

APERTURE_PX = 4  # side of the square empty-sky apertures the noise is measured in
BACKGROUND_BLOCK_PX = 32  # blocks of the large-scale background under the noise and photometry
PHOTOMETRY_RADIUS_FWHM = 2.5  # aperture radius of the flux-scale photometry, in star FWHMs
MIN_SKY_APERTURES = 20


@dataclass
class NightStack:
    """One night's linear stack on its reference frame's grid, and that frame's camera."""

    name: str
    image: np.ndarray  # (C, H, W) float32, C = 3 (R, G, B) or 1 (mono); NaN = not covered
    camera: Camera

    @property
    def is_colour(self) -> bool:
        return self.image.shape[0] == 3


@dataclass
class NightResult:
    """How one night joins the combined image (see combine_nights)."""

    name: str
    status: str  # "reference" | "accepted" | "rejected"
    reason: str = ""
    pose: Pose | None = None
    camera: Camera | None = None  # the night's camera as registered (focal refined)
    flux_scale: float = float("nan")  # night values / reference values on the common grid
    noise_adu: float = float("nan")  # empty-sky aperture noise, reference flux units
    weight: float = 0.0  # share of the combined luminance (weights sum to 1)
    n_stars: int = 0
    warped: np.ndarray | None = field(default=None, repr=False)  # (C, H, W), reference units


def as_planes(image) -> np.ndarray:
    """A stack as float32 (C, H, W): (H, W) becomes (1, H, W)."""
    image = np.asarray(image, dtype=np.float32)
    return image[None] if image.ndim == 2 else image


def stack_catalog(image, star_cfg: StarConfig | None = None):
    """Star table (brightest first, see detect_stars) of a stack's luminance."""
    return detect_stars(luminance(as_planes(image)), star_cfg or StarConfig())


def register_stack(night: NightStack, ref: NightStack, stars: StarList, ref_stars: StarList,
                   cfg: RegistrationConfig) -> Pose:
    """Pose of a night's stack on the reference night's: rotation (reference camera directions
    -> night camera directions) and zoom of the night's focal length. Rejected with a reason
    when the stars do not match or the residual exceeds cfg.max_rms_px."""
    fit_cfg = RegistrationConfig(**{**cfg.__dict__, "per_frame_focal": True})
    pose = estimate_pose(stars, ref_stars, ref.camera, fit_cfg, frame_camera=night.camera)
    if pose.status == "accepted" and pose.rms_px > cfg.max_rms_px:
        pose.status = "rejected"
        pose.reason = f"residual RMS {pose.rms_px:.2f} px exceeds {cfg.max_rms_px} px"
    return pose


def registered_camera(night: NightStack, pose: Pose) -> Camera:
    """The night's camera with the focal length the registration found."""
    return night.camera.with_focal(night.camera.focal_px * pose.zoom)


def warp_to_reference(night: NightStack, ref_camera: Camera, pose: Pose) -> np.ndarray:
    """The night's stack resampled (Lanczos-3) on the reference grid: (C, H_ref, W_ref) float32,
    NaN where the night does not cover a reference pixel."""
    n_channels = night.image.shape[0]
    warp = FrameWarp(path=night.name, ref_camera=ref_camera,
                     frame_camera=registered_camera(night, pose), rotation=pose.rotation(),
                     offset=np.zeros(n_channels), scale=np.ones(n_channels),
                     target_level=np.zeros(n_channels))
    return warp_tile(night.image, warp, 0, ref_camera.height_px, 0, ref_camera.width_px,
                     "lanczos3")


def sky_residual(image2d) -> tuple[np.ndarray, np.ndarray]:
    """(image minus its large-scale background (H, W), sky mask (H, W)) of one plane; NaN
    pixels are not sky. Same unit as the image."""
    finite = np.isfinite(image2d)
    filled = np.where(finite, image2d, np.nanmedian(image2d)).astype(np.float32)
    sky = sky_mask(filled[None], finite, BACKGROUND_BLOCK_PX)
    resid = filled - large_scale_background(filled, sky, BACKGROUND_BLOCK_PX)
    return np.where(finite, resid, np.nan), sky


def aperture_noise(resid2d, sky, aperture_px: int = APERTURE_PX) -> float:
    """Robust sigma of the mean over empty-sky square apertures (ADU per pixel, NaN if too few).

    ``resid2d``: background-subtracted plane (H, W); ``sky``: (H, W) bool. Apertures are the
    non-overlapping aperture_px boxes lying wholly on sky, so correlated (resampled) noise
    counts as it does for any object larger than a pixel.
    """
    h, w = (s - s % aperture_px for s in resid2d.shape)

    def boxes(a):
        return a[:h, :w].reshape(h // aperture_px, aperture_px, w // aperture_px, aperture_px)

    empty = boxes(sky).all(axis=(1, 3))
    means = boxes(np.nan_to_num(resid2d)).mean(axis=(1, 3))[empty]
    return robust_sigma(means) if means.size >= MIN_SKY_APERTURES else float("nan")


def aperture_sums(resid2d, xy, radius_px: float) -> np.ndarray:
    """Sums (N,) of a background-subtracted plane within radius_px of positions xy (N, 2);
    NaN where the aperture leaves the image or holds uncovered pixels."""
    r = int(np.ceil(radius_px))
    offsets = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    centre = np.round(xy).astype(int)
    rows = centre[:, 1, None, None] + dy
    cols = centre[:, 0, None, None] + dx
    near = np.hypot(dx[None] + centre[:, 0, None, None] - xy[:, 0, None, None],
                    dy[None] + centre[:, 1, None, None] - xy[:, 1, None, None]) <= radius_px
    h, w = resid2d.shape
    inside = (rows.min(axis=(1, 2)) >= 0) & (rows.max(axis=(1, 2)) < h) \
        & (cols.min(axis=(1, 2)) >= 0) & (cols.max(axis=(1, 2)) < w)
    values = resid2d[np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]
    sums = np.sum(np.where(near, values, 0.0), axis=(1, 2))
    return np.where(inside, sums, np.nan)


def flux_scale(night_resid, ref_resid, ref_xy, radius_px: float) -> float:
    """Median ratio night / reference of star aperture sums on the common grid (NaN if none).

    ``ref_xy``: (N, 2) reference-grid positions of stars both nights see."""
    night_flux = aperture_sums(night_resid, ref_xy, radius_px)
    ref_flux = aperture_sums(ref_resid, ref_xy, radius_px)
    ok = np.isfinite(night_flux) & np.isfinite(ref_flux) & (ref_flux > 0) & (night_flux > 0)
    return float(np.median(night_flux[ok] / ref_flux[ok])) if ok.sum() >= 3 else float("nan")


def combine_planes(planes: list, weights, colour: list) -> np.ndarray:
    """Noise-weighted combination of nights on one grid (see the module docstring).

    planes: per night (C, H, W) in reference flux units, background-free, NaN = not covered;
    weights: per night 1/noise^2; colour: per night True for R, G, B. Returns (3, H, W) when
    any night is colour, else (1, H, W); NaN where no night covers.
    """
    weights = np.asarray(weights, dtype=np.float64)
    lum = [luminance(p) for p in planes]
    l_sum = sum(w * np.nan_to_num(lm) for w, lm in zip(weights, lum))
    l_wt = sum(w * np.isfinite(lm) for w, lm in zip(weights, lum))
    with np.errstate(invalid="ignore", divide="ignore"):
        out_l = np.where(l_wt > 0, l_sum / l_wt, np.nan)
    picks = [i for i, c in enumerate(colour) if c]
    if not picks:
        return out_l[None].astype(np.float32)
    c_sum = sum(weights[i] * np.nan_to_num(planes[i] - lum[i]) for i in picks)
    c_wt = sum(weights[i] * np.isfinite(lum[i]) for i in picks)
    with np.errstate(invalid="ignore", divide="ignore"):
        chroma = np.where(c_wt > 0, c_sum / np.maximum(c_wt, 1e-300), 0.0)
    return (out_l[None] + chroma).astype(np.float32)


def choose_reference(nights: list, star_counts: dict, reference: str = "auto") -> str:
    """The reference night's name: the one named, or (auto) the most stars, first on a tie."""
    names = [n.name for n in nights]
    if reference != "auto":
        if reference not in names:
            raise NightstackError(f"combine: reference night '{reference}' is not one of {names}")
        return reference
    return max(names, key=lambda n: (star_counts[n], -names.index(n)))


def background_free(image) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) image minus each channel's large-scale background, and each channel's sky
    level (C,) (median of its sky pixels); NaN stays NaN."""
    planes, levels = [], []
    for channel in image:
        resid, sky = sky_residual(channel)
        planes.append(resid)
        levels.append(np.nanmedian(channel[sky]) if sky.any() else 0.0)
    return np.stack(planes).astype(np.float32), np.asarray(levels, dtype=np.float64)


def join_night(night: NightStack, ref: NightStack, stars: StarList, ref_stars: StarList,
               ref_lum, fwhm_px: float, reg_cfg: RegistrationConfig) -> NightResult:
    """Register, warp and flux-scale one night on the reference: a NightResult whose ``warped``
    is background-free in reference flux units (status "rejected" with a reason if it fails).
    ``ref_lum``: the reference's background-free luminance (H, W)."""
    res = NightResult(night.name, "accepted", n_stars=len(stars.xy))
    res.pose = register_stack(night, ref, stars, ref_stars, reg_cfg)
    if res.pose.status != "accepted":
        res.status, res.reason = "rejected", res.pose.reason
        return res
    res.camera = registered_camera(night, res.pose)
    planes, _ = background_free(warp_to_reference(night, ref.camera, res.pose))
    ref_xy = ref_stars.xy[res.pose.pairs[:, 1]]
    res.flux_scale = flux_scale(luminance(planes), ref_lum, ref_xy,
                                PHOTOMETRY_RADIUS_FWHM * fwhm_px)
    if not np.isfinite(res.flux_scale) or res.flux_scale <= 0:
        res.status, res.reason = "rejected", "no matched star to measure its flux scale on"
        return res
    res.warped = planes / np.float32(res.flux_scale)
    return res


def measure_noise(res: NightResult) -> None:
    """Set res.noise_adu from empty-sky apertures of its warped luminance; a night with too
    little empty sky is rejected."""
    resid, sky = sky_residual(luminance(res.warped))
    res.noise_adu = aperture_noise(resid, sky)
    if not np.isfinite(res.noise_adu) or res.noise_adu <= 0:
        res.status, res.reason = "rejected", "too little empty sky to measure its noise"


def combine_nights(nights: list, reference: str = "auto", star_cfg: StarConfig | None = None,
                   reg_cfg: RegistrationConfig | None = None):
    """Register every night's stack on the reference night's and combine them.

    Returns (image (C, H_ref, W_ref) float32 with the reference night's sky level, results:
    list of NightResult in the nights' order, reference name).
    """
    reg_cfg = reg_cfg or RegistrationConfig()
    tables = {n.name: stack_catalog(n.image, star_cfg) for n in nights}
    stars = {k: StarList.from_table(t, min_snr=reg_cfg.min_snr) for k, t in tables.items()}
    ref_name = choose_reference(nights, {k: len(v.xy) for k, v in stars.items()}, reference)
    ref = next(n for n in nights if n.name == ref_name)
    ref_planes, levels = background_free(ref.image)
    fwhm = tables[ref_name].meta["fwhm_px_median"] if len(tables[ref_name]) else 3.0
    results = []
    for night in nights:
        if night.name == ref_name:
            res = NightResult(ref_name, "reference", camera=ref.camera, flux_scale=1.0,
                              n_stars=len(stars[ref_name].xy), warped=ref_planes,
                              pose=Pose(status="accepted", n_pairs=len(stars[ref_name].xy),
                                        rms_px=0.0))
        else:
            res = join_night(night, ref, stars[night.name], stars[ref_name],
                             luminance(ref_planes), fwhm, reg_cfg)
        if res.status != "rejected":
            measure_noise(res)
        results.append(res)
    used = [r for r in results if r.status != "rejected"]
    if not used:
        raise NightstackError("combine: no night could be combined: " + "; ".join(
            f"{r.name}: {r.reason}" for r in results))
    weights = np.array([1.0 / r.noise_adu**2 for r in used])
    for r, w in zip(used, weights / weights.sum()):
        r.weight = float(w)
    image = combine_planes([r.warped for r in used], weights, [r.warped.shape[0] == 3 for r in used])
    if len(levels) != image.shape[0]:  # a mono reference under a colour result: grey sky
        levels = np.full(image.shape[0], levels.mean())
    return image + levels.reshape(-1, 1, 1).astype(np.float32), results, ref_name


def expected_noise(results: list) -> float:
    """Noise (ADU) of the inverse-variance weighted mean of the nights used, where all cover."""
    noise = np.array([r.noise_adu for r in results if r.status != "rejected"])
    return float(1.0 / np.sqrt(np.sum(1.0 / noise**2)))


def rotation_record(pose: Pose) -> dict:
    """Rotation of a pose as a 3x3 list and a rotation vector (rad) and angle (deg)."""
    rot = pose.rotation()
    return {"rotation": rot.tolist(), "rotvec": pose.rotvec.tolist(),
            "angle_deg": float(np.degrees(Rotation.from_matrix(rot).magnitude()))}
