"""Pose of each frame against the reference, then one global bundle adjustment.

A frame's pose is the rotation (and zoom) of the camera model in nightstack.camera that maps
reference pixels onto the frame's pixels. ``estimate_pose`` finds it from two star lists:
coarse triangle matching, a closed-form rotation from matched rays (Wahba's problem), then
weighted least squares over all matched stars. ``bundle_adjust`` refines every pose, the
shared focal length and (when the lens needs it) radial distortion over all star tracks of
the night at once, with a sparse Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from .camera import Camera, homography, map_frame_to_ref, map_ref_to_frame
from .errors import NightstackError
from .matching import MatchConfig, match_coarse, mutual_nearest


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of pose estimation and bundle adjustment; defaults need no tuning."""

    min_pairs: int = 6  # fewer matched stars than this: the frame is rejected
    max_rms_px: float = 1.5  # a larger residual RMS rejects the frame
    final_radius_px: float = 2.0  # correspondences are re-found within this distance
    per_frame_focal: bool = True  # each frame may have its own focal length (zoom lenses)
    distortion: str = "auto"  # "auto" | "on" | "off": radial k1, k2 in the bundle adjustment
    focal_prior_sigma: float = 0.3  # prior on log(focal) around the header/default guess
    max_tracks: int = 4000
    # the bundle adjustment's time follows its observations: 500 x 24 MP frames gave 964k, still
    # in the first of its two solves after 10 min (3.4 GB); 200k, an equal share per frame,
    # solve in 4 min with poses 0.006 px (median) from the truth
    max_observations: int = 200_000
    position_floor_px: float = 0.02  # centroid uncertainty floor (demosaicing, PSF shape)
    min_snr: float = 15.0  # fainter stars add centroid noise, not information


@dataclass
class StarList:
    """Star positions (N, 2) brightest first, with fluxes and centroid uncertainties."""

    xy: np.ndarray
    flux: np.ndarray
    sigma_px: np.ndarray

    @classmethod
    def from_table(cls, table, floor_px: float = 0.02, min_snr: float = 0.0) -> "StarList":
        if len(table) and min_snr > 0:
            table = table[np.asarray(table["snr"], float) >= min_snr]
        if len(table) == 0:
            return cls(np.zeros((0, 2)), np.zeros(0), np.zeros(0))
        xy = np.stack([np.asarray(table["x"], float), np.asarray(table["y"], float)], axis=1)
        flux = np.asarray(table["flux"], float)
        fwhm = np.asarray(table["fwhm_px"], float)
        snr = np.maximum(np.asarray(table["snr"], float), 1.0)
        sigma = np.hypot(floor_px, 0.6 * fwhm / snr)
        order = np.argsort(-flux, kind="stable")
        return cls(xy[order], flux[order], sigma[order])


@dataclass
class Pose:
    """Result of registering one frame on the reference."""

    status: str  # "accepted" | "rejected"
    reason: str = ""
    rotvec: np.ndarray = field(default_factory=lambda: np.zeros(3))
    zoom: float = 1.0
    n_pairs: int = 0
    rms_px: float = float("nan")
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=int))
    flux_scale: float = 1.0  # frame flux / reference flux of matched stars

    def rotation(self) -> np.ndarray:
        return Rotation.from_rotvec(self.rotvec).as_matrix()


POSE_RMS_SLACK = 4.0  # pose RMS may exceed max_rms_px by this factor before the global solve


def rejected(reason: str) -> Pose:
    return Pose(status="rejected", reason=reason)


def wahba_rotation(ref_rays: np.ndarray, frame_rays: np.ndarray, weights=None) -> np.ndarray:
    """Rotation R minimising sum w |frame_ray - R ref_ray|^2 (unit rays, (N, 3))."""
    w = np.ones(len(ref_rays)) if weights is None else weights
    b = (frame_rays * w[:, None]).T @ ref_rays
    u, _, vt = np.linalg.svd(b)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def pixel_rays(xy: np.ndarray, camera: Camera) -> np.ndarray:
    """Observed pixels (N, 2) -> unit direction vectors (N, 3) in that camera's frame."""
    p = camera.undistort(xy) - camera.centre
    rays = np.column_stack([p / camera.focal_px, np.ones(len(p))])
    return rays / np.linalg.norm(rays, axis=1, keepdims=True)


