"""Light-pollution (sky background) model and removal, after seed 000.

Light pollution is a smooth tint over the frame; stars are small bright dots. The model:

1. Cut the image into a grid of patches (about 1/8 of the shorter side each).
2. In every patch, flag "probably star" pixels: more than ``star_sigma`` standard deviations
   above the patch's background, re-estimated ``mask_iterations`` times from the pixels not yet
   flagged (sigma clipping). The background of a patch is its current weighted least-squares
   plane rather than a flat mean, so a steep gradient across a patch does not itself get
   flagged. The flags are dilated so star halos stay out of the fit.
3. Extended objects (nebulae, galaxies) are faint per pixel but coherent: a model whose patch
   planes are 3x3 median filtered over the patch grid (so a bump confined to about one patch is
   dropped) is subtracted, the residual is box-smoothed, and coherent excess above
   ``extended_sigma`` is added to the mask (a few rounds, each masking more of the object).
4. Per patch, fit a linear gradient ``a + b*x + c*y`` by weighted least squares with W = the
   sky mask, solving the 3x3 normal equations ``(X^T W X) beta = X^T W y`` for all patches at
   once (``np.linalg.solve`` on (ny, nx, 3, 3)). Patches with under ``min_background_fraction``
   sky pixels take the mean of their neighbours' planes, extended to their own centre.
5. Blend: the coefficient fields are bilinearly interpolated between patch centres (global pixel
   coordinates; separable interpolation matrices, Wy @ F @ Wx^T) and ``a + b*x + c*y`` is
   evaluated per pixel. Because each patch model is linear, this equals a partition-of-unity
   blend of the neighbouring planes, so the model is smooth.

Limitations: a nebula spanning more than about one patch (3+ patches across) biases the
median-filtered model too, is only partly masked and loses much of its faint light (measured on
synthetic data: a Gaussian nebula of sigma = patch/4 keeps ~95 % of its flux, sigma = patch/2
only ~40 %). Raise ``patch_px`` for such targets, or for frame-filling nebulae skip background
removal. A sky glow that curves faster than a patch can follow leaves a residual of about
curvature x patch^2 / 8.

Images are float arrays (H, W) or (C, H, W), in any linear unit (ADU); the model has the unit of
the image. NaN pixels are ignored by the fit and stay NaN in the corrected image.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from .errors import NightstackError
from .filters import binary_dilation

# Below this fraction of usable pixels a patch's own fit is not trusted.
MIN_BACKGROUND_FRACTION = 0.2
# Rounds of "fit a bump-free model, flag coherent excess" for extended objects.
EXTENDED_ROUNDS = 3
# Half-width (in patches) of the median filter that removes a nebula's bump from the patch
# planes. Wider windows remove bigger nebulae but also flatten a curved sky, which then gets
# flagged as "extended object" (tried: 2 masks the bright corner of als_m27_asi224mc).
ROBUST_HALF_PATCHES = 1


@dataclass
class BackgroundConfig:
    """Settings of the light-pollution model (pixel units)."""

    patch_px: int = 0  # 0 = auto: about 1/8 of the shorter image side, at least 32 px
    star_sigma: float = 2.0  # this many sigma above the patch background = "probably star"
    mask_iterations: int = 3
    dilate_px: int = 2  # grow the star mask so halos do not bias the fit
    extended_sigma: float = 3.0  # threshold on the smoothed residual that flags nebulae
    extended_smooth_px: int = 0  # box size for the nebula search; 0 = auto (patch / 6, >= 5 px)
    min_background_fraction: float = MIN_BACKGROUND_FRACTION


def background_config_from_dict(d) -> BackgroundConfig:
    """Build a BackgroundConfig from a config mapping (None -> defaults); unknown keys are fatal."""
    d = dict(d or {})
    known = {f.name: f.type for f in fields(BackgroundConfig)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise NightstackError(f"background: unknown setting(s) {', '.join(unknown)}")
    cfg = BackgroundConfig()
    for name, value in d.items():
        default = getattr(cfg, name)
        try:
            setattr(cfg, name, type(default)(value))
        except (TypeError, ValueError) as exc:
            raise NightstackError(f"background: {name} must be a number, got {value!r}") from exc
    if cfg.patch_px < 0 or cfg.dilate_px < 0 or cfg.mask_iterations < 1 or cfg.star_sigma <= 0:
        raise NightstackError(
            "background: patch_px and dilate_px must be >= 0, mask_iterations >= 1, star_sigma > 0"
        )
    return cfg


# --------------------------------------------------------------------------------------------
# Patch grid


@dataclass(frozen=True)
class _PatchGrid:
    """A regular grid of ny x nx patches of py x px pixels covering an (H, W) image (padded)."""

    height: int
    width: int
    ny: int
    nx: int
    py: int
    px: int

    @property
    def centres_y(self) -> np.ndarray:
        return np.arange(self.ny) * self.py + (self.py - 1) / 2.0

    @property
    def centres_x(self) -> np.ndarray:
        return np.arange(self.nx) * self.px + (self.px - 1) / 2.0

    def blocks(self, image2d: np.ndarray, fill) -> np.ndarray:
        """(H, W) -> (ny, nx, py, px) copy, the padding filled with ``fill``."""
        pad = ((0, self.ny * self.py - self.height), (0, self.nx * self.px - self.width))
        padded = np.pad(image2d, pad, constant_values=fill)
        return padded.reshape(self.ny, self.py, self.nx, self.px).transpose(0, 2, 1, 3)

    def row_bands(self):
        """Yield (rows, grid) for each of the ny rows of patches: the slice of image rows it
        covers and a one-row grid for that band (the last bands may be partial or, when the
        padding exceeds a patch, empty: all padding, as in the whole grid)."""
        for j in range(self.ny):
            y0 = j * self.py
            height = max(0, min(self.py, self.height - y0))
            yield slice(y0, y0 + height), _PatchGrid(height, self.width, 1, self.nx, self.py, self.px)

    def unblock(self, blocks: np.ndarray) -> np.ndarray:
        """(ny, nx, py, px) -> (H, W), dropping the padding."""
        full = blocks.transpose(0, 2, 1, 3).reshape(self.ny * self.py, self.nx * self.px)
        return full[: self.height, : self.width]


def _auto_patch_px(shape, patch_px: int) -> int:
    if patch_px > 0:
        return int(patch_px)
    return max(32, int(round(min(shape) / 8)))


def _patch_grid(shape, patch_px: int) -> _PatchGrid:
    """Patches close to ``patch_px`` square whose padding is less than one patch row/column."""
    height, width = shape
    p = _auto_patch_px(shape, patch_px)
    ny = max(1, int(round(height / p)))
    nx = max(1, int(round(width / p)))
    return _PatchGrid(height, width, ny, nx, -(-height // ny), -(-width // nx))


# --------------------------------------------------------------------------------------------
# Batched weighted least-squares planes


def _fit_planes(blocks, weights, min_fraction: float, zero_where_unused: bool = False):
    """Weighted LSQ plane per patch in patch-local coordinates (centre = 0).

    blocks: (ny, nx, py, px) float; weights: same shape, bool (a pixel is used or not); NaN in
    blocks must have weight False. zero_where_unused: ``blocks`` is already 0 wherever
    ``weights`` is False, so it is used as it is (no frame-sized copy).
    Returns (coef (ny, nx, 3) = level at the patch centre, x-slope, y-slope per px;
    ok (ny, nx) bool = enough background pixels for a trustworthy fit).
    """
    _, _, py, px = blocks.shape
    u = np.arange(px) - (px - 1) / 2.0  # local x
    v = np.arange(py) - (py - 1) / 2.0  # local y
    weights = np.asarray(weights, dtype=bool)
    # 0/1 weights: the weighted values are the used values, with no float copy of the weights
    # (on 24 MP frames every full-size temporary is 100 MB).
    wy = blocks if zero_where_unused else np.where(weights, blocks, 0).astype(np.float32, copy=False)
    # Row/column marginals make every moment a cheap small contraction.
    w_rows, w_cols = weights.sum(axis=3, dtype=np.float64), weights.sum(axis=2, dtype=np.float64)
    wy_rows, wy_cols = wy.sum(axis=3, dtype=np.float64), wy.sum(axis=2, dtype=np.float64)
    del wy
    s_1 = w_rows.sum(axis=2)
    s_u = w_cols @ u
    s_v = w_rows @ v
    s_uu = w_cols @ (u * u)
    s_vv = w_rows @ (v * v)
    # sum over i, j of w_ij v_i u_j, as a contraction of the column marginals of v-weighted rows
    s_uv = np.einsum("abi,i->ab", np.einsum("abij,j->abi", weights, u), v)
    s_y = wy_rows.sum(axis=2)
    s_uy = wy_cols @ u
    s_vy = wy_rows @ v
    normal = np.stack(
        [
            np.stack([s_1, s_u, s_v], axis=-1),
            np.stack([s_u, s_uu, s_uv], axis=-1),
            np.stack([s_v, s_uv, s_vv], axis=-1),
        ],
        axis=-2,
    )
    rhs = np.stack([s_y, s_uy, s_vy], axis=-1)
    ok = s_1 >= min_fraction * px * py
    # Keep the solve well posed for empty patches; their result is discarded via ``ok``.
    normal[~ok] = np.diag([1.0, 1.0, 1.0])
    rhs[~ok] = 0.0
    # Sky in a single row or column cannot fix both slopes.
    det = np.linalg.det(normal)
    scale = normal[..., 0, 0] * normal[..., 1, 1] * normal[..., 2, 2]
    singular = ~(det > 1e-9 * scale)
    normal[singular] = np.diag([1.0, 1.0, 1.0])
    rhs[singular] = 0.0
    coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
    return coef, ok & ~singular


def _plane_blocks(coef, py: int, px: int) -> np.ndarray:
    """Evaluate per-patch local planes on their own pixels: (ny, nx, py, px) float32."""
    u = (np.arange(px) - (px - 1) / 2.0).astype(np.float32)
    v = (np.arange(py) - (py - 1) / 2.0).astype(np.float32)
    c = coef.astype(np.float32)
    # (a + b*u) + c*v with one frame-sized array: the slope terms are (.., 1, px) and
    # (.., py, 1), broadcast into it in place
    plane = c[..., 0, None, None] + c[..., 1, None, None] * u[None, None, None, :]
    plane = np.broadcast_to(plane, coef.shape[:2] + (py, px)).copy()
    plane += c[..., 2, None, None] * v[None, None, :, None]
    return plane


def _fill_from_neighbours(coef, ok, grid: "_PatchGrid"):
    """Give patches without a trusted fit the mean of their trusted neighbours' planes.

    coef: (ny, nx, 3) centred coefficients; ok: (ny, nx) bool. Each neighbour's plane is
    evaluated at the missing patch's centre (it is the same linear model, extended by one patch),
    so a gradient running into a hole or a corner continues instead of flattening. Repeats until
    every patch has coefficients.
    """
    if ok.all():
        return coef
    if not ok.any():
        raise NightstackError("background: no patch has enough sky pixels to fit a gradient")
    yc, xc = np.meshgrid(grid.centres_y, grid.centres_x, indexing="ij")
    # Global form a + b*x + c*y: averaging it is averaging the planes themselves.
    glob = np.stack(
        [coef[..., 0] - coef[..., 1] * xc - coef[..., 2] * yc, coef[..., 1], coef[..., 2]], -1
    )
    glob[~ok] = 0.0
    known = ok.copy()
    kernel = np.ones((3, 3))
    while not known.all():
        weight = ndimage.convolve(known.astype(float), kernel, mode="constant")
        total = np.stack(
            [ndimage.convolve(glob[..., k] * known, kernel, mode="constant") for k in range(3)],
            axis=-1,
        )
        newly = ~known & (weight > 0)
        glob[newly] = total[newly] / weight[newly, None]
        known |= newly
    return np.stack(
        [glob[..., 0] + glob[..., 1] * xc + glob[..., 2] * yc, glob[..., 1], glob[..., 2]], -1
    )


def interp_matrix(positions: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(len(positions), n_centres) bilinear weights from patch centres to pixel positions (px),
    clamped at the ends."""
    pos = np.clip(np.interp(positions, centres, np.arange(len(centres))), 0, len(centres) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(centres) - 1)
    frac = pos - lo
    m = np.zeros((len(positions), len(centres)))
    rows = np.arange(len(positions))
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _blend_planes(coef, grid: _PatchGrid, ys=None, xs=None, out=None) -> np.ndarray:
    """Smooth (H, W) float32 model from per-patch centred planes.

    Each plane is rewritten in global coordinates (a + b*x + c*y); the three coefficient fields
    are bilinearly interpolated between patch centres (separably: Wy @ F @ Wx^T) and evaluated.
    ys, xs: optional pixel coordinates (1-D, px) of the rows and columns to evaluate instead of
    every pixel (e.g. block centres of a binned image); the result is then (len(ys), len(xs)).
    out: optional float32 array of the result's shape to write the model into.
    """
    yc, xc = np.meshgrid(grid.centres_y, grid.centres_x, indexing="ij")
    a = coef[..., 0] - coef[..., 1] * xc - coef[..., 2] * yc
    y = np.arange(grid.height, dtype=np.float32) if ys is None else np.asarray(ys, np.float32)
    x = np.arange(grid.width, dtype=np.float32) if xs is None else np.asarray(xs, np.float32)
    wy = interp_matrix(y, grid.centres_y).astype(np.float32)
    wx = interp_matrix(x, grid.centres_x).astype(np.float32)

    def field(f, into=None):
        return np.matmul(wy @ f.astype(np.float32), wx.T, out=into)

    # one full-size temporary at a time: the frame-sized products are formed in place
    model = field(a, out)
    slope = field(coef[..., 1])
    slope *= x[None, :]
    model += slope
    slope = field(coef[..., 2], slope)
    slope *= y[:, None]
    model += slope
    return model


