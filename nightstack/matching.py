"""Triangle "constellation" matching of two star lists (seed 000).

Each star is joined with its nearest neighbours into triangles; a triangle is described by
two side-length ratios, which do not change under rotation, shift or zoom. Triangles are
matched through a kD-tree over those descriptors; every matched pair of triangles proposes a
similarity transform, and the proposal that brings the most stars onto stars wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class MatchConfig:
    """Settings of the coarse matcher; the defaults need no tuning."""

    n_brightest: int = 60  # stars per frame that form triangles
    n_neighbours: int = 8  # each star's triangles use its nearest neighbours
    descriptor_tolerance: float = 0.01  # max distance between triangle descriptors
    n_candidates: int = 800  # triangle pairs that get scored
    n_score_stars: int = 300  # stars used to score a candidate transform
    score_radius_px: float = 4.0  # a star counts as matched within this distance
    min_scale: float = 0.5  # accepted zoom between frames
    max_scale: float = 2.0


@dataclass
class Similarity:
    """x' = s R(theta) x + t, mapping (N, 2) points of one frame to another."""

    scale: float
    angle_rad: float
    shift: np.ndarray

    def matrix(self) -> np.ndarray:
        c, s = np.cos(self.angle_rad) * self.scale, np.sin(self.angle_rad) * self.scale
        return np.array([[c, -s, self.shift[0]], [s, c, self.shift[1]], [0.0, 0.0, 1.0]])

    def apply(self, xy: np.ndarray) -> np.ndarray:
        m = self.matrix()
        return np.asarray(xy, dtype=float) @ m[:2, :2].T + m[:2, 2]


@dataclass
class CoarseMatch:
    transform: Similarity  # maps frame positions to reference positions
    n_matched: int  # stars of the frame brought within score_radius_px of a reference star
    n_triangle_pairs: int