def _fit_pose(ref_xy, frame_xy, sigma, ref_camera, rotvec0, zoom0, fit_zoom, frame_camera=None):
    """Weighted least squares of rotation (+ zoom) on pixel residuals; returns (rotvec, zoom).

    The frame's camera is ``frame_camera`` (default: the reference camera) with its focal
    length times zoom."""
    base = frame_camera or ref_camera

    def residuals(p):
        zoom = np.exp(p[3]) if fit_zoom else zoom0
        cam = base.with_focal(base.focal_px * zoom)
        pred = map_ref_to_frame(ref_xy, ref_camera, cam, Rotation.from_rotvec(p[:3]).as_matrix())
        return ((pred - frame_xy) / sigma[:, None]).ravel()

    x0 = np.concatenate([rotvec0, [np.log(zoom0)]]) if fit_zoom else np.asarray(rotvec0, float)
    sol = least_squares(residuals, x0, loss="soft_l1", f_scale=3.0, x_scale="jac")
    zoom = float(np.exp(sol.x[3])) if fit_zoom else zoom0
    return sol.x[:3], zoom


BUNDLE_TOLERANCE = 1e-7  # least_squares ftol and xtol of the night's bundle adjustment
LINK_CHUNK_POINTS = 8192  # points whose neighbour pairs are held at once (radius_components)

# A match that moves no corner of the frame by this much (px) may be a pattern fixed on the
# sensor (hot pixels, JPEG-baked defects); when another, moving, match exists, that is the sky.
STATIC_PAIR_PX = 0.5
STATIC_ROUNDS = 3


def estimate_pose(
    frame: StarList,
    ref: StarList,
    ref_camera: Camera,
    cfg: RegistrationConfig = RegistrationConfig(),
    match_cfg: MatchConfig = MatchConfig(),
    frame_camera: Camera | None = None,
) -> Pose:
    """Register a frame's stars on the reference stars.

    The frame is seen by ``frame_camera`` (size, focal length, distortion; default: the
    reference camera) whose focal length is refined as ``zoom`` (Pose.zoom multiplies
    frame_camera.focal_px).

    A fixed tripod's frames without dark frames share their hot pixels, which look like stars
    that never move. When the best match is such a static set, the stars it leaves out are
    matched again; a moving match among them is the sky, and it wins (a tracked mount's stars
    also stay put, but then nothing moving is left to match and the static match stands).
    """
    base = frame_camera or ref_camera
    pose = _match_and_fit(frame, ref, ref_camera, cfg, match_cfg, base)
    rest_f, rest_r = np.arange(len(frame.xy)), np.arange(len(ref.xy))
    found = pose
    for _ in range(STATIC_ROUNDS):  # the hot pixels may take more than one round to use up
        if found.status != "accepted" or not is_static(found, ref_camera, base):
            break
        rest_f = np.delete(rest_f, found.pairs[:, 0])
        rest_r = np.delete(rest_r, found.pairs[:, 1])
        found = _match_and_fit(subset(frame, rest_f), subset(ref, rest_r), ref_camera, cfg,
                               match_cfg, base)
        moving = found.status == "accepted" and not is_static(found, ref_camera, base)
        if moving and found.n_pairs >= 2 * cfg.min_pairs:  # twice the minimum: not by chance
            found.pairs = np.column_stack([rest_f[found.pairs[:, 0]], rest_r[found.pairs[:, 1]]])
            return found
    return pose


def subset(stars: StarList, index: np.ndarray) -> StarList:
    """The stars at ``index`` (brightness order kept)."""
    return StarList(stars.xy[index], stars.flux[index], stars.sigma_px[index])


