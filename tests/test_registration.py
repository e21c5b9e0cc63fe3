"""Matching, pose and bundle adjustment against synthetic star fields with known truth."""

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from nightstack.camera import Camera, apply_homography, homography, map_ref_to_frame
from nightstack.matching import match_coarse, mutual_nearest, triangles
from nightstack.registration import (
    RegistrationConfig,
    StarList,
    build_tracks,
    estimate_pose,
    jacobian_sparsity,
    observations_within_budget,
    radius_components,
    solve_night,
)


def sky(n, rng, camera, margin=1.6):
    """Random star directions covering the camera's field and a margin around it."""
    w, h = camera.width_px * margin, camera.height_px * margin
    xy = np.column_stack([rng.uniform(-w / 2, w / 2, n), rng.uniform(-h / 2, h / 2, n)])
    rays = np.column_stack([xy / camera.focal_px, np.ones(n)])
    flux = 10 ** rng.uniform(2, 5, n)
    return rays / np.linalg.norm(rays, axis=1, keepdims=True), flux


def observe(rays, flux, camera, rotation, rng, noise_px=0.05, drop=0.1):
    """Pixels of the stars a camera sees, shuffled, with a fraction lost."""
    cam = rays @ rotation.T
    front = cam[:, 2] > 0
    p = cam[:, :2] / cam[:, 2:3] * camera.focal_px + camera.centre
    p = camera.distort(p)
    inside = front & (p[:, 0] > 2) & (p[:, 1] > 2) & (p[:, 0] < camera.width_px - 3) & (p[:, 1] < camera.height_px - 3)
    keep = inside & (rng.uniform(size=len(p)) > drop)
    idx = np.nonzero(keep)[0]
    xy = p[idx] + rng.normal(0, noise_px, (len(idx), 2))
    order = np.argsort(-flux[idx])
    return StarList(xy[order], flux[idx][order] * rng.uniform(0.95, 1.05, len(idx)), np.full(len(idx), max(noise_px, 0.02)))


def grid_error(h_est, h_true, camera, step=50):
    xs, ys = np.meshgrid(np.arange(0, camera.width_px, step), np.arange(0, camera.height_px, step))
    pts = np.column_stack([xs.ravel(), ys.ravel()])
    d = apply_homography(h_est, pts) - apply_homography(h_true, pts)
    return float(np.sqrt(np.mean(np.sum(d**2, axis=1))))


def test_triangle_descriptors_are_rotation_and_scale_invariant():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, (40, 2))
    rot = np.array([[np.cos(2.1), -np.sin(2.1)], [np.sin(2.1), np.cos(2.1)]])
    moved = 1.07 * xy @ rot.T + [30, -12]
    t1, d1 = triangles(xy, 6)
    t2, d2 = triangles(moved, 6)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_allclose(d1, d2, atol=1e-9)


@pytest.mark.parametrize("angle_deg", [0.3, 45.0, 121.5, 180.0, -90.0])
def test_coarse_match_any_rotation(angle_deg):
    rng = np.random.default_rng(2)
    ref = rng.uniform(0, 1000, (300, 2))
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    frame = (ref - 500) @ rot.T + 500 + [17.0, -8.0] + rng.normal(0, 0.1, ref.shape)
    perm = np.sort(rng.permutation(len(ref))[:250])  # brightness order is kept
    m = match_coarse(frame[perm], ref)
    assert m is not None
    back = m.transform.apply(frame[perm])
    assert np.median(np.linalg.norm(back - ref[perm], axis=1)) < 0.5
    assert np.isclose(m.transform.scale, 1.0, atol=0.01)


def test_coarse_match_rejects_unrelated_field():
    rng = np.random.default_rng(3)
    m = match_coarse(rng.uniform(0, 800, (120, 2)), rng.uniform(0, 800, (120, 2)))
    assert m is None or m.n_matched < 8


def test_mutual_nearest_pairs():
    a = np.array([[0, 0], [10, 0], [20, 0.0]])
    b = np.array([[0.5, 0], [20.2, 0], [50, 50.0]])
    ia, ib = mutual_nearest(a, b, 2.0)
    assert sorted(zip(ia.tolist(), ib.tolist())) == [(0, 0), (2, 1)]


