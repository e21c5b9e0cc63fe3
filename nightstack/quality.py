"""Frame quality: score each frame of a night and reject the outliers, with a reason.

A frame is judged against the night it belongs to. Relative tests (FWHM, star count,
background, registration residual) compare a frame with the night's median, using the robust
sigma 1.4826 * MAD of all frames given; a frame fails only when it is both many robust
sigmas AND a large ratio away, so a tight night (MAD ~ 0) does not lose frames to tiny
differences and a noisy night does not lose frames to ordinary scatter. Ellipticity has an
absolute limit (a trailed star is trailed whatever the other frames do). With fewer than 3
frames (or fewer than 3 frames with a value for a quantity) the relative tests are skipped.
The verdict never rejects every frame: if all fail, the sharpest one is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NightstackError
from .settings import settings_from_dict

MAD_TO_SIGMA = 1.4826
MIN_FRAMES_FOR_STATISTICS = 3


@dataclass
class QualityConfig:
    """Limits of judge_frames; defaults need no tuning."""

    max_fwhm_mad: float = 5.0  # FWHM this many robust sigmas above the night's median ...
    min_fwhm_ratio: float = 1.5  # ... and at least this ratio above it: blurred (both must hold)
    max_ellipticity: float = 0.5  # median star ellipticity above this: trailed (wind, tracking)
    min_star_ratio: float = 0.25  # fewer stars than this fraction of the night's median: clouds
    max_background_mad: float = 8.0  # background this many robust sigmas above the median AND ...
    min_background_ratio: float = 2.0  # ... at least this ratio: twilight, moon, headlights
    max_rms_mad: float = 6.0  # registration residual this many robust sigmas above the median AND ...
    min_rms_ratio: float = 2.0  # ... at least this ratio: badly registered


def quality_config_from_dict(d: dict | None) -> QualityConfig:
    """QualityConfig from a config mapping (None: defaults); bad keys/values raise NightstackError."""
    cfg = settings_from_dict(QualityConfig, d, "quality")
    bad = [name for name, value in vars(cfg).items() if not (np.isfinite(value) and value > 0)]
    if bad:
        raise NightstackError(f"quality setting(s) {', '.join(bad)} must be positive numbers")
    if cfg.min_star_ratio >= 1:
        raise NightstackError(f"quality setting min_star_ratio must be below 1, got {cfg.min_star_ratio}")
    return cfg


@dataclass
class FrameScore:
    """Quality figures of one frame; NaN (or None for the residual) where unknown.

    fwhm_px, ellipticity: medians over the frame's stars; n_stars: stars detected;
    background_adu, noise_adu: sky level and per-pixel noise (ADU); residual_rms_px:
    registration residual after the night's solution (0 for the reference, by definition).
    """

    frame: str
    fwhm_px: float
    ellipticity: float
    n_stars: int
    background_adu: float
    noise_adu: float
    residual_rms_px: float | None


SCORE_KEYS = ("fwhm_px", "ellipticity", "n_stars", "background_adu", "noise_adu", "residual_rms_px")


def _number(value) -> float:
    """A record value as float; None, missing or non-numeric -> NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def score_frames(records: list[dict]) -> list[FrameScore]:
    """FrameScores from dicts with key ``frame`` and any of SCORE_KEYS (missing/None -> NaN).

    Fits the frame records of solution.json (which carry fwhm_px, n_stars, residual_rms_px)
    as well as catalog metadata merged into them. n_stars is an int when known, else NaN.
    """
    scores = []
    seen = set()
    for i, rec in enumerate(records):
        if "frame" not in rec:
            raise NightstackError(f"quality record {i} has no 'frame'")
        frame = str(rec["frame"])
        if frame in seen:
            raise NightstackError(f"quality records name frame '{frame}' twice")
        seen.add(frame)
        values = {key: _number(rec.get(key)) for key in SCORE_KEYS}
        if np.isfinite(values["n_stars"]):
            values["n_stars"] = int(values["n_stars"])
        scores.append(FrameScore(frame=frame, **values))
    return scores


# --------------------------------------------------------------------------- statistics


def _column(scores: list[FrameScore], name: str) -> np.ndarray:
    return np.array([_number(getattr(s, name)) for s in scores], dtype=float)


def robust_centre_and_sigma(values: np.ndarray) -> tuple[float, float, int]:
    """Median, robust sigma (1.4826 * MAD) and count of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    median = float(np.median(finite))
    return median, float(MAD_TO_SIGMA * np.median(np.abs(finite - median))), int(finite.size)


def _sigmas_above(values: np.ndarray, median: float, sigma: float) -> np.ndarray:
    """How many robust sigmas each value lies above the median (inf when sigma is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > median, (values - median) / sigma, 0.0)