def is_static(pose: Pose, ref_camera: Camera, frame_camera: Camera | None = None) -> bool:
    """Whether a pose is the identity: no corner of the frame moves by STATIC_PAIR_PX or more."""
    base = frame_camera or ref_camera
    w, h = ref_camera.width_px - 1, ref_camera.height_px - 1
    corners = np.array([[0.0, 0.0], [w, 0.0], [0.0, h], [w, h]])
    cam = base.with_focal(base.focal_px * pose.zoom)
    moved = map_ref_to_frame(corners, ref_camera, cam, pose.rotation())
    return float(np.max(np.linalg.norm(moved - corners, axis=1))) < STATIC_PAIR_PX


def _match_and_fit(frame: StarList, ref: StarList, ref_camera: Camera, cfg: RegistrationConfig,
                   match_cfg: MatchConfig, base: Camera) -> Pose:
    """Triangle match, closed-form rotation, then iterated weighted least squares; the frame's
    camera is ``base`` with its focal length times the fitted zoom."""
    if len(frame.xy) < 3:
        return rejected(f"only {len(frame.xy)} stars detected")
    coarse = match_coarse(frame.xy, ref.xy, match_cfg)
    if coarse is None:
        return rejected("no star pattern in common with the reference")
    # correspondences under the coarse similarity, then a closed-form rotation from rays
    moved = coarse.transform.apply(frame.xy)
    i_f, i_r = mutual_nearest(moved, ref.xy, match_cfg.score_radius_px * 1.5)
    if len(i_f) < cfg.min_pairs:
        return rejected(f"only {len(i_f)} stars match the reference (need {cfg.min_pairs})")
    zoom = ref_camera.focal_px / (coarse.transform.scale * base.focal_px)
    frame_cam = base.with_focal(base.focal_px * zoom)
    rot = wahba_rotation(pixel_rays(ref.xy[i_r], ref_camera), pixel_rays(frame.xy[i_f], frame_cam))
    rotvec = Rotation.from_matrix(rot).as_rotvec()
    radius = match_cfg.score_radius_px
    for _ in range(4):
        sigma = np.hypot(frame.sigma_px[i_f], ref.sigma_px[i_r])
        rotvec, zoom = _fit_pose(
            ref.xy[i_r], frame.xy[i_f], sigma, ref_camera, rotvec, zoom, cfg.per_frame_focal, base
        )
        frame_cam = base.with_focal(base.focal_px * zoom)
        pred = map_ref_to_frame(ref.xy, ref_camera, frame_cam, Rotation.from_rotvec(rotvec).as_matrix())
        resid = np.linalg.norm(pred[i_r] - frame.xy[i_f], axis=1)
        robust = 1.4826 * np.median(resid) if len(resid) else radius
        radius = float(np.clip(4.0 * robust, cfg.final_radius_px, radius))
        i_r, i_f = mutual_nearest(pred, frame.xy, radius)
        if len(i_f) < cfg.min_pairs:
            return rejected(f"only {len(i_f)} stars match the reference (need {cfg.min_pairs})")
    sigma = np.hypot(frame.sigma_px[i_f], ref.sigma_px[i_r])
    rotvec, zoom = _fit_pose(ref.xy[i_r], frame.xy[i_f], sigma, ref_camera, rotvec, zoom,
                             cfg.per_frame_focal, base)
    frame_cam = base.with_focal(base.focal_px * zoom)
    pred = map_ref_to_frame(ref.xy[i_r], ref_camera, frame_cam, Rotation.from_rotvec(rotvec).as_matrix())
    resid = np.linalg.norm(pred - frame.xy[i_f], axis=1)
    rms = float(np.sqrt(np.mean(resid**2)))
    ratio = frame.flux[i_f] / np.maximum(ref.flux[i_r], 1e-12)
    pose = Pose(
        status="accepted",
        rotvec=rotvec,
        zoom=zoom,
        n_pairs=int(len(i_f)),
        rms_px=rms,
        pairs=np.column_stack([i_f, i_r]),
        flux_scale=float(np.median(ratio[np.isfinite(ratio) & (ratio > 0)])) if len(ratio) else 1.0,
    )
    # the focal length is only a guess until the bundle adjustment; judge loosely here
    if rms > POSE_RMS_SLACK * cfg.max_rms_px:
        pose.status, pose.reason = "rejected", f"residual RMS {rms:.2f} px exceeds {cfg.max_rms_px} px"
    return pose


