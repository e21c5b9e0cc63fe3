"""Running the Snakemake workflow from tests, and measuring its results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from astropy.io import fits

from nightstack.io import read_catalog, read_fits_image, read_json
from nightstack.stars import StarConfig, fit_stars, luminance

REPO = Path(__file__).resolve().parents[1]


def write_config(workdir: Path, **overrides) -> Path:
    """config.yaml in ``workdir``: the shipped one with top-level keys replaced."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict) and key != "nights":
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = Path(workdir) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args, cores: int = 2, timeout: int = 1800, check: bool = True):
    """Run the workflow in ``workdir`` (which holds config.yaml); returns CompletedProcess."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", str(cores), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    text = proc.stdout + proc.stderr
    jobs: dict[str, int] = {}
    if "Job stats" not in text:
        return jobs
    table = text.split("Job stats:")[1]
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def read_stack(path) -> np.ndarray:
    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float64)


def fwhm_at(image, xy, cfg=StarConfig()) -> np.ndarray:
    """FWHM (px) of the stars at positions xy (N, 2) of an image, by the library's Gaussian fit."""
    lum = luminance(np.nan_to_num(np.asarray(image, dtype=np.float32)))
    fit = fit_stars(lum, xy[:, 0], xy[:, 1], cfg)
    ok = np.asarray(fit["ok"], bool) & np.isfinite(fit["fwhm_px"])
    return np.asarray(fit["fwhm_px"])[ok]


def good_reference_stars(catalog_path, n: int = 150, min_snr: float = 20.0) -> np.ndarray:
    """Positions of bright, unsaturated, round stars of a catalog, away from the borders."""
    cat = read_catalog(catalog_path)
    if np.sum(np.asarray(cat["snr"]) > min_snr) < 20:
        min_snr = float(np.sort(np.asarray(cat["snr"]))[-min(len(cat), 30)])
    w, h = cat.meta["width_px"], cat.meta["height_px"]
    x, y = np.asarray(cat["x"]), np.asarray(cat["y"])
    peak = np.asarray(cat["peak"])
    sel = (np.asarray(cat["snr"]) > min_snr) & (np.asarray(cat["ellipticity"]) < 0.3)
    sel &= (x > 20) & (y > 20) & (x < w - 21) & (y < h - 21)
    saturation = cat.meta.get("saturation_adu")
    if saturation is not None and np.isfinite(saturation):
        sel &= peak < 0.9 * saturation
    idx = np.nonzero(sel)[0][:n]
    return np.column_stack([x[idx], y[idx]])


def night_fwhm_figures(results: Path, night: str):
    """(stack FWHM, best single-frame FWHM, median single-frame FWHM) on the same stars."""
    sol = read_json(results / night / "solution.json")
    ref = sol["reference"]
    xy = good_reference_stars(results / night / "stars" / f"{ref}.ecsv")
    stack = read_stack(results / night / "stack_linear.fits")
    stack_fwhm = float(np.median(fwhm_at(stack, xy)))
    singles = []
    from nightstack.camera import Camera, map_ref_to_frame

    cam = sol["camera"]
    ref_cam = Camera(cam["width_px"], cam["height_px"], cam["focal_px"], cam["k1"], cam["k2"])
    for rec in sol["frames"]:
        if rec["status"] != "accepted":
            continue
        data, _ = read_fits_image(results / night / "calibrated" / f"{rec['frame']}.fits")
        data = np.asarray(data, dtype=np.float32)
        if rec["frame"] == ref:
            pts = xy
        else:
            pts = map_ref_to_frame(xy, ref_cam, ref_cam.with_focal(rec["focal_px"]), np.asarray(rec["rotation"]))
        inside = (pts[:, 0] > 20) & (pts[:, 1] > 20) & (pts[:, 0] < data.shape[-1] - 21) & (pts[:, 1] < data.shape[-2] - 21)
        singles.append(float(np.median(fwhm_at(data, pts[inside]))))
    return stack_fwhm, float(np.min(singles)), float(np.median(singles))
