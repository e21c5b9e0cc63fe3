"""Diagnostic plots of a stacked night, one PNG each, for the Snakemake report.

Inputs are the night's artifacts (``solution.json``, ``stars/*.ecsv``, ``poses/*.json``,
``stack_linear.json``, ``stack.png``, ``background_model.fits``) as paths or already-read
dicts; every function writes one PNG atomically. Pixel positions are 0-based, x = column,
y = row.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt
import numpy as np

from .camera import Camera, map_ref_to_frame
from .io import atomic_path, read_catalog, read_json
from .noise import curve_frame_counts
from .registration import StarList

ACCEPTED_COLOUR = "#1f77b4"
REJECTED_COLOUR = "#d62728"
DPI = 110


# --------------------------------------------------------------------------- helpers


def _as_dict(json_or_path) -> dict:
    return json_or_path if isinstance(json_or_path, dict) else read_json(json_or_path)


def _save(fig, out_png) -> None:
    """Write the figure to ``out_png`` under a temporary name, then close it."""
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _message_png(out_png, title: str, message: str) -> None:
    """A plot that says why there is nothing to plot (the report keeps its slot)."""
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    _save(fig, out_png)


def frames_by_time(solution: dict) -> list[dict]:
    """The solution's frame records sorted by DATE-OBS (frames without one keep their place last)."""
    records = list(solution["frames"])
    return sorted(records, key=lambda r: (r.get("date_obs") is None, r.get("date_obs") or ""))


def solution_camera(solution: dict) -> Camera:
    """The reference camera the solution's rotations and focal lengths refer to."""
    cam = solution["camera"]
    return Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam.get("k1", 0.0), cam.get("k2", 0.0))