# ---------------------------------------------------------------------------------------
# global bundle adjustment


@dataclass
class Tracks:
    """Observations of star tracks: which frame (index, -1 = reference), which track, where."""

    frame: np.ndarray  # (M,) int
    track: np.ndarray  # (M,) int
    xy: np.ndarray  # (M, 2) observed pixel
    sigma_px: np.ndarray  # (M,)
    n_tracks: int


def radius_components(xy: np.ndarray, radius_px: float,
                      chunk_points: int = LINK_CHUNK_POINTS) -> tuple[int, np.ndarray]:
    """Groups of points (N, 2) chained by distances of at most ``radius_px``: (number of
    groups, group label (N,) of each point), labels numbered by each group's first point,
    as scipy's connected_components numbers them.

    The same groups as connected_components of cKDTree.query_pairs, but the pairs are found
    ``chunk_points`` points at a time and merged into the labels, so memory stays bounded:
    a star seen by m frames is m points within the radius and m^2 / 2 pairs, and the 2
    million stars the reference missed on 500 x 24 MP frames gave a 1.2 GB pair list.
    """
    n = len(xy)
    if n == 0:
        return 0, np.zeros(0, dtype=np.int64)
    tree = cKDTree(xy)
    label = np.arange(n)
    for start in range(0, n, chunk_points):
        chunk = cKDTree(xy[start:start + chunk_points])
        pairs = chunk.sparse_distance_matrix(tree, radius_px, output_type="ndarray")
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8),
                            (label[pairs["i"] + start], label[pairs["j"]])), shape=(n, n))
        del pairs
        label = connected_components(graph, directed=False)[1][label]
    groups, first, inverse = np.unique(label, return_index=True, return_inverse=True)
    rank = np.empty(len(groups), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(groups))
    return len(groups), rank[inverse]


