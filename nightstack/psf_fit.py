"""Levenberg-Marquardt fit of an elliptical Gaussian to star stamps, one star at a time (numba).

The model and its use are described in nightstack.stars (``_fit_batch``): A exp(-q/2) with
q = a dx^2 + 2 b dx dy + c dy^2 around (x0, y0), six parameters per star. numpy fitted a
batch of stars at once, building the (stars, 6, pixels) Jacobian in memory at every
iteration; here each star's normal equations are summed pixel by pixel, skipping pixels of
weight 0, and solved in registers (3x faster on the stars of a 24 MP frame).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .stars import N_PARAMS

# The same settings as stars._levenberg_marquardt (tests/test_psf_fit.py holds the two fits
# together). They are not imported from there: numba bakes globals into its cache, which is
# only invalidated when this file changes.
Q_CLIP = (-50.0, 700.0)  # trial steps may be non-definite: exp(-q/2) stays finite
LAMBDA_START, LAMBDA_MIN, LAMBDA_MAX = 1e-2, 1e-7, 1e7


@njit(cache=True, nogil=True)
def params_valid(p, r):
    """A well-formed Gaussian (A > 0, positive-definite) centred within r px of the stamp."""
    for k in range(N_PARAMS):
        if not np.isfinite(p[k]):
            return False
    return (p[0] > 0 and p[3] > 0 and p[5] > 0 and p[3] * p[5] - p[4] * p[4] > 0
            and abs(p[1]) <= r and abs(p[2]) <= r)


@njit(cache=True, nogil=True)
def _chi2(p, target, weight, dx_grid, dy_grid):
    """Weighted sum of squared residuals of the model p over one stamp."""
    total = 0.0
    for m in range(target.size):
        if weight[m] == 0.0:
            continue
        dx = dx_grid[m] - p[1]
        dy = dy_grid[m] - p[2]
        q = dx * (p[3] * dx + p[4] * dy) + dy * (p[4] * dx + p[5] * dy)
        q = min(max(q, Q_CLIP[0]), Q_CLIP[1])
        residual = target[m] - p[0] * np.exp(-0.5 * q)
        total += weight[m] * residual * residual
    return total


@njit(cache=True, nogil=True)
def _normal_equations(p, target, weight, dx_grid, dy_grid, hess, grad):
    """J W J^T (6x6) and J W residual (6,) of the model p over one stamp, in place."""
    hess[:] = 0.0
    grad[:] = 0.0
    jac = np.empty(N_PARAMS)
    for m in range(target.size):
        w = weight[m]
        if w == 0.0:
            continue
        dx = dx_grid[m] - p[1]
        dy = dy_grid[m] - p[2]
        grad_x = p[3] * dx + p[4] * dy  # half of dq/d(dx)
        grad_y = p[4] * dx + p[5] * dy
        q = min(max(dx * grad_x + dy * grad_y, Q_CLIP[0]), Q_CLIP[1])
        e = np.exp(-0.5 * q)
        model = p[0] * e
        jac[0] = e
        jac[1] = model * grad_x
        jac[2] = model * grad_y
        jac[3] = -0.5 * model * dx * dx
        jac[4] = -model * dx * dy
        jac[5] = -0.5 * model * dy * dy
        residual = target[m] - model
        for j in range(N_PARAMS):
            grad[j] += w * jac[j] * residual
            for k in range(j + 1):
                hess[j, k] += w * jac[j] * jac[k]
    for j in range(N_PARAMS):
        for k in range(j):
            hess[k, j] = hess[j, k]


@njit(cache=True, nogil=True)
def _solve_spd(matrix, rhs, out):
    """Solve matrix @ out = rhs for a symmetric positive-definite 6x6 matrix (Cholesky).

    A matrix that is not positive definite (NaN from a broken trial) gives NaN, which the
    caller's chi^2 and validity tests reject.
    """
    n = rhs.size
    low = np.zeros((n, n))
    for j in range(n):
        s = matrix[j, j]
        for k in range(j):
            s -= low[j, k] * low[j, k]
        if not s > 0:
            out[:] = np.nan
            return
        low[j, j] = np.sqrt(s)
        for i in range(j + 1, n):
            t = matrix[i, j]
            for k in range(j):
                t -= low[i, k] * low[j, k]
            low[i, j] = t / low[j, j]
    for i in range(n):  # forward: low y = rhs
        t = rhs[i]
        for k in range(i):
            t -= low[i, k] * out[k]
        out[i] = t / low[i, i]
    for i in range(n - 1, -1, -1):  # back: low^T x = y
        t = out[i]
        for k in range(i + 1, n):
            t -= low[k, i] * out[k]
        out[i] = t / low[i, i]


@njit(cache=True, nogil=True)
def levenberg_marquardt(p, target, weight, dx_grid, dy_grid, r, iterations):
    """Fit every star's six parameters by damped Gauss-Newton on its weighted residuals.

    p: (N, 6) float64 starting parameters (A in ADU, x0/y0 in px from the stamp centre,
    a/b/c in 1/px^2); target: (N, M) float64 background-subtracted stamp values (ADU);
    weight: (N, M) float64, 0 = pixel not used; dx_grid/dy_grid: (M,) pixel offsets (px);
    r: stamp half-size (px). Each star has its own damping, scaled to a unit diagonal so A
    (thousands of ADU) and a, b, c (~1/px^2) share it; a step (centre moves of at most 1 px)
    is taken only when it lowers that star's chi^2 and keeps the Gaussian well-formed.
    Returns (fitted p (N, 6), valid (N,) bool).
    """
    n_stars = p.shape[0]
    fitted = p.copy()
    valid = np.zeros(n_stars, dtype=np.bool_)
    hess = np.empty((N_PARAMS, N_PARAMS))
    scaled = np.empty((N_PARAMS, N_PARAMS))
    grad = np.empty(N_PARAMS)
    scale = np.empty(N_PARAMS)
    step = np.empty(N_PARAMS)
    trial = np.empty(N_PARAMS)
    for i in range(n_stars):
        params = fitted[i]
        damping = LAMBDA_START
        chi2 = _chi2(params, target[i], weight[i], dx_grid, dy_grid)
        for _ in range(iterations):
            _normal_equations(params, target[i], weight[i], dx_grid, dy_grid, hess, grad)
            for j in range(N_PARAMS):
                scale[j] = np.sqrt(hess[j, j]) if hess[j, j] > 0 else 1.0
            for j in range(N_PARAMS):
                for k in range(N_PARAMS):
                    scaled[j, k] = hess[j, k] / (scale[j] * scale[k])
                scaled[j, j] += damping
                grad[j] /= scale[j]
            _solve_spd(scaled, grad, step)
            for j in range(N_PARAMS):
                trial[j] = params[j] + step[j] / scale[j]
            for j in (1, 2):  # at most 1 px per iteration
                trial[j] = params[j] + min(max(step[j] / scale[j], -1.0), 1.0)
            trial_chi2 = _chi2(trial, target[i], weight[i], dx_grid, dy_grid)
            if params_valid(trial, r) and trial_chi2 < chi2:
                params[:] = trial
                chi2 = trial_chi2
                damping = max(damping / 3.0, LAMBDA_MIN)
            else:
                damping = min(damping * 4.0, LAMBDA_MAX)
        valid[i] = params_valid(params, r)
    return fitted, valid