def _mean_or_nan(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def _rms_or_nan(values) -> float:
    return float(np.sqrt(np.mean(np.square(values)))) if values else float("nan")


def worst_accepted_frame(solution: dict):
    """Frame id of the accepted non-reference frame with the largest residual RMS (None if none)."""
    others = [r for r in solution["frames"]
              if r["status"] == "accepted" and r["frame"] != solution["reference"]]
    if not others:
        return None
    return max(others, key=lambda r: r.get("residual_rms_px") or 0.0)["frame"]


def latest_accepted_frame(solution: dict):
    """Frame id of the last accepted non-reference frame in time (most drift), None if none."""
    others = [r for r in frames_by_time(solution)
              if r["status"] == "accepted" and r["frame"] != solution["reference"]]
    return others[-1]["frame"] if others else None


def matched_positions(frame_catalog, ref_catalog, pose: dict, min_snr: float):
    """Matched star positions (frame_xy (N, 2), ref_xy (N, 2)) from a pose's ``pairs``.

    ``pairs`` index the catalogs after the registration's cut (snr >= min_snr) and sorting by
    flux, brightest first, so both catalogs go through the same StarList as in registration.
    """
    frame_stars = StarList.from_table(read_catalog(frame_catalog), min_snr=min_snr)
    ref_stars = StarList.from_table(read_catalog(ref_catalog), min_snr=min_snr)
    pairs = np.asarray(pose.get("pairs") or np.zeros((0, 2)), int).reshape(-1, 2)
    return frame_stars.xy[pairs[:, 0]], ref_stars.xy[pairs[:, 1]], ref_stars.xy


# --------------------------------------------------------------------------- 1 frame quality


def frame_quality_series(solution: dict, catalogs: dict) -> dict:
    """Per-frame series in time order: names, FWHM px, star count, background ADU, RMS px, status.

    ``catalogs`` maps frame id -> star catalog path; the background is the mean over channels
    of the catalog's ``channel_background``.
    """
    records = frames_by_time(solution)
    metas = {r["frame"]: read_catalog(catalogs[r["frame"]]).meta for r in records if r["frame"] in catalogs}

    def value(x):
        return float("nan") if x is None else float(x)

    return {
        "frame": [r["frame"] for r in records],
        "fwhm_px": np.array([value(r.get("fwhm_px")) for r in records]),
        "n_stars": np.array([value(r.get("n_stars")) for r in records]),
        "background_adu": np.array([_mean_or_nan(metas.get(r["frame"], {}).get("channel_background") or [])
                                    for r in records]),
        "residual_rms_px": np.array([value(r.get("residual_rms_px")) for r in records]),
        "accepted": np.array([r["status"] == "accepted" for r in records]),
        "reason": [r.get("reason") or "" for r in records],
        "reference": [r["frame"] == solution["reference"] for r in records],
    }


def plot_frame_quality(solution_json, catalogs: dict, out_png) -> None:
    """FWHM (px), star count, background (ADU) and residual RMS (px) per frame in time order.

    Rejected frames are red, shaded and annotated with their reason; the reference is starred.
    """
    s = frame_quality_series(_as_dict(solution_json), catalogs)
    n = len(s["frame"])
    x = np.arange(n)
    panels = [("fwhm_px", "FWHM (px)"), ("n_stars", "stars detected"),
              ("background_adu", "sky background (ADU)"), ("residual_rms_px", "registration RMS (px)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.45 * n + 4), 9), sharex=True,
                             layout="constrained")
    bad = ~s["accepted"]
    for ax, (key, label) in zip(axes, panels):
        y = s[key]
        ax.plot(x, y, "-", color="0.75", zorder=1)
        ax.scatter(x[~bad], y[~bad], color=ACCEPTED_COLOUR, zorder=2, label="accepted")
        ax.scatter(x[bad], y[bad], color=REJECTED_COLOUR, marker="X", s=70, zorder=3, label="rejected")
        ref = np.array(s["reference"])
        ax.scatter(x[ref], y[ref], facecolor="none", edgecolor="k", s=160, marker="*", zorder=4,
                   label="reference")
        for i in np.nonzero(bad)[0]:
            ax.axvspan(i - 0.4, i + 0.4, color=REJECTED_COLOUR, alpha=0.12, zorder=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    # reasons go on the top panel, staggered so neighbouring rejections do not overlap
    for k, i in enumerate(np.nonzero(bad)[0]):
        reason = "\n".join(textwrap.wrap(s["reason"][i] or "rejected", 28))
        axes[0].annotate(reason, xy=(i, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(0, 6 + 26 * (k % 3)), textcoords="offset points", ha="center",
                         va="bottom", fontsize=7, color=REJECTED_COLOUR,
                         arrowprops={"arrowstyle": "-", "color": REJECTED_COLOUR, "lw": 0.6})
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(s["frame"], rotation=60, ha="right", fontsize=8)
    axes[-1].set_xlabel("frame (in order of DATE-OBS)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=3)
    n_bad = int(bad.sum())
    fig.suptitle(f"Frame quality over the night: {n - n_bad} accepted, {n_bad} rejected")
    _save(fig, out_png)


# --------------------------------------------------------------------------- 2 star matches


UNDERLAY_MAX_SIDE_PX = 2000  # the preview under a plot is shrunk (box average) to this


def _preview_underlay(ax, stack_png, box) -> None:
    """Show the stacked preview (maybe downsized) faintly under a plot, placed on its box of
    the reference grid: ``box`` = (x0, y0, width, height), reference px (nightstack.framing)."""
    if stack_png is None or not Path(stack_png).is_file():
        ax.set_facecolor("0.08")
        return
    from PIL import Image

    x0, y0, width_px, height_px = box
    with Image.open(stack_png) as im:
        grey = im.convert("L")
    # a plot shows ~1000 px across: a 24 MP preview would cost matplotlib 1 GB to resample
    factor = -(-max(grey.size) // UNDERLAY_MAX_SIDE_PX)
    if factor > 1:
        grey = grey.reduce(factor)
    ax.imshow(np.asarray(grey), cmap="gray", alpha=0.55, zorder=0,
              extent=(x0 - 0.5, x0 + width_px - 0.5, y0 + height_px - 0.5, y0 - 0.5))


def stack_box(stack_info_json, width_px: int, height_px: int) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the stack in reference px from ``stack_linear.json``'s
    ``info.framing``; the reference frame's grid when there is none."""
    info = {}
    if stack_info_json is not None and (isinstance(stack_info_json, dict) or Path(stack_info_json).is_file()):
        info = _as_dict(stack_info_json).get("info", {})
    framing = info.get("framing") or {}
    if "x0_px" not in framing:
        return 0, 0, int(width_px), int(height_px)
    return (int(framing["x0_px"]), int(framing["y0_px"]), int(framing["width_px"]),
            int(framing["height_px"]))


def plot_star_matches(frame_catalog, ref_catalog, pose_json, out_png, min_snr: float = 0.0,
                      stack_png=None, stack_info_json=None) -> None:
    """Stars of one frame matched to the reference, drawn as lines from reference to frame position.

    Reference stars are open circles, the frame's matched stars dots; ``min_snr`` must be the
    registration's so the pose's ``pairs`` index the same star lists. The preview underlay is
    placed by the stack's framing (``stack_linear.json``).
    """
    pose = _as_dict(pose_json)
    name = pose.get("frame", Path(frame_catalog).stem)
    ref_meta = read_catalog(ref_catalog).meta
    w, h = int(ref_meta["width_px"]), int(ref_meta["height_px"])
    if pose.get("status") != "accepted" or not pose.get("pairs"):
        _message_png(out_png, f"Star matches of {name}", f"no matches: {pose.get('reason') or 'rejected'}")
        return
    frame_xy, ref_xy, all_ref_xy = matched_positions(frame_catalog, ref_catalog, pose, min_snr)
    fig, ax = plt.subplots(figsize=(11, 11 * h / w + 1))
    _preview_underlay(ax, stack_png, stack_box(stack_info_json, w, h))
    ax.scatter(all_ref_xy[:, 0], all_ref_xy[:, 1], s=10, facecolor="none", edgecolor="0.6", lw=0.6,
               label=f"reference stars ({len(all_ref_xy)})", zorder=1)
    segments = np.stack([ref_xy, frame_xy], axis=1)
    from matplotlib.collections import LineCollection

    ax.add_collection(LineCollection(segments, colors="#ffbf00", linewidths=0.9, zorder=2))
    ax.scatter(ref_xy[:, 0], ref_xy[:, 1], s=22, facecolor="none", edgecolor="#00e5ff", lw=0.9,
               label=f"matched in the reference ({len(ref_xy)})", zorder=3)
    ax.scatter(frame_xy[:, 0], frame_xy[:, 1], s=8, color="#ff4fd8",
               label=f"same stars in {name}", zorder=4)
    shift = np.median(frame_xy - ref_xy, axis=0)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    ax.set_title(f"{name} matched to the reference: {len(ref_xy)} star pairs, "
                 f"median shift ({shift[0]:+.1f}, {shift[1]:+.1f}) px")
    _save(fig, out_png)


# --------------------------------------------------------------------------- 3 residual field


def registration_residuals(solution: dict, frame: str, frame_catalog, ref_catalog, pose: dict,
                           min_snr: float = 0.0):
    """Reference positions (N, 2) and residuals (N, 2, px): observed frame star - solution's mapping.

    The mapping is the global solution's reference-to-frame model (rotation, focal length and
    radial distortion), applied to the matched reference stars of the frame's pose.
    """
    rec = next(r for r in solution["frames"] if r["frame"] == frame)
    frame_xy, ref_xy, _ = matched_positions(frame_catalog, ref_catalog, pose, min_snr)
    ref_cam = solution_camera(solution)
    predicted = map_ref_to_frame(ref_xy, ref_cam, ref_cam.with_focal(rec["focal_px"]),
                                 np.asarray(rec["rotation"], float))
    return ref_xy, frame_xy - predicted


def _nice_length(value: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above ``value`` (a round scale-bar length)."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    exp = np.floor(np.log10(value))
    for step in (5.0, 2.0, 1.0):
        if step * 10**exp <= value:
            return float(step * 10**exp)
    return float(10**exp)


def plot_residual_field(solution_json, frame: str, frame_catalog, ref_catalog, pose_json, out_png,
                        min_snr: float = 0.0) -> None:
    """Residual vectors (exaggerated quiver with a scale bar) across the field for one frame.

    Arrows start at the reference star positions and show observed minus modelled frame
    position; systematic patterns (rotation, distortion) show as coherent flows.
    """
    solution = _as_dict(solution_json)
    pose = _as_dict(pose_json)
    cam = solution["camera"]
    w, h = int(cam["width_px"]), int(cam["height_px"])
    if pose.get("status") != "accepted" or not pose.get("pairs"):
        _message_png(out_png, f"Registration residuals of {frame}", "no accepted pose to show")
        return
    xy, resid = registration_residuals(solution, frame, frame_catalog, ref_catalog, pose, min_snr)
    length = np.hypot(resid[:, 0], resid[:, 1])
    typical = float(np.percentile(length, 90)) if len(length) else 0.0
    # the 90th-percentile arrow spans about 6 % of the frame width
    exaggeration = 0.06 * w / typical if typical > 0 else 1.0
    fig, ax = plt.subplots(figsize=(11, 11 * h / w + 1))
    q = ax.quiver(xy[:, 0], xy[:, 1], resid[:, 0], resid[:, 1], length, cmap="plasma",
                  angles="xy", scale_units="xy", scale=1.0 / exaggeration, width=0.0025)
    bar_px = _nice_length(typical)
    ax.quiverkey(q, 0.82, 1.03, bar_px, f"{bar_px:g} px residual (x{exaggeration:.0f})",
                 labelpos="E", coordinates="axes")
    fig.colorbar(q, ax=ax, shrink=0.7, label="residual (px)")
    rms = float(np.sqrt(np.mean(length**2))) if len(length) else float("nan")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("reference x (px)")
    ax.set_ylabel("reference y (px)")
    ax.set_title(f"Registration residuals of the worst accepted frame {frame}: "
                 f"{len(xy)} stars, RMS {rms:.3f} px", pad=28)
    ax.grid(alpha=0.25)
    _save(fig, out_png)


# --------------------------------------------------------------------------- 4 noise curve


def expected_noise_curve(noise_adu, weights) -> np.ndarray:
    """Noise (ADU) of the weighted mean of the first N frames, N = 1..len: sqrt(sum w^2 s^2) / sum w."""
    noise = np.asarray(noise_adu, float)
    w = np.asarray(weights, float)
    return np.sqrt(np.cumsum((w * noise) ** 2)) / np.cumsum(w)


def _frame_weights(info: dict, frames: list[str]) -> tuple[np.ndarray, bool]:
    """Stacking weights of ``frames`` from stack info (keyed by calibrated path), else equal."""
    weights = (info or {}).get("weights") or {}
    by_frame = {Path(p).stem: float(v) for p, v in weights.items()}
    if by_frame and all(f in by_frame for f in frames):
        return np.array([by_frame[f] for f in frames]), True
    return np.ones(len(frames)), False


def plot_noise_curve(solution_json, catalogs: dict, out_png, stack_info_json=None) -> None:
    """How the stack's background noise (ADU, reference flux units) fell as frames were added.

    Measured values come from ``stack_linear.json`` ``info.noise_curve`` ({"n_frames": [...],
    "noise_adu": [...], "stack_noise_adu": noise of the final combined stack}) when the stacker
    wrote one (nightstack.noise); the expected curve of a weighted mean, from each frame's
    ``channel_noise`` (divided by its flux scale) and the stack weights, is drawn with it, or
    alone when nothing was measured. The title says which.
    """
    solution = _as_dict(solution_json)
    info = {}
    if stack_info_json is not None and (isinstance(stack_info_json, dict) or Path(stack_info_json).is_file()):
        info = _as_dict(stack_info_json).get("info", {})
    used = [r for r in frames_by_time(solution) if r["status"] == "accepted"]
    if not used:
        _message_png(out_png, "Noise versus frames", "no accepted frame")
        return
    frames = [r["frame"] for r in used]
    scale = np.array([r.get("flux_scale") or 1.0 for r in used], float)
    noise = np.array([_rms_or_nan(read_catalog(catalogs[f]).meta.get("channel_noise") or []) for f in frames])
    noise = noise / np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    weights, weighted = _frame_weights(info, frames)
    n = np.arange(1, len(frames) + 1)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    measured = info.get("noise_curve")
    curve = expected_noise_curve(noise, weights)
    how = "stack weights" if weighted else "equal weights"
    if measured:
        ax.plot(n, curve, "-", color="#ff7f0e", lw=1.2, label=f"expected from frame noise and {how}")
        ax.plot(measured["n_frames"], measured["noise_adu"], "o-", color=ACCEPTED_COLOUR,
                label="measured: weighted mean of the first N frames")
        final = measured.get("stack_noise_adu")
        if final is not None:
            ax.scatter([measured["n_frames"][-1]], [final], marker="*", s=180, color="k", zorder=5,
                       label=f"measured: final stack ({info.get('method', 'combined')}), {final:.3g} ADU")
        gain = measured["noise_adu"][0] / measured["noise_adu"][-1]
        n_last = measured["n_frames"][-1]
        title = (f"Stack noise as frames were added (measured): {gain:.2f}x lower with "
                 f"{n_last} frames than with one (sqrt({n_last}) = {np.sqrt(n_last):.2f})")
    else:
        ax.plot(n, curve, "o-", color=ACCEPTED_COLOUR, label=f"expected from frame noise and {how}")
        title = "Stack noise as frames were added (expected from per-frame noise, not measured)"
    ax.plot(n, noise[0] / np.sqrt(n), "--", color="0.5", label=r"ideal $\sigma_1/\sqrt{N}$")
    ax.scatter(n, noise, s=14, color="0.6", zorder=1, label="single frame noise")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = curve_frame_counts(len(n), max_points=12)  # all N, or a readable log-spaced few
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(v) for v in ticks])
    from matplotlib.ticker import LogFormatter, NullLocator

    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("frames combined (in order of DATE-OBS)")
    ax.set_ylabel("background noise (ADU, reference flux scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, out_png)


# --------------------------------------------------------------------------- 5 light pollution


def channel_names(n_channels: int) -> tuple[str, ...]:
    """Display names of a stack's channels: R, G, B for colour, L for mono."""
    if n_channels == 3:
        return ("R", "G", "B")
    return ("L",) if n_channels == 1 else tuple(f"channel {i}" for i in range(n_channels))


def light_pollution_summary(model) -> dict:
    """Sky level and gradient of a light-pollution model (C, h, w) or (h, w), ADU.

    Returns {"sky_adu": (C,) median level, "ptp_adu": (C,) peak-to-peak, "ptp_percent": (C,)
    peak-to-peak / sky level x 100, and the same three for the mean of the channels under
    "mean_sky_adu", "mean_ptp_adu", "mean_ptp_percent"}.
    """
    m = np.asarray(model, dtype=np.float64)
    m = m[None] if m.ndim == 2 else m
    flat = m.reshape(len(m), -1)
    sky, ptp = np.median(flat, axis=1), np.ptp(flat, axis=1)
    mean = flat.mean(axis=0)
    mean_sky, mean_ptp = float(np.median(mean)), float(np.ptp(mean))
    with np.errstate(divide="ignore", invalid="ignore"):
        percent = np.where(sky > 0, 100.0 * ptp / sky, np.nan)
    return {"sky_adu": sky, "ptp_adu": ptp, "ptp_percent": percent, "mean_sky_adu": mean_sky,
            "mean_ptp_adu": mean_ptp,
            "mean_ptp_percent": 100.0 * mean_ptp / mean_sky if mean_sky > 0 else float("nan")}


def _model_image(ax, fig, data, extent, title: str, cmap: str, label: str, limits=None) -> None:
    """One panel: an image of a (binned) model on stack pixel axes, with its colorbar."""
    vmin, vmax = limits if limits is not None else (None, None)
    im = ax.imshow(data, cmap=cmap, extent=extent, vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.85, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")


def plot_light_pollution(model_fits, out_png, hdu=0, subject: str | None = None) -> None:
    """The light-pollution model fitted to the stack (``background_model.fits``), per channel.

    Top row: each channel's model (ADU) with its sky level and peak-to-peak gradient. Colour
    stacks get a second row: the gradient of the channel mean, and the R - G and B - G
    differences of the gradients (each channel minus its median level), where a coloured glow
    (sodium lamps, moonlight) shows as a tint. The title gives the peak-to-peak gradient of the
    channel mean in ADU and in % of the sky level.
    """
    from astropy.io import fits

    with fits.open(model_fits) as hdul:
        data, header = np.asarray(hdul[hdu].data, dtype=np.float64), hdul[hdu].header.copy()
    model = data
    model = model[None] if model.ndim == 2 else model
    width = int(header.get("STACKW", model.shape[-1]))
    height = int(header.get("STACKH", model.shape[-2]))
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    s = light_pollution_summary(model)
    names = channel_names(len(model))
    colour = len(model) == 3
    n_cols = len(model)
    panel_w = 4.6 if n_cols > 1 else 8.0
    fig, axes = plt.subplots(2 if colour else 1, n_cols, squeeze=False, layout="constrained",
                             figsize=(panel_w * n_cols, (2 if colour else 1) * panel_w * height / width + 1.2))
    for ax, name, channel, sky, ptp, pct in zip(axes[0], names, model, s["sky_adu"], s["ptp_adu"],
                                                 s["ptp_percent"]):
        _model_image(ax, fig, channel, extent, f"{name}: sky {sky:.4g} ADU, peak-to-peak "
                     f"{ptp:.3g} ADU ({pct:.2g} %)", "magma", "model (ADU)")
    if colour:
        gradient = model - s["sky_adu"][:, None, None]
        _model_image(axes[1, 0], fig, gradient.mean(axis=0), extent,
                     "gradient of the channel mean (model - sky level)", "magma", "ADU")
        tint = [gradient[0] - gradient[1], gradient[2] - gradient[1]]
        reach = max(float(np.max(np.abs(tint))), 1e-6)
        for ax, diff, label in zip(axes[1, 1:], tint, ("R - G", "B - G")):
            _model_image(ax, fig, diff, extent, f"tint: {label} of the gradients (ADU)", "RdBu_r",
                         f"{label} (ADU)", limits=(-reach, reach))
    removed = bool(header.get("BGREMOVD", True))
    verb = "removed from the stack" if removed else "found in the stack (not removed: after_stack is off)"
    verb = subject or verb
    fig.suptitle(f"Light-pollution model {verb}: peak-to-peak {s['mean_ptp_adu']:.3g} ADU, "
                 f"{s['mean_ptp_percent']:.2g} % of the sky level ({s['mean_sky_adu']:.4g} ADU)")
    _save(fig, out_png)


# --------------------------------------------------------------------------- all of a night


def write_night_plots(solution_json, catalogs: dict, poses: dict, out: dict, min_snr: float = 0.0,
                      stack_info_json=None, stack_png=None, background_model=None,
                      calibrated: dict | None = None) -> None:
    """All plots of a night; ``out`` maps "quality", "matches", "residuals", "noise" and, with a
    ``background_model`` FITS, "pollution" -> PNG path. The light-pollution plot shows the
    reference frame's own model when ``calibrated`` (frame id -> calibrated FITS) has it (the
    night's real glow), else the model left in the stack.

    ``catalogs`` and ``poses`` map frame id -> path; ``min_snr`` is the registration's star cut.
    The match plot shows the last accepted frame in time (most drift from the reference), the
    residual plot the accepted frame with the largest residual RMS.
    """
    solution = _as_dict(solution_json)
    ref = solution["reference"]
    plot_frame_quality(solution, catalogs, out["quality"])
    shown = latest_accepted_frame(solution) or ref
    plot_star_matches(catalogs[shown], catalogs[ref], poses[shown], out["matches"], min_snr, stack_png,
                      stack_info_json)
    worst = worst_accepted_frame(solution) or ref
    plot_residual_field(solution, worst, catalogs[worst], catalogs[ref], poses[worst], out["residuals"], min_snr)
    plot_noise_curve(solution, catalogs, out["noise"], stack_info_json)
    if "pollution" not in out:
        return
    frame_model = _frame_light_pollution(calibrated or {}, ref)
    if frame_model is not None:
        plot_light_pollution(frame_model, out["pollution"], hdu="LPMODEL",
                             subject=f"of the reference frame {solution.get('reference_file') or ref}, "
                             "removed before star detection")
    elif background_model is not None:
        plot_light_pollution(background_model, out["pollution"])


def _frame_light_pollution(calibrated: dict, frame: str):
    """Path of ``frame``'s calibrated FITS if it carries its light-pollution model, else None."""
    from astropy.io import fits

    path = calibrated.get(frame)
    if not path or not Path(path).is_file():
        return None
    with fits.open(path) as hdul:
        return path if "LPMODEL" in hdul else None