def build_tracks(ref: StarList, frames: list[StarList], poses: list[Pose], ref_camera: Camera,
                 cfg: RegistrationConfig) -> Tracks:
    """Tracks from each accepted frame's pairs with the reference, plus stars that the
    reference missed but two or more frames share (partial overlaps)."""
    obs_f, obs_t, obs_xy, obs_s = [], [], [], []
    used_ref = np.zeros(len(ref.xy), dtype=bool)
    extra_xy, extra_frame, extra_obs, extra_sigma = [], [], [], []
    for k, (stars, pose) in enumerate(zip(frames, poses)):
        if pose.status != "accepted" or len(pose.pairs) == 0:
            continue
        i_f, i_r = pose.pairs[:, 0], pose.pairs[:, 1]
        used_ref[i_r] = True
        obs_f.append(np.full(len(i_f), k))
        obs_t.append(i_r)
        obs_xy.append(stars.xy[i_f])
        obs_s.append(stars.sigma_px[i_f])
        unmatched = np.setdiff1d(np.arange(len(stars.xy)), i_f)
        cam = ref_camera.with_focal(ref_camera.focal_px * pose.zoom)
        extra_xy.append(map_frame_to_ref(stars.xy[unmatched], ref_camera, cam, pose.rotation()))
        extra_frame.append(np.full(len(unmatched), k))
        extra_obs.append(stars.xy[unmatched])
        extra_sigma.append(stars.sigma_px[unmatched])
    ref_ids = np.nonzero(used_ref)[0]
    n_tracks = len(ref.xy)
    obs_f.append(np.full(len(ref_ids), -1))
    obs_t.append(ref_ids)
    obs_xy.append(ref.xy[ref_ids])
    obs_s.append(ref.sigma_px[ref_ids])
    if extra_xy:
        exy = np.concatenate(extra_xy)
        efr = np.concatenate(extra_frame)
        eobs, esig = np.concatenate(extra_obs), np.concatenate(extra_sigma)
        # drop stars that land on a reference star: those are already tracked or were outliers
        if len(ref.xy) and len(exy):
            d, _ = cKDTree(ref.xy).query(exy, distance_upper_bound=3.0)
            far = ~np.isfinite(d)
            exy, efr, eobs, esig = exy[far], efr[far], eobs[far], esig[far]
        if len(exy) > 1:
            n_comp, label = radius_components(exy, cfg.final_radius_px / 2)
            size = np.bincount(label, minlength=n_comp)
            # one observation per frame and track, at least two frames
            key = label.astype(np.int64) * (len(frames) + 1) + efr
            _, inverse = np.unique(key, return_inverse=True)
            clean_comp = np.ones(n_comp, dtype=bool)
            clean_comp[label[np.bincount(inverse)[inverse] > 1]] = False
            good = (size[label] >= 2) & clean_comp[label]
            if np.any(good):
                _, new_ids = np.unique(label[good], return_inverse=True)
                obs_f.append(efr[good])
                obs_t.append(n_tracks + new_ids)
                obs_xy.append(eobs[good])
                obs_s.append(esig[good])
                n_tracks += int(new_ids.max()) + 1
    frame = np.concatenate(obs_f).astype(int)
    track = np.concatenate(obs_t).astype(int)
    # renumber tracks densely, keep those seen at least twice
    counts = np.bincount(track, minlength=n_tracks)
    keep = counts[track] >= 2
    frame, track = frame[keep], track[keep]
    xy, sigma = np.concatenate(obs_xy)[keep], np.concatenate(obs_s)[keep]
    uniq, track = np.unique(track, return_inverse=True)
    if len(uniq) > cfg.max_tracks:
        # keep the tracks with the most observations (cheap, and they constrain most)
        best = np.argsort(-np.bincount(track))[: cfg.max_tracks]
        sel = np.isin(track, best)
        frame, xy, sigma = frame[sel], xy[sel], sigma[sel]
        _, track = np.unique(track[sel], return_inverse=True)
    keep = observations_within_budget(frame, track, cfg.max_observations)
    if not np.all(keep):
        frame, xy, sigma = frame[keep], xy[keep], sigma[keep]
        _, track = np.unique(track[keep], return_inverse=True)
    return Tracks(frame, track, xy, sigma, int(track.max()) + 1 if len(track) else 0)