def triangles(xy: np.ndarray, n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with pairs of its nearest neighbours.

    Returns vertex indices (M, 3), ordered so vertex i is opposite the i-th shortest side,
    and descriptors (M, 2) = (shortest / longest, middle / longest side).
    """
    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), dtype=int), np.zeros((0, 2))
    k = min(n_neighbours, n - 1)
    _, nbr = cKDTree(xy).query(xy, k=k + 1)
    a, b = np.triu_indices(k, 1)
    tri = np.stack(
        [np.repeat(np.arange(n), len(a)), nbr[:, 1:][:, a].ravel(), nbr[:, 1:][:, b].ravel()],
        axis=1,
    )
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = xy[tri]  # (M, 3, 2)
    # side i is opposite vertex i
    sides = np.stack(
        [
            np.linalg.norm(p[:, 1] - p[:, 2], axis=1),
            np.linalg.norm(p[:, 0] - p[:, 2], axis=1),
            np.linalg.norm(p[:, 0] - p[:, 1], axis=1),
        ],
        axis=1,
    )
    order = np.argsort(sides, axis=1)
    sides = np.take_along_axis(sides, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    keep = sides[:, 0] > 1e-6
    desc = sides[keep, :2] / sides[keep, 2:3]
    return tri[keep], desc


def similarity_from_triplets(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarities for batches of point sets.

    src, dst: (M, K, 2). Returns (M, 4) rows (a, b, tx, ty) with dst = [[a, -b], [b, a]] src + t.
    """
    cs, cd = src.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
    ps, pd = src - cs, dst - cd
    norm = np.sum(ps**2, axis=(1, 2))
    norm = np.where(norm > 0, norm, np.nan)
    a = np.sum(ps[..., 0] * pd[..., 0] + ps[..., 1] * pd[..., 1], axis=1) / norm
    b = np.sum(ps[..., 0] * pd[..., 1] - ps[..., 1] * pd[..., 0], axis=1) / norm
    tx = cd[:, 0, 0] - (a * cs[:, 0, 0] - b * cs[:, 0, 1])
    ty = cd[:, 0, 1] - (b * cs[:, 0, 0] + a * cs[:, 0, 1])
    return np.stack([a, b, tx, ty], axis=1)


def _apply_batch(params: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply (M, 4) similarities to (N, 2) points -> (M, N, 2)."""
    a, b, tx, ty = (params[:, i, None] for i in range(4))
    x, y = xy[None, :, 0], xy[None, :, 1]
    return np.stack([a * x - b * y + tx, b * x + a * y + ty], axis=-1)


def match_coarse(frame_xy: np.ndarray, ref_xy: np.ndarray, cfg: MatchConfig = MatchConfig()):
    """Find the similarity that maps frame stars onto reference stars.

    Both star lists are (N, 2) pixel positions sorted brightest first. Returns a CoarseMatch,
    or None when no transform brings at least 4 stars together.
    """
    frame_xy = np.asarray(frame_xy, dtype=float)
    ref_xy = np.asarray(ref_xy, dtype=float)
    if len(frame_xy) < 3 or len(ref_xy) < 3:
        return None
    f_tri, f_desc = triangles(frame_xy[: cfg.n_brightest], cfg.n_neighbours)
    r_tri, r_desc = triangles(ref_xy[: cfg.n_brightest], cfg.n_neighbours)
    if len(f_tri) == 0 or len(r_tri) == 0:
        return None
    dist, idx = cKDTree(r_desc).query(f_desc, k=3, distance_upper_bound=cfg.descriptor_tolerance)
    fi, kk = np.nonzero(np.isfinite(dist))
    if len(fi) == 0:
        return None
    ri, d = idx[fi, kk], dist[fi, kk]
    best = np.argsort(d)[: cfg.n_candidates]
    fi, ri = fi[best], ri[best]
    params = similarity_from_triplets(frame_xy[f_tri[fi]], ref_xy[r_tri[ri]])
    scale = np.hypot(params[:, 0], params[:, 1])
    ok = np.isfinite(scale) & (scale >= cfg.min_scale) & (scale <= cfg.max_scale)
    # the three vertices must agree with their own transform
    src, dst = frame_xy[f_tri[fi]], ref_xy[r_tri[ri]]
    a, b, tx, ty = (params[:, i, None] for i in range(4))
    pred = np.stack(
        [a * src[..., 0] - b * src[..., 1] + tx, b * src[..., 0] + a * src[..., 1] + ty], axis=-1
    )
    ok &= np.max(np.linalg.norm(pred - dst, axis=-1), axis=1) < cfg.score_radius_px
    params = params[ok]
    if len(params) == 0:
        return None
    params = _unique_transforms(params)
    counts, mean_d = _score(params, frame_xy[: cfg.n_score_stars], ref_xy, cfg.score_radius_px)
    order = np.lexsort((mean_d, -counts))
    top = order[0]
    if counts[top] < _significant_count(frame_xy[: cfg.n_score_stars], ref_xy, cfg.score_radius_px):
        return None
    a, b, tx, ty = params[top]
    sim = Similarity(float(np.hypot(a, b)), float(np.arctan2(b, a)), np.array([tx, ty]))
    return CoarseMatch(sim, int(counts[top]), int(len(fi)))


def _significant_count(frame_xy, ref_xy, radius_px) -> int:
    """Matched-star count that chance alone (random, unrelated fields) would hardly reach."""
    span = np.ptp(ref_xy, axis=0)
    area = max(float(span[0] * span[1]), 1.0)
    expected = len(frame_xy) * len(ref_xy) * np.pi * radius_px**2 / area
    return int(max(4, np.ceil(expected + 5 * np.sqrt(expected) + 3)))


def _unique_transforms(params: np.ndarray) -> np.ndarray:
    """Drop near-identical proposals so scoring time goes to distinct ones."""
    key = np.round(params / np.array([1e-3, 1e-3, 0.5, 0.5])).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return params[np.sort(first)]


def _score(params, frame_xy, ref_xy, radius_px):
    """Count, for each proposal, the frame stars landing within radius of a reference star."""
    tree = cKDTree(ref_xy)
    counts = np.zeros(len(params), dtype=int)
    mean_d = np.full(len(params), np.inf)
    chunk = max(1, 200_000 // max(1, len(frame_xy)))
    for start in range(0, len(params), chunk):
        moved = _apply_batch(params[start : start + chunk], frame_xy)
        d, _ = tree.query(moved.reshape(-1, 2), distance_upper_bound=radius_px)
        d = d.reshape(moved.shape[:2])
        hit = np.isfinite(d)
        counts[start : start + chunk] = hit.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_d[start : start + chunk] = np.where(hit, d, 0).sum(axis=1) / hit.sum(axis=1)
    return counts, mean_d


def mutual_nearest(a_xy: np.ndarray, b_xy: np.ndarray, radius_px: float):
    """Index pairs (ia, ib) of points that are each other's nearest neighbour within radius."""
    if len(a_xy) == 0 or len(b_xy) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    d_ab, i_ab = cKDTree(b_xy).query(a_xy, distance_upper_bound=radius_px)
    _, i_ba = cKDTree(a_xy).query(b_xy, distance_upper_bound=radius_px)
    ia = np.nonzero(np.isfinite(d_ab))[0]
    ib = i_ab[ia]
    mutual = i_ba[ib] == ia
    return ia[mutual], ib[mutual]