def high_outliers(values: np.ndarray, max_mad: float, min_ratio: float):
    """Which values are both ``max_mad`` robust sigmas and ``min_ratio`` times above the median.

    Returns (flags, median, ratio, sigmas). Nothing is flagged when fewer than 3 values are
    finite or the median is not positive (a ratio to it would mean nothing).
    """
    median, sigma, n = robust_centre_and_sigma(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = values / median
    sigmas = _sigmas_above(values, median, sigma)
    if n < MIN_FRAMES_FOR_STATISTICS or not median > 0:
        return np.zeros(values.shape, bool), median, ratio, sigmas
    flags = np.isfinite(values) & (sigmas > max_mad) & (ratio >= min_ratio)
    return flags, median, ratio, sigmas


def _sigma_text(sigmas: float) -> str:
    return "far more than" if not np.isfinite(sigmas) else f"{sigmas:.1f}"


# --------------------------------------------------------------------------- verdict


def _fwhm_reasons(scores, cfg: QualityConfig) -> dict[int, str]:
    fwhm = _column(scores, "fwhm_px")
    flags, median, ratio, sigmas = high_outliers(fwhm, cfg.max_fwhm_mad, cfg.min_fwhm_ratio)
    return {int(i): (f"FWHM {fwhm[i]:.2f} px is {ratio[i]:.2f}x the night's median {median:.2f} px, "
                     f"{_sigma_text(sigmas[i])} robust sigmas above (limits {cfg.min_fwhm_ratio:g}x "
                     f"and {cfg.max_fwhm_mad:g} sigma): blurred")
            for i in np.flatnonzero(flags)}


def _ellipticity_reasons(scores, cfg: QualityConfig) -> dict[int, str]:
    ell = _column(scores, "ellipticity")
    flags = np.isfinite(ell) & (ell > cfg.max_ellipticity)
    return {int(i): (f"median star ellipticity {ell[i]:.2f} exceeds {cfg.max_ellipticity:g}: "
                     f"trailed (wind or tracking)")
            for i in np.flatnonzero(flags)}


def _star_count_reasons(scores, cfg: QualityConfig) -> dict[int, str]:
    counts = _column(scores, "n_stars")
    median, _, n = robust_centre_and_sigma(counts)
    if n < MIN_FRAMES_FOR_STATISTICS or not median > 0:
        return {}
    flags = np.isfinite(counts) & (counts < cfg.min_star_ratio * median)
    return {int(i): (f"{counts[i]:.0f} stars is {100 * counts[i] / median:.0f}% of the night's median "
                     f"{median:.0f} (limit {100 * cfg.min_star_ratio:g}%): clouds or haze")
            for i in np.flatnonzero(flags)}


def _background_reasons(scores, cfg: QualityConfig) -> dict[int, str]:
    bg = _column(scores, "background_adu")
    flags, median, ratio, sigmas = high_outliers(bg, cfg.max_background_mad, cfg.min_background_ratio)
    return {int(i): (f"background {bg[i]:.1f} ADU is {ratio[i]:.1f}x the night's median {median:.1f} ADU, "
                     f"{_sigma_text(sigmas[i])} robust sigmas above (limits {cfg.min_background_ratio:g}x "
                     f"and {cfg.max_background_mad:g} sigma): twilight, moon or lights")
            for i in np.flatnonzero(flags)}


def _residual_reasons(scores, cfg: QualityConfig) -> dict[int, str]:
    rms = _column(scores, "residual_rms_px")
    # the reference's residual is 0 by construction, not a measurement
    rms[rms <= 0] = np.nan
    flags, median, ratio, sigmas = high_outliers(rms, cfg.max_rms_mad, cfg.min_rms_ratio)
    return {int(i): (f"registration residual RMS {rms[i]:.2f} px is {ratio[i]:.1f}x the night's median "
                     f"{median:.2f} px, {_sigma_text(sigmas[i])} robust sigmas above (limits "
                     f"{cfg.min_rms_ratio:g}x and {cfg.max_rms_mad:g} sigma): badly registered")
            for i in np.flatnonzero(flags)}


def _sharpest_index(scores) -> int:
    """Index of the frame with the lowest FWHM (unknown FWHM counts as worst; ties: first)."""
    fwhm = _column(scores, "fwhm_px")
    return int(np.argmin(np.where(np.isfinite(fwhm), fwhm, np.inf)))


def judge_frames(scores: list[FrameScore], cfg: QualityConfig | None = None) -> dict[str, str]:
    """Frame name -> rejection reason ("" = keep), reasons of several failed tests joined by "; ".

    Relative tests use the median and robust sigma of all ``scores`` and need at least 3
    frames; the ellipticity limit always applies. If every frame fails, the sharpest (lowest
    FWHM) is kept and the others' reasons say so. ``cfg`` None: defaults.
    """
    cfg = cfg or QualityConfig()
    if not scores:
        return {}
    tests = [_ellipticity_reasons(scores, cfg)]
    if len(scores) >= MIN_FRAMES_FOR_STATISTICS:
        tests += [_fwhm_reasons(scores, cfg), _star_count_reasons(scores, cfg),
                  _background_reasons(scores, cfg), _residual_reasons(scores, cfg)]
    reasons = ["; ".join(t[i] for t in tests if i in t) for i in range(len(scores))]
    if all(reasons):
        keep = _sharpest_index(scores)
        note = f"every frame failed; {scores[keep].frame} was kept as the sharpest"
        reasons = ["" if i == keep else f"{r}; {note}" for i, r in enumerate(reasons)]
    return {s.frame: r for s, r in zip(scores, reasons)}


def rejected_frames(verdict: dict[str, str]) -> dict[str, str]:
    """Only the rejected frames of a judge_frames verdict."""
    return {frame: reason for frame, reason in verdict.items() if reason}