def observations_within_budget(frame: np.ndarray, track: np.ndarray, max_observations: int) -> np.ndarray:
    """Boolean mask (M,) of the observations a bundle adjustment keeps within a budget.

    ``frame`` (M,) is each observation's frame index (-1 for the reference) and ``track`` (M,)
    its dense track id. Every frame keeps at most ``max_observations`` // (number of frames)
    observations, those of the tracks seen by the most frames first (they tie the frames
    together); the reference keeps all of its own. Tracks left with fewer than two
    observations are dropped. All True when the observations already fit the budget.
    """
    frame, track = np.asarray(frame), np.asarray(track)
    n_frames = len(np.unique(frame[frame >= 0]))
    if len(frame) <= max_observations or n_frames == 0:
        return np.ones(len(frame), dtype=bool)
    per_frame = max(max_observations // n_frames, 1)
    n_tracks = int(track.max()) + 1
    seen_by = np.bincount(track, minlength=n_tracks)[track]
    order = np.lexsort((track, -seen_by, frame))  # by frame, then most-seen track first
    frame_sorted = frame[order]
    rank = np.arange(len(order)) - np.searchsorted(frame_sorted, frame_sorted, side="left")
    keep = np.zeros(len(frame), dtype=bool)
    keep[order[(rank < per_frame) | (frame_sorted == -1)]] = True
    enough = np.bincount(track[keep], minlength=n_tracks)[track] >= 2
    return keep & enough


@dataclass
class Solution:
    """Global solution of a night."""

    ref_camera: Camera
    poses: list[Pose]
    frame_rms_px: np.ndarray
    distortion_used: bool
    rms_centre_px: float
    rms_outer_px: float
    n_tracks: int
    n_observations: int
    cost: float = float("nan")  # robust (soft-L1) chi-square of the fit, priors included
    dof: int = 0  # residuals (2 per observation) minus free parameters


def _project(uv, f, k1, k2, centre, rot, zoom):
    """Undistorted reference-plane pixels (M, 2) -> observed pixels of cameras (M,) rot/zoom."""
    rays = np.column_stack([(uv - centre) / f, np.ones(len(uv))])
    cam = np.einsum("mij,mj->mi", rot, rays)
    fk = f * zoom
    p = cam[:, :2] / cam[:, 2:3] * fk[:, None]
    r2 = np.sum(p * p, axis=1, keepdims=True) / fk[:, None] ** 2
    return centre + p * (1.0 + k1 * r2 + k2 * r2 * r2)


def jacobian_sparsity(obs_slot: np.ndarray, track: np.ndarray, n_glob: int, n_pose: int,
                      off_track: int, n_par: int) -> csr_matrix:
    """Which parameters each residual of the bundle adjustment depends on (CSR, int8 ones).

    Rows: x and y of every observation, then one prior row per global parameter. An
    observation depends on the n_glob global parameters (log focal, k1, k2), on its frame's
    n_pose parameters (none for the reference, ``obs_slot`` -1) and on its track's two
    plane coordinates. Columns: globals, then poses by slot, then tracks from ``off_track``.
    Built from index arrays: a lil_matrix filled by fancy indexing held Python lists for
    every row (400k rows for 200k observations).
    """
    n_obs = len(obs_slot)
    has_pose = obs_slot >= 0
    obs_cols = [np.broadcast_to(np.arange(n_glob), (n_obs, n_glob)),
                off_track + 2 * track[:, None] + np.arange(2)]
    obs_rows = [np.repeat(np.arange(n_obs), n_glob), np.repeat(np.arange(n_obs), 2)]
    obs_rows.append(np.repeat(np.nonzero(has_pose)[0], n_pose))
    obs_cols.append(n_glob + n_pose * obs_slot[has_pose][:, None] + np.arange(n_pose))
    obs = np.concatenate(obs_rows)
    cols = np.concatenate([c.ravel() for c in obs_cols])
    rows = np.concatenate([2 * obs, 2 * obs + 1, 2 * n_obs + np.arange(n_glob)])
    cols = np.concatenate([cols, cols, np.arange(n_glob)])
    shape = (2 * n_obs + n_glob, n_par)
    sparsity = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=shape).tocsr()
    sparsity.sort_indices()
    return sparsity