@pytest.mark.parametrize(
    "rotvec, n_stars",
    [([0.002, -0.003, 0.01], 2000), ([0.0, 0.0, np.pi], 600), ([0.01, 0.0, np.deg2rad(121.5)], 400), ([0.0005, 0.001, 0.02], 15)],
)
def test_pose_recovers_rotation(rotvec, n_stars):
    rng = np.random.default_rng(4)
    cam = Camera(1200, 800, focal_px=3000.0)
    rays, flux = sky(n_stars if n_stars > 20 else 40, rng, cam, margin=1.0 if n_stars <= 20 else 1.6)
    rot = Rotation.from_rotvec(rotvec).as_matrix()
    ref = observe(rays, flux, cam, np.eye(3), rng, drop=0.0 if n_stars <= 20 else 0.1)
    frame = observe(rays, flux, cam, rot, rng, drop=0.0 if n_stars <= 20 else 0.1)
    pose = estimate_pose(frame, ref, cam, RegistrationConfig(min_pairs=5))
    assert pose.status == "accepted", pose.reason
    h_true = homography(cam, cam, rot)
    cam_k = cam.with_focal(cam.focal_px * pose.zoom)
    err = grid_error(homography(cam, cam_k, pose.rotation()), h_true, cam)
    assert err < 0.1
    assert pose.rms_px < 0.15


def test_pose_rejects_field_without_common_stars():
    rng = np.random.default_rng(5)
    cam = Camera(800, 600, focal_px=2000.0)
    a = StarList(rng.uniform(0, 800, (100, 2)), np.sort(rng.uniform(1, 100, 100))[::-1], np.full(100, 0.05))
    b = StarList(rng.uniform(0, 800, (100, 2)), np.sort(rng.uniform(1, 100, 100))[::-1], np.full(100, 0.05))
    pose = estimate_pose(a, b, cam)
    assert pose.status == "rejected" and pose.reason


def test_bundle_adjustment_recovers_focal_and_distortion():
    rng = np.random.default_rng(6)
    true_cam = Camera(1500, 1000, focal_px=1400.0, k1=-0.08, k2=0.01)
    rays, flux = sky(3000, rng, true_cam, margin=2.0)
    pole = np.array([0.0, -0.8, 0.6])
    pole /= np.linalg.norm(pole)
    rots = [Rotation.from_rotvec(pole * 7.29e-5 * 120 * k).as_matrix() for k in range(8)]
    obs = [observe(rays, flux, true_cam, r, rng, noise_px=0.05) for r in rots]
    guess = Camera(1500, 1000, focal_px=1800.0)
    cfg = RegistrationConfig()
    poses = [estimate_pose(o, obs[0], guess, cfg) for o in obs[1:]]
    assert all(p.status == "accepted" for p in poses)
    sol = solve_night(obs[0], obs[1:], poses, guess, cfg)
    assert sol.distortion_used
    assert abs(sol.ref_camera.focal_px - 1400) / 1400 < 0.05
    for pose, rot, rms in zip(sol.poses, rots[1:], sol.frame_rms_px):
        pts = np.column_stack([rng.uniform(0, 1500, 400), rng.uniform(0, 1000, 400)])
        cam_k = sol.ref_camera.with_focal(sol.ref_camera.focal_px * pose.zoom)
        est = map_ref_to_frame(pts, sol.ref_camera, cam_k, pose.rotation())
        true = map_ref_to_frame(pts, true_cam, true_cam, rot)
        assert np.sqrt(np.mean(np.sum((est - true) ** 2, axis=1))) < 0.1
        assert rms < 0.12
    assert sol.rms_outer_px <= 1.2 * sol.rms_centre_px + 0.02