# --------------------------------------------------------------------------------------------
# Masks


def _as_2d(image2d) -> np.ndarray:
    img = np.asarray(image2d, dtype=np.float32)
    if img.ndim != 2:
        raise NightstackError(f"background: expected a 2-D image, got shape {img.shape}")
    if not np.isfinite(img).any():
        raise NightstackError("background: image has no finite pixels")
    return img


def _disk(radius_px: int) -> np.ndarray:
    r = np.arange(-radius_px, radius_px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius_px**2 + 0.5


def _point_source_mask(img, grid: _PatchGrid, cfg: BackgroundConfig) -> np.ndarray:
    """Per-patch sigma clipping of pixels above the patch plane, then dilation: (H, W) bool."""
    mask = np.empty(img.shape, dtype=bool)
    # a row of patches at a time: each patch is clipped on its own, and the temporaries are
    # a row's (a 24 MP frame's were 400 MB, the peak of the outputs job)
    for rows, band_grid in grid.row_bands():
        mask[rows] = _point_source_band(img[rows], band_grid, cfg)
    if cfg.dilate_px > 0:
        # At 2 sigma about 2 % of pure sky pixels are flagged; growing each of them would mask
        # half the sky. Only connected groups (real stars have FWHM >= 2 px) get halos grown.
        grouped = mask & _any_neighbour(mask)
        mask |= dilate_disk(grouped, cfg.dilate_px)
    return mask


def _point_source_band(img, grid: _PatchGrid, cfg: BackgroundConfig) -> np.ndarray:
    """Star flags (h, w) bool of a band of patches: each patch's plane is fitted to its pixels
    in use, those more than star_sigma residual sigmas above it flagged, mask_iterations times."""
    blocks = grid.blocks(img, np.nan)
    valid = np.isfinite(blocks)
    all_valid = bool(valid.all())  # padding aside, calibrated frames rarely have a NaN
    use = valid
    star = np.zeros_like(valid)
    for _ in range(cfg.mask_iterations):
        # Any-count fit here: the stats only need some pixels, the fraction rule is for the model.
        coef, _ = _fit_planes(blocks, use, min_fraction=0.0)
        resid = _plane_blocks(coef, grid.py, grid.px)
        np.subtract(blocks, resid, out=resid)  # in place: a 24 MP frame is 96 MB a copy
        if not all_valid:
            resid[~valid] = 0.0
        n = np.maximum(use.sum(axis=(2, 3)), 1)
        squares = np.where(use, resid, np.float32(0.0))
        np.square(squares, out=squares)
        std = np.sqrt(squares.sum(axis=(2, 3), dtype=np.float64) / n)
        del squares
        star = resid > cfg.star_sigma * std[..., None, None]
        if not all_valid:
            star &= valid
        del resid
        use = ~star if all_valid else valid & ~star
    return grid.unblock(star)


def _shifted_or(out: np.ndarray, mask: np.ndarray, dy: int, dx: int) -> None:
    """out[y, x] |= mask[y + dy, x + dx] where that pixel exists (in place)."""
    height, width = mask.shape
    if abs(dy) >= height or abs(dx) >= width:
        return  # no pixel has that neighbour
    out[max(0, -dy): height - max(0, dy), max(0, -dx): width - max(0, dx)] |= mask[
        max(0, dy): height - max(0, -dy), max(0, dx): width - max(0, -dx)]


def _any_neighbour(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where at least one of the 8 neighbours is True (outside is False).

    Eight shifted ORs of bools: 8x faster than counting with a 3x3 convolution."""
    rows = np.zeros_like(mask)  # left or right neighbour
    _shifted_or(rows, mask, 0, -1)
    _shifted_or(rows, mask, 0, 1)
    three = rows | mask  # the 3-wide run centred on each pixel
    _shifted_or(rows, three, -1, 0)
    _shifted_or(rows, three, 1, 0)
    return rows


def dilate_disk(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by the disk ``_disk(radius_px)``, outside False:
    ndimage.binary_dilation's result, by OpenCV (7x faster on 24 MP, filters.binary_dilation)."""
    return binary_dilation(mask, _disk(radius_px))


def _smooth_px(grid: _PatchGrid, cfg: BackgroundConfig) -> int:
    if cfg.extended_smooth_px > 0:
        return int(cfg.extended_smooth_px)
    return max(5, int(round(min(grid.py, grid.px) / 6)))


def _extended_mask(residual, usable, size_px: int, sigma: float) -> np.ndarray:
    """Coherent positive structure in a background-subtracted image: (H, W) bool.

    The residual is box-smoothed over the usable pixels only (normalised convolution), so
    masked stars do not leak in; the threshold is ``sigma`` times the robust spread of the
    smoothed sky. ``usable`` is bool or, for a binned image, the usable fraction of each bin.
    """
    w = usable.astype(np.float32)
    r = np.where(w > 0, residual * w, 0.0).astype(np.float32)
    num = ndimage.uniform_filter(r, size_px, mode="nearest")
    den = ndimage.uniform_filter(w, size_px, mode="nearest")
    smooth = np.where(den > 0.25, num / np.maximum(den, 1e-6), np.nan)
    sky = smooth[np.isfinite(smooth)]
    if sky.size < 16:
        return np.zeros(usable.shape, bool)
    med = np.median(sky)
    spread = 1.4826 * np.median(np.abs(sky - med))
    if not spread > 0:
        return np.zeros(usable.shape, bool)
    found = np.nan_to_num(smooth, nan=-np.inf) > med + sigma * spread
    # The box blurs edges inward; grow back by half a box so nebula wings stay masked
    # (a box-filter dilation: cost independent of the size, unlike binary_dilation).
    grown = ndimage.uniform_filter(found.astype(np.float32), size_px | 1, mode="constant")
    return grown > 0.5 / (size_px | 1) ** 2


def _bin_factor(size_px: int) -> int:
    """Bin side (px) for the nebula search: at least 8 bins across its smoothing box."""
    return max(1, size_px // 8)


def _binned_sky(img, usable, factor: int):
    """Block means of the usable pixels of an (H, W) image over ``factor`` x ``factor`` bins.

    Returns (mean (h, w) float32, NaN in bins with no usable pixel; fraction (h, w) float32 of
    usable pixels per bin; centres_y (h,), centres_x (w,) in image px). Edge bins are partial.
    """
    height, width = img.shape
    h, w = -(-height // factor), -(-width // factor)
    # zero-padded to whole bins; one float copy of the image (a 24 MP frame: 96 MB)
    weight = np.zeros((h * factor, w * factor), dtype=bool)
    np.logical_and(usable, np.isfinite(img), out=weight[:height, :width])
    values = np.zeros(weight.shape, dtype=np.float32)
    np.copyto(values[:height, :width], img, where=weight[:height, :width])
    count = weight.reshape(h, factor, w, factor).sum(axis=(1, 3), dtype=np.float32)
    del weight
    total = values.reshape(h, factor, w, factor).sum(axis=(1, 3))
    del values
    rows = np.minimum(factor, height - np.arange(h) * factor).astype(np.float32)
    cols = np.minimum(factor, width - np.arange(w) * factor).astype(np.float32)
    area = rows[:, None] * cols[None, :]  # pixels of the image in each (edge: partial) bin
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan).astype(np.float32)
    centres_y = np.minimum(np.arange(h) * factor + (factor - 1) / 2.0, height - 1)
    centres_x = np.minimum(np.arange(w) * factor + (factor - 1) / 2.0, width - 1)
    return mean, count / area, centres_y, centres_x


def _unbin(mask, factor: int, shape) -> np.ndarray:
    """(h, w) bool bins -> (H, W) bool pixels (each bin repeated over its pixels)."""
    if factor == 1:
        return mask[: shape[0], : shape[1]]
    full = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    return full[: shape[0], : shape[1]]


def _patch_planes(img, grid: _PatchGrid, mask, cfg: BackgroundConfig) -> np.ndarray:
    """Fitted plane of every patch over its sky pixels (mask False), holes filled: (ny, nx, 3)."""
    coef, ok = _fit_patch_rows(img, grid, mask, cfg.min_background_fraction)
    if not ok.any():
        # Too crowded for the fraction rule everywhere: use whatever sky there is.
        coef, ok = _fit_patch_rows(img, grid, mask, 0.0, any_sky=True)
    return _fill_from_neighbours(coef, ok, grid)


def _fit_patch_rows(img, grid: _PatchGrid, mask, min_fraction: float, any_sky: bool = False):
    """_fit_planes of every patch over its sky pixels, a row of patches at a time (so the
    temporaries are a row's, not the frame's): (coef (ny, nx, 3), ok (ny, nx)); ``any_sky``:
    ok only where a patch has a sky pixel at all."""
    coef = np.empty((grid.ny, grid.nx, 3))
    ok = np.empty((grid.ny, grid.nx), dtype=bool)
    for j, (rows, band_grid) in enumerate(grid.row_bands()):
        blocks = band_grid.blocks(img[rows], np.nan)  # a copy: it is zeroed where unused
        use = band_grid.blocks(~mask[rows], False) & np.isfinite(blocks)
        np.copyto(blocks, 0, where=~use)
        band_coef, band_ok = _fit_planes(blocks, use, min_fraction, zero_where_unused=True)
        coef[j], ok[j] = band_coef[0], band_ok[0]
        if any_sky:
            ok[j] &= use.any(axis=(2, 3))[0]
    return coef, ok


def _robust_patch_planes(img, grid: _PatchGrid, mask, cfg: BackgroundConfig) -> np.ndarray:
    """Patch planes with single-patch bumps (a nebula) removed: (ny, nx, 3) centred coefficients.

    Each coefficient field is 3x3 median filtered over the patch grid. The grid is padded by
    odd reflection, which continues a linear trend, so gradients reaching the border survive.
    """
    coef = _patch_planes(img, grid, mask, cfg)
    h = ROBUST_HALF_PATCHES
    if min(coef.shape[:2]) < 2 * h + 1:
        return coef  # too few patches to tell a bump from the sky
    smooth = np.empty_like(coef)
    for k in range(3):
        padded = np.pad(coef[..., k], h, mode="reflect", reflect_type="odd")
        smooth[..., k] = ndimage.median_filter(padded, size=2 * h + 1)[h:-h, h:-h]
    return smooth


def star_mask(image2d, cfg: BackgroundConfig | None = None) -> np.ndarray:
    """True where a pixel is probably a star or an extended object (not sky).

    image2d: (H, W) float, any linear unit. Returns (H, W) bool. Non-finite pixels are True.
    """
    cfg = cfg or BackgroundConfig()
    img = _as_2d(image2d)
    grid = _patch_grid(img.shape, cfg.patch_px)
    mask = _point_source_mask(img, grid, cfg) | ~np.isfinite(img)
    # Nebulae are coherent over the smoothing box (patch / 6), so they are sought on bins of
    # an eighth of the box: the same statistics at up to 100x fewer pixels on 24 MP frames.
    size_px = _smooth_px(grid, cfg)
    factor = _bin_factor(size_px)
    binned, usable, ys, xs = _binned_sky(img, ~mask, factor)
    extended = np.zeros(binned.shape, bool)
    # Each round masks more of a nebula, so fewer patches are biased by it in the next.
    for _ in range(EXTENDED_ROUNDS):
        not_sky = mask | _unbin(extended, factor, img.shape)
        model = _blend_planes(_robust_patch_planes(img, grid, not_sky, cfg), grid, ys, xs)
        extended |= _extended_mask(binned - model, usable, max(1, round(size_px / factor)),
                                   cfg.extended_sigma)
    extended = _unbin(extended, factor, img.shape)
    return mask | extended


# --------------------------------------------------------------------------------------------
# Model and removal


def fit_background(image2d, cfg: BackgroundConfig | None = None, mask=None,
                   out=None) -> np.ndarray:  # fmt: skip
    """Smooth light-pollution model of one channel.

    image2d: (H, W) float, any linear unit. mask: optional (H, W) bool, True = not sky
    (default: ``star_mask(image2d, cfg)``). Returns the model, (H, W) float32, same unit,
    written into ``out`` (float32 (H, W)) when given.
    """
    cfg = cfg or BackgroundConfig()
    img = _as_2d(image2d)
    if mask is None:
        mask = star_mask(img, cfg)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape:
        raise NightstackError(f"background: mask shape {mask.shape} != image shape {img.shape}")
    grid = _patch_grid(img.shape, cfg.patch_px)
    return _blend_planes(_patch_planes(img, grid, mask | ~np.isfinite(img), cfg), grid, out=out)


def remove_background(image, cfg: BackgroundConfig | None = None, keep_level: bool = True,
                      not_sky=None, in_place: bool = False, model_reducer=None):
    """Subtract the light-pollution model from each channel separately.

    image: (H, W) or (C, H, W) float, linear. Each channel gets its own model so a coloured glow
    leaves no tint; the star mask is shared, found on the channel mean (more signal). With
    ``keep_level`` each channel's median model level is added back, so the sky stays at a
    positive pedestal and noise statistics stay meaningful. ``not_sky``: optional (H, W) bool,
    True where the model must not be fitted (a landscape's ground); the model there is carried
    over smoothly from the sky and subtracted like everywhere else. ``in_place``: a float32
    ``image`` is corrected in its own memory (saves a copy of the frame). ``model_reducer``:
    optional function of one channel's model ((H, W) float32, reused for the next channel) to
    a smaller array, e.g. a binned model (nightstack.outputs.bin_model); the model returned is
    then the stack of its results and the full-size model never exists (a 24 MP colour
    frame's is 288 MB). Returns (corrected, model), float32, the input's shape (the model
    reduced when asked).
    """
    cfg = cfg or BackgroundConfig()
    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise NightstackError(f"background: expected (H, W) or (C, H, W), got shape {img.shape}")
    channels = img[None] if img.ndim == 2 else img
    luminance = channels.mean(axis=0) if len(channels) > 1 else channels[0]
    if len(channels) > 1 and not np.isfinite(luminance).all():  # nanmean only where needed
        with np.errstate(invalid="ignore"):
            luminance = np.nanmean(channels, axis=0)
    mask = star_mask(luminance, cfg)
    if not_sky is not None:
        mask = mask | np.asarray(not_sky, dtype=bool)
    del luminance
    corrected = channels if in_place and channels.dtype == np.float32 else channels.copy()
    # with a reducer, one full-size channel is reused for every channel's model
    full = np.empty(channels.shape if model_reducer is None else (1, *channels.shape[1:]),
                    dtype=np.float32)
    reduced = []
    # each channel's fit reads only that channel (and the shared mask), so it is corrected
    # as soon as its model is made
    for k, corrected_channel in enumerate(corrected):
        model_channel = full[k if model_reducer is None else 0]
        fit_background(channels[k], cfg, mask=mask, out=model_channel)
        corrected_channel -= model_channel
        if keep_level:
            corrected_channel += np.median(model_channel)
        if model_reducer is not None:
            reduced.append(np.asarray(model_reducer(model_channel)))
    del mask
    model = full if model_reducer is None else np.stack(reduced)
    if img.ndim == 2:
        return corrected[0], model[0]
    return corrected, model


def large_scale_residual(image2d, block_px: int = 64, mask=None) -> float:
    """Spread of the sky's large-scale level: p95 - p5 of the block medians of the sky pixels.

    image2d: (H, W) float; block_px: block side (px); mask: (H, W) bool, True = not sky
    (default: ``star_mask`` with default settings). Blocks with under half their pixels usable
    are skipped; trailing partial blocks are dropped. Returns the spread in the image's unit.
    """
    img = _as_2d(image2d)
    if mask is None:
        mask = star_mask(img)
    ny, nx = img.shape[0] // block_px, img.shape[1] // block_px
    if ny < 1 or nx < 1:
        raise NightstackError(f"background: image {img.shape} smaller than one {block_px} px block")
    sky = np.where(np.asarray(mask, dtype=bool), np.nan, img)[: ny * block_px, : nx * block_px]
    blocks = sky.reshape(ny, block_px, nx, block_px).transpose(0, 2, 1, 3).reshape(ny, nx, -1)
    enough = np.isfinite(blocks).sum(axis=2) >= block_px * block_px / 2
    if enough.sum() < 2:
        raise NightstackError("background: too few sky blocks to measure the residual")
    medians = np.nanmedian(blocks[enough], axis=1)
    p5, p95 = np.percentile(medians, [5, 95])
    return float(p95 - p5)