def bundle_adjust(tracks: Tracks, poses: list[Pose], ref_camera: Camera, focal_guess_px: float,
                  cfg: RegistrationConfig, distortion: bool) -> Solution:
    """Refine all accepted poses, the focal length and optionally k1, k2 over all tracks."""
    n_frames = len(poses)
    active = [k for k, p in enumerate(poses) if p.status == "accepted"]
    slot = {k: i for i, k in enumerate(active)}
    n_pose = 4 if cfg.per_frame_focal else 3
    n_glob = 3 if distortion else 1
    n_act = len(active)
    obs_ok = (tracks.frame == -1) | np.isin(tracks.frame, active)
    fr, tr = tracks.frame[obs_ok], tracks.track[obs_ok]
    xy, sig = tracks.xy[obs_ok], tracks.sigma_px[obs_ok]
    centre = ref_camera.centre

    # initial track positions: mean of the observations mapped into the undistorted reference plane
    uv0 = np.zeros((tracks.n_tracks, 2))
    cnt = np.zeros(tracks.n_tracks)
    for k in [-1] + active:
        sel = fr == k
        if not np.any(sel):
            continue
        if k == -1:
            pts = ref_camera.undistort(xy[sel])
        else:
            cam = ref_camera.with_focal(ref_camera.focal_px * poses[k].zoom)
            pts = ref_camera.undistort(map_frame_to_ref(xy[sel], ref_camera, cam, poses[k].rotation()))
        np.add.at(uv0, tr[sel], pts)
        np.add.at(cnt, tr[sel], 1)
    uv0 /= np.maximum(cnt, 1)[:, None]

    x0 = [np.log(ref_camera.focal_px)]
    if distortion:
        x0 += [ref_camera.k1, ref_camera.k2]
    for k in active:
        x0 += list(poses[k].rotvec)
        if cfg.per_frame_focal:
            x0.append(np.log(poses[k].zoom))
    x0 = np.concatenate([np.asarray(x0, float), uv0.ravel()])
    off_pose = n_glob
    off_track = n_glob + n_pose * n_act
    obs_slot = np.array([slot.get(k, -1) for k in fr])

    def unpack(x):
        f = np.exp(x[0])
        k1, k2 = (x[1], x[2]) if distortion else (0.0, 0.0)
        pose = x[off_pose:off_track].reshape(n_act, n_pose) if n_act else np.zeros((0, n_pose))
        rot = np.concatenate([np.eye(3)[None], Rotation.from_rotvec(pose[:, :3]).as_matrix().reshape(-1, 3, 3)])
        zoom = np.concatenate([[1.0], np.exp(pose[:, 3]) if cfg.per_frame_focal else np.ones(n_act)])
        uv = x[off_track:].reshape(-1, 2)
        return f, k1, k2, rot, zoom, uv

    log_f0 = np.log(focal_guess_px)

    def residuals(x):
        f, k1, k2, rot, zoom, uv = unpack(x)
        idx = obs_slot + 1  # 0 = reference
        pred = _project(uv[tr], f, k1, k2, centre, rot[idx], zoom[idx])
        r = ((pred - xy) / sig[:, None]).ravel()
        prior = [(x[0] - log_f0) / cfg.focal_prior_sigma]
        if distortion:
            prior += [x[1] / 1.0, x[2] / 1.0]  # weak: keeps k1, k2 finite when unconstrained
        return np.concatenate([r, prior])

    n_obs = len(fr)
    n_par = len(x0)
    sparsity = jacobian_sparsity(obs_slot, tr, n_glob, n_pose, off_track, n_par)
    # ftol/xtol 1e-7 instead of scipy's 1e-8: on 16 x 24 MP (4000 tracks) the last decade
    # took 70 % of the Jacobians (21 s -> 7 s) and moved the homographies by 3e-5 px
    sol = least_squares(
        residuals, x0, jac_sparsity=sparsity, loss="soft_l1", f_scale=3.0,
        x_scale="jac", method="trf", max_nfev=200, ftol=BUNDLE_TOLERANCE, xtol=BUNDLE_TOLERANCE,
    )
    f, k1, k2, rot, zoom, uv = unpack(sol.x)
    camera = Camera(ref_camera.width_px, ref_camera.height_px, float(f), float(k1), float(k2))
    new_poses = []
    for k, p in enumerate(poses):
        if p.status != "accepted":
            new_poses.append(p)
            continue
        i = slot[k] + 1
        new_poses.append(Pose(status="accepted", rotvec=Rotation.from_matrix(rot[i]).as_rotvec(),
                              zoom=float(zoom[i]), n_pairs=p.n_pairs, rms_px=p.rms_px,
                              pairs=p.pairs, flux_scale=p.flux_scale))
    idx = obs_slot + 1
    pred = _project(uv[tr], f, k1, k2, centre, rot[idx], zoom[idx])
    err = np.linalg.norm(pred - xy, axis=1)
    frame_rms = np.full(n_frames, np.nan)
    for k in active:
        sel = fr == k
        e = err[sel]
        # robust: outliers that the soft-L1 loss ignored are not counted as residual
        e = e[e < max(5 * 1.4826 * np.median(e), 1.0)] if len(e) else e
        frame_rms[k] = float(np.sqrt(np.mean(e**2))) if len(e) else np.nan
    r = np.linalg.norm(xy - centre, axis=1) / np.linalg.norm(centre)
    inlier = err < max(5 * 1.4826 * np.median(err), 1.0)
    # outer third: beyond 2/3 of the half-diagonal (31 % of a 3:2 frame's area); centre: within 1/3
    outer, inner = inlier & (r > 2 / 3), inlier & (r < 1 / 3)
    rms_outer = float(np.sqrt(np.mean(err[outer] ** 2))) if outer.sum() >= 10 else float("nan")
    rms_centre = float(np.sqrt(np.mean(err[inner] ** 2))) if inner.sum() >= 10 else float("nan")
    return Solution(camera, new_poses, frame_rms, distortion, rms_centre, rms_outer,
                    tracks.n_tracks, n_obs, cost=2.0 * float(sol.cost), dof=max(2 * n_obs - n_par, 1))