def test_observation_budget_keeps_an_equal_share_of_the_most_seen_tracks():
    rng = np.random.default_rng(11)
    n_frames, n_tracks = 6, 50
    seen = rng.uniform(size=(n_frames, n_tracks)) < np.linspace(0.2, 1.0, n_tracks)  # later tracks seen more
    frame_ids, track_ids = np.nonzero(seen)
    frame = np.concatenate([np.full(n_tracks, -1), frame_ids])  # the reference sees every track
    track = np.concatenate([np.arange(n_tracks), track_ids])
    order = rng.permutation(len(frame))
    frame, track = frame[order], track[order]
    assert observations_within_budget(frame, track, len(frame)).all()
    keep = observations_within_budget(frame, track, 60)
    per_frame = np.bincount(frame[keep & (frame >= 0)], minlength=n_frames)
    assert per_frame.max() <= 60 // n_frames and per_frame.min() > 0
    seen_by = np.bincount(track)
    for k in range(n_frames):
        mine = frame == k
        # a frame's kept tracks are its most-seen ones: none it dropped is seen by more frames
        kept, dropped = seen_by[track[mine & keep]], seen_by[track[mine & ~keep]]
        assert len(dropped) > 0 and kept.min() >= dropped.max()
    # every kept track has two observations, and the reference keeps its own of those tracks
    assert (np.bincount(track[keep], minlength=n_tracks)[np.unique(track[keep])] >= 2).all()
    ref_kept = set(track[keep & (frame == -1)])
    assert ref_kept == set(track[keep & (frame >= 0)])


def test_jacobian_sparsity_marks_each_residuals_parameters():
    rng = np.random.default_rng(2)
    n_obs, n_act, n_tracks = 40, 3, 9
    obs_slot = rng.integers(-1, n_act, n_obs)  # -1: the reference, which has no pose
    track = rng.integers(0, n_tracks, n_obs)
    for n_glob, n_pose in ((1, 4), (3, 4), (3, 3)):
        off_track = n_glob + n_pose * n_act
        n_par = off_track + 2 * n_tracks
        expected = np.zeros((2 * n_obs + n_glob, n_par), dtype=np.int8)
        for i in range(n_obs):
            deps = list(range(n_glob)) + [off_track + 2 * track[i], off_track + 2 * track[i] + 1]
            if obs_slot[i] >= 0:
                deps += [n_glob + n_pose * obs_slot[i] + c for c in range(n_pose)]
            expected[2 * i, deps] = expected[2 * i + 1, deps] = 1
        for j in range(n_glob):
            expected[2 * n_obs + j, j] = 1  # the priors
        got = jacobian_sparsity(obs_slot, track, n_glob, n_pose, off_track, n_par)
        assert got.dtype == np.int8 and got.has_sorted_indices
        np.testing.assert_array_equal(got.toarray(), expected)


@pytest.mark.parametrize("chunk_points", [1, 7, 64, 100_000])
def test_radius_components_are_the_groups_of_all_pairs(chunk_points):
    # stars seen by several frames: tight clumps, some chained, some alone, some doubles
    rng = np.random.default_rng(4)
    centres = rng.uniform(0, 300, (60, 2))
    xy = np.concatenate([c + rng.normal(0, 0.3, (int(rng.integers(1, 12)), 2)) for c in centres])
    xy = xy[rng.permutation(len(xy))]
    pairs = cKDTree(xy).query_pairs(r=1.0, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(xy),) * 2)
    expected_n, expected = connected_components(graph, directed=False)
    n, label = radius_components(xy, 1.0, chunk_points=chunk_points)
    assert n == expected_n and 1 < n < len(xy)
    np.testing.assert_array_equal(label, expected)  # the same numbering, too
    assert radius_components(np.zeros((0, 2)), 1.0)[0] == 0


def test_bundle_adjustment_within_an_observation_budget():
    rng = np.random.default_rng(6)
    true_cam = Camera(1500, 1000, focal_px=1400.0)
    rays, flux = sky(3000, rng, true_cam, margin=2.0)
    rots = [Rotation.from_rotvec([0.0, 0.0, 0.004 * k]).as_matrix() for k in range(8)]
    obs = [observe(rays, flux, true_cam, r, rng, noise_px=0.05) for r in rots]
    cfg = RegistrationConfig(distortion="off")
    poses = [estimate_pose(o, obs[0], true_cam, cfg) for o in obs[1:]]
    full = build_tracks(obs[0], obs[1:], poses, true_cam, cfg)
    budget = len(full.frame) // 4
    capped = RegistrationConfig(distortion="off", max_observations=budget)
    tracks = build_tracks(obs[0], obs[1:], poses, true_cam, capped)
    n_ref = int(np.sum(tracks.frame == -1))
    assert len(tracks.frame) - n_ref <= budget < len(full.frame)
    sol = solve_night(obs[0], obs[1:], poses, true_cam, capped)
    for pose, rot in zip(sol.poses, rots[1:]):
        h = homography(sol.ref_camera, sol.ref_camera.with_focal(sol.ref_camera.focal_px * pose.zoom), pose.rotation())
        assert grid_error(h, homography(true_cam, true_cam, rot), true_cam) < 0.1