def solve_night(ref: StarList, frames: list[StarList], poses: list[Pose], ref_camera: Camera,
                cfg: RegistrationConfig = RegistrationConfig()) -> Solution:
    """Global alignment of a night; switches on radial distortion when the corners need it."""
    if not any(p.status == "accepted" for p in poses):
        raise NightstackError("no frame could be registered on the reference")
    focal_guess = ref_camera.focal_px
    sol = _solve_once(ref, frames, poses, ref_camera, focal_guess, cfg)
    cam = sol.ref_camera
    if abs(cam.focal_px / ref_camera.focal_px - 1) > 0.002 or cam.has_distortion:
        # the camera moved away from its guess: match again with it, so stars near the corners
        # (where a wrong focal length or distortion misplaces them) join, then solve again
        again = [
            estimate_pose(f, ref, cam, cfg) if p.status == "accepted" or _retryable(p) else p
            for f, p in zip(frames, poses)
        ]
        if any(p.status == "accepted" for p in again):
            second = _solve_once(ref, frames, again, cam, focal_guess, cfg)
            if _n_accepted(second) >= _n_accepted(sol):
                sol = second
    return sol


def _retryable(pose: Pose) -> bool:
    return pose.status == "rejected" and pose.reason.startswith("residual RMS")


def _n_accepted(sol: Solution) -> int:
    return sum(p.status == "accepted" for p in sol.poses)


def _solve_once(ref, frames, poses, camera, focal_guess, cfg) -> Solution:
    tracks = build_tracks(ref, frames, poses, camera, cfg)
    want = cfg.distortion
    sol = bundle_adjust(tracks, poses, camera, focal_guess, cfg, distortion=(want == "on"))
    if want == "auto":
        with_dist = bundle_adjust(tracks, sol.poses, sol.ref_camera, focal_guess, cfg, distortion=True)
        if distortion_pays(sol, with_dist):
            sol = with_dist
    return sol


# k1, k2 must lower the chi-square by this many times the noise of one degree of freedom
# each (an F statistic): 10 is far beyond chance (p ~ 1e-4), so noise never switches them on
DISTORTION_MIN_F = 10.0


def distortion_pays(plain: Solution, with_dist: Solution) -> bool:
    """Whether the solution with k1, k2 fits the same tracks clearly better than without.

    The two extra parameters must lower the chi-square far beyond what noise would (F test),
    and the frames' median residual must drop. The corners' RMS alone misleads both ways: a
    small turn between frames hides a real distortion in a wrong focal length (corners fit
    about as well as the centre), and a zoomed night's corners can look 1.2x worse by chance
    with nothing for k1, k2 to fix (measured: F = 1.6 there, F = 190 on a 5-minute 14 mm night).
    """
    if not np.nanmedian(with_dist.frame_rms_px) < np.nanmedian(plain.frame_rms_px):
        return False
    return distortion_f_statistic(plain, with_dist) > DISTORTION_MIN_F


def distortion_f_statistic(plain: Solution, with_dist: Solution) -> float:
    """F statistic of the chi-square drop from adding k1, k2 (2 parameters); 0 when undefined."""
    if not (np.isfinite(plain.cost) and np.isfinite(with_dist.cost) and with_dist.cost > 0):
        return 0.0
    return float((plain.cost - with_dist.cost) / 2.0 / (with_dist.cost / with_dist.dof))


def frame_homography(sol: Solution, pose: Pose) -> np.ndarray:
    """H of a frame (reference pixel -> frame pixel) in the nightstack convention."""
    cam = sol.ref_camera.with_focal(sol.ref_camera.focal_px * pose.zoom)
    return homography(sol.ref_camera, cam, pose.rotation())