def test_zoomed_frames_register_through_per_frame_focal():
    rng = np.random.default_rng(7)
    cam = Camera(1200, 800, focal_px=2500.0)
    rays, flux = sky(1500, rng, cam)
    ref = observe(rays, flux, cam, np.eye(3), rng)
    for zoom in (0.95, 1.05):
        rot = Rotation.from_rotvec([0.001, 0.002, 0.01]).as_matrix()
        frame = observe(rays, flux, cam.with_focal(2500 * zoom), rot, rng)
        pose = estimate_pose(frame, ref, cam)
        assert pose.status == "accepted"
        assert abs(pose.zoom - zoom) < 1e-3
        h = homography(cam, cam.with_focal(2500 * pose.zoom), pose.rotation())
        assert grid_error(h, homography(cam, cam.with_focal(2500 * zoom), rot), cam) < 0.1


def test_small_turn_still_switches_distortion_on():
    """Five minutes of a 14 mm-like lens: the corners' RMS barely shows the distortion (a wrong
    focal length absorbs most of it), but the chi-square test does, and the mapping is right."""
    rng = np.random.default_rng(8)
    true_cam = Camera(1200, 800, focal_px=720.0, k1=-0.1, k2=0.01)
    rays, flux = sky(1500, rng, true_cam, margin=1.4)
    pole = np.array([0.0, -0.8, 0.6])
    pole /= np.linalg.norm(pole)
    rots = [Rotation.from_rotvec(pole * 7.29e-5 * 60 * k).as_matrix() for k in range(6)]
    obs = [observe(rays, flux, true_cam, r, rng, noise_px=0.1) for r in rots]
    guess = Camera(1200, 800, focal_px=1440.0)
    poses = [estimate_pose(o, obs[0], guess) for o in obs[1:]]
    sol = solve_night(obs[0], obs[1:], poses, guess)
    assert sol.distortion_used
    pts = np.column_stack([rng.uniform(0, 1200, 400), rng.uniform(0, 800, 400)])
    for pose, rot in zip(sol.poses, rots[1:]):
        cam_k = sol.ref_camera.with_focal(sol.ref_camera.focal_px * pose.zoom)
        est = map_ref_to_frame(pts, sol.ref_camera, cam_k, pose.rotation())
        true = map_ref_to_frame(pts, true_cam, true_cam, rot)
        assert np.sqrt(np.mean(np.sum((est - true) ** 2, axis=1))) < 0.1


def test_hot_pixels_do_not_pin_the_registration():
    """An undarked tripod night: bright hot pixels sit still while the sky turns. The static match
    they make gives way to the stars' moving one."""
    rng = np.random.default_rng(9)
    cam = Camera(1200, 800, focal_px=1500.0)
    rays, flux = sky(80, rng, cam)  # about 40 stars in the frame, fewer than the hot pixels
    rot = Rotation.from_rotvec([0.0005, -0.002, 0.004]).as_matrix()
    ref, frame = observe(rays, flux, cam, np.eye(3), rng), observe(rays, flux, cam, rot, rng)
    n_hot = 80
    hot_xy = np.column_stack([rng.uniform(5, 1195, n_hot), rng.uniform(5, 795, n_hot)])
    hot_flux = 10 * flux.max() * rng.uniform(1, 2, n_hot)  # brighter than any star: they lead the triangles

    def with_hot(stars):
        jitter = rng.normal(0, 0.02, hot_xy.shape)
        return StarList(np.vstack([hot_xy + jitter, stars.xy]), np.concatenate([hot_flux, stars.flux]),
                        np.concatenate([np.full(n_hot, 0.05), stars.sigma_px]))

    pose = estimate_pose(with_hot(frame), with_hot(ref), cam)
    assert pose.status == "accepted", pose.reason
    err = grid_error(homography(cam, cam.with_focal(cam.focal_px * pose.zoom), pose.rotation()),
                     homography(cam, cam, rot), cam)
    assert err < 0.1, err

