"""Calibrated frames stored as float32 vs tile-compressed (config output.calibrated_frames).

For each data set the workflow runs twice in fresh work dirs, identical but for
output.calibrated_frames, one after the other on the same cores. Then, back to back:

- bytes per calibrated frame (median over the night's frames) and their ratio;
- write and read time of one frame (the reference frame's data, best of 3): whole-file read
  (io.read_fits_image) and one 256 x 256 box (io.open_fits_data, as the stacker reads);
- the stack step alone (steps.stack_step in a fresh process, best of 2, alternating formats),
  with that process's peak resident memory;
- quality: stack noise in empty sky (clipped std, same mask and limits for both), the
  stacks' difference in units of that noise, the same two figures for the compressed frames
  stacked with the float32 run's solution and catalogs (the quantisation alone, without the
  slightly different weights and normalisation re-derived from the compressed frames),
  per-frame star catalogs matched star by star (centroid shift over FWHM / SNR, flux change
  over flux / SNR), and the stack FWHM on the reference frame's bright stars;
- the projected disk of 500 frames of 24 MP (3 channels) in each format.

    python benchmarks/bench_calibrated_storage.py                 # demo, als, seestar
    python benchmarks/bench_calibrated_storage.py --sets als --keep

Writes benchmarks/out/storage_<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_pipeline import OUT, REPO, load_data_set, run_timed, tool_env

FORMATS = ("float32", "compressed")
PROJECTION = {"frames": 500, "pixels": 24e6, "channels": 3}
BOX_PX = 256


# ----------------------------------------------------------------------------- runs


def run_workflow(ds, workdir: Path, fmt: str, reference: str = "auto") -> dict:
    """The shipped config on the data set with output.calibrated_frames = ``fmt``."""
    import yaml

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["nights"] = {ds.name: str(ds.folder)}
    cfg["results"] = "results"
    cfg["output"]["calibrated_frames"] = fmt
    cfg["reference"] = reference
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2"]
    result = run_timed(cmd, workdir, workdir / "snakemake.log")
    result.pop("processes", None)
    if result["returncode"] != 0:
        raise SystemExit(f"workflow failed in {workdir}: see snakemake.log")
    return result


STACK_SNIPPET = """
import json, resource, sys, time, yaml
from nightstack.io import read_json
from nightstack.steps import stack_step
night, res, out, cal_dir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
cfg = yaml.safe_load(open(sys.argv[4]))
frames = [f["frame"] for f in read_json(f"{res}/solution.json")["frames"]]
cal = {f: f"{cal_dir}/calibrated/{f}.fits" for f in frames}
cat = {f: f"{res}/stars/{f}.ecsv" for f in frames}
t = time.perf_counter()
stack_step(night, f"{res}/solution.json", cal, cat, out, cfg["stacking"])
print(json.dumps({"stack_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def time_stack_step(name: str, workdir: Path, frames_from: Path | None = None) -> dict:
    """steps.stack_step on a finished run in a fresh process: seconds and peak RSS (MB).

    The solution and catalogs are the run's; the calibrated frames those of ``frames_from``
    (another work dir) if given. The stack goes to <workdir>/scratch/.
    """
    res = workdir / "results" / name
    cal = (frames_from or workdir) / "results" / name
    out = workdir / "scratch" / ("stack_linear.fits" if frames_from is None else "other_frames.fits")
    out.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", STACK_SNIPPET, name, str(res), str(out), str(workdir / "config.yaml"),
           str(cal)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- per frame


def best_of(fn, n: int = 3) -> float:
    """Shortest wall time (s) of ``n`` calls of fn()."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_box(path: Path, y0: int, x0: int) -> np.ndarray:
    """The (C, BOX_PX, BOX_PX) box at (y0, x0) of a frame, read as the stacker reads it."""
    from nightstack.io import open_fits_data

    hdul, data = open_fits_data(path)
    try:
        return np.asarray(data[:, y0:y0 + BOX_PX, x0:x0 + BOX_PX], dtype=np.float32)
    finally:
        del data
        hdul.close()


def frame_io(data: np.ndarray, folder: Path) -> dict:
    """Write / whole read / box read times (s) of one (C, H, W) frame in each format."""
    from nightstack.io import read_fits_image, write_fits_image

    folder.mkdir(parents=True, exist_ok=True)
    _, h, w = data.shape
    y0, x0 = (h - BOX_PX) // 2, (w - BOX_PX) // 2
    out = {}
    for fmt in FORMATS:
        path = folder / f"{fmt}.fits"
        write = best_of(partial(write_fits_image, path, data, {"NSSTATUS": "ok"},
                                compress=fmt == "compressed", seed=1))
        out[fmt] = {"write_s": write, "read_s": best_of(partial(read_fits_image, path, memmap=False)),
                    "box_read_s": best_of(partial(read_box, path, y0, x0), 5),
                    "bytes": path.stat().st_size}
    return out


# ----------------------------------------------------------------------------- quality


def sky_mask(stack: np.ndarray) -> np.ndarray:
    """(H, W) pixels far from stars and edges: luminance within 3 noise of a 15 px median."""
    from scipy import ndimage

    lum = np.nan_to_num(stack).mean(axis=0)
    resid = lum - ndimage.median_filter(lum, 15)
    noise = 1.4826 * np.median(np.abs(resid))
    mask = ~ndimage.binary_dilation(np.abs(resid) > 3 * noise, iterations=4)
    mask &= np.isfinite(stack).all(axis=0)
    edge = 20
    mask[:edge], mask[-edge:], mask[:, :edge], mask[:, -edge:] = False, False, False, False
    return mask


def sky_noise(image: np.ndarray, mask: np.ndarray, limits=None):
    """Per-channel std (ADU) of a (C, H, W) image over mask, values outside ``limits`` (C, 2)
    left out; limits default to median +- 5 x 1.4826 MAD. Returns (std, limits).

    Compare two images with the same limits: a plain MAD jitters by +-0.2 % under any tiny
    perturbation of the values (it is one order statistic), a clipped std does not.
    """
    values = image[:, mask]
    if limits is None:
        med = np.median(values, axis=1)
        mad = 1.4826 * np.median(np.abs(values - med[:, None]), axis=1)
        limits = np.column_stack([med - 5 * mad, med + 5 * mad])
    keep = (values >= limits[:, :1]) & (values <= limits[:, 1:])
    std = np.array([v[k].std() for v, k in zip(values, keep)])
    return std, limits


def stack_quality(results: dict[str, Path], name: str) -> dict:
    """Sky noise, difference and star FWHM of the two stacks (float32 vs compressed)."""
    from astropy.io import fits

    from nightstack.io import read_catalog, read_json
    from nightstack.stars import StarConfig, fit_stars, luminance

    stacks = {fmt: fits.getdata(results[fmt] / name / "stack_linear.fits").astype(np.float64)
              for fmt in FORMATS}
    same = fits.getdata(results["float32"].parent / "scratch" / "other_frames.fits").astype(np.float64)
    mask = sky_mask(stacks["float32"])
    noise, limits = {}, None
    for fmt in FORMATS:
        noise[fmt], limits = sky_noise(stacks[fmt], mask, limits)
    diff = (stacks["compressed"] - stacks["float32"])[:, mask]
    ref = read_json(results["float32"] / name / "solution.json")["reference"]
    cat = read_catalog(results["float32"] / name / "stars" / f"{ref}.ecsv")
    bright = np.argsort(-np.asarray(cat["snr"]))[:150]
    fwhm = {}
    for fmt in FORMATS:
        fit = fit_stars(luminance(np.nan_to_num(stacks[fmt]).astype(np.float32)),
                        np.asarray(cat["x"])[bright], np.asarray(cat["y"])[bright], StarConfig())
        ok = np.asarray(fit["ok"], bool) & np.isfinite(fit["fwhm_px"])
        fwhm[fmt] = float(np.median(np.asarray(fit["fwhm_px"])[ok]))
    return {
        "sky_fraction": float(mask.mean()),
        "sky_noise": {fmt: noise[fmt].tolist() for fmt in FORMATS},
        "noise_rise_pct": (100 * (noise["compressed"] / noise["float32"] - 1)).tolist(),
        "diff_std_over_noise": (diff.std(axis=1) / noise["float32"]).tolist(),
        # compressed frames stacked with the float32 run's solution and catalogs (same weights
        # and normalisation): the quantisation alone
        "same_solution_noise_rise_pct": (100 * (sky_noise(same, mask, limits)[0] / noise["float32"] - 1)).tolist(),
        "same_solution_diff_std_over_noise": ((same - stacks["float32"])[:, mask].std(axis=1)
                                              / noise["float32"]).tolist(),
        "stack_fwhm_px": fwhm,
    }


def star_agreement(results: dict[str, Path], name: str) -> dict:
    """Per-frame catalogs matched star by star (nearest within 0.5 px): shifts in error units."""
    from scipy.spatial import cKDTree

    from nightstack.io import read_catalog

    shifts, fluxes, fwhm_rel, counts = [], [], [], []
    for path in sorted((results["float32"] / name / "stars").glob("*.ecsv")):
        a = read_catalog(path)
        b = read_catalog(results["compressed"] / name / "stars" / path.name)
        if a.meta.get("status") != "ok" or not len(b):
            continue
        counts.append((len(a), len(b)))
        xy_a = np.column_stack([a["x"], a["y"]])
        dist, idx = cKDTree(np.column_stack([b["x"], b["y"]])).query(xy_a, distance_upper_bound=0.5)
        ok = np.isfinite(dist)
        snr, fw = np.asarray(a["snr"])[ok], np.asarray(a["fwhm_px"])[ok]
        shifts.append(dist[ok] * snr / fw)
        flux_a, flux_b = np.asarray(a["flux"])[ok], np.asarray(b["flux"])[idx[ok]]
        fluxes.append(np.abs(flux_b - flux_a) / flux_a * snr)
        fwhm_rel.append(np.asarray(b["fwhm_px"])[idx[ok]] / fw - 1)
    shifts, fluxes, fwhm_rel = (np.concatenate(v) for v in (shifts, fluxes, fwhm_rel))
    return {
        "stars_float32_compressed": [int(sum(c[0] for c in counts)), int(sum(c[1] for c in counts))],
        "matched": int(shifts.size),
        "centroid_shift_over_error": {"median": float(np.median(shifts)), "p99": float(np.percentile(shifts, 99))},
        "flux_change_over_error": {"median": float(np.median(fluxes)), "p99": float(np.percentile(fluxes, 99))},
        "fwhm_change_pct_median": float(100 * np.median(fwhm_rel)),
    }


# ----------------------------------------------------------------------------- one data set


def frame_bytes(results: Path, name: str) -> tuple[float, tuple]:
    """Median bytes of a night's calibrated frames (stored image ones) and the image shape."""
    from nightstack.io import read_fits_image

    paths = sorted((results / name / "calibrated").glob("*.fits"))
    images = [p for p in paths if read_fits_image(p)[1].get("NSSTATUS") == "ok"]
    shape = read_fits_image(images[0])[0].shape
    return float(np.median([p.stat().st_size for p in images])), shape


def measure(set_name: str, keep: bool) -> dict:
    """Everything above for one data set."""
    from nightstack.io import read_fits_image, read_json

    ds = load_data_set(set_name)
    base = OUT / "storage" / set_name
    work = {fmt: base / fmt for fmt in FORMATS}
    for path in work.values():
        if path.exists() and not keep:
            import shutil

            shutil.rmtree(path)
    # the compressed run uses the float32 run's reference, so both stacks share one pixel grid
    # (with "auto", near-ties in star counts can pick another frame: it did on the demo night)
    runs = {"float32": run_workflow(ds, work["float32"], "float32")}
    results = {fmt: work[fmt] / "results" for fmt in FORMATS}
    reference = read_json(results["float32"] / ds.name / "solution.json")["reference"]
    runs["compressed"] = run_workflow(ds, work["compressed"], "compressed", reference)
    row = {"set": set_name, "frames": len(ds.lights),
           "workflow_s": {fmt: runs[fmt]["wall_s"] for fmt in FORMATS}}
    for fmt in FORMATS:
        row.setdefault("frame_bytes", {})[fmt], shape = frame_bytes(results[fmt], ds.name)
    row["shape"] = list(shape)
    row["ratio"] = row["frame_bytes"]["float32"] / row["frame_bytes"]["compressed"]
    row["bits_per_value"] = 8 * row["frame_bytes"]["compressed"] / float(np.prod(shape))
    ref = read_json(results["float32"] / ds.name / "solution.json")["reference"]
    data, _ = read_fits_image(results["float32"] / ds.name / "calibrated" / f"{ref}.fits", memmap=False)
    row["io"] = frame_io(np.asarray(data, np.float32), base / "io")
    stack_runs = {fmt: [] for fmt in FORMATS}
    for _ in range(2):
        for fmt in FORMATS:
            stack_runs[fmt].append(time_stack_step(ds.name, work[fmt]))
    time_stack_step(ds.name, work["float32"], frames_from=work["compressed"])
    row["stack_step_s"] = {fmt: min(r["stack_s"] for r in stack_runs[fmt]) for fmt in FORMATS}
    row["stack_peak_rss_mb"] = {fmt: max(r["peak_rss_mb"] for r in stack_runs[fmt]) for fmt in FORMATS}
    row["quality"] = stack_quality(results, ds.name)
    row["stars"] = star_agreement(results, ds.name)
    values = PROJECTION["frames"] * PROJECTION["pixels"] * PROJECTION["channels"]
    row["projected_500x24MP_GB"] = {"float32": values * 4 / 1e9,
                                    "compressed": values * row["bits_per_value"] / 8 / 1e9}
    return row


def table(rows: list[dict]) -> str:
    """Markdown summary of the rows."""
    lines = [("| set | frame | MB/frame f32 | MB/frame rice | ratio | write f32/rice (s) | read f32/rice (s) "
             "| box f32/rice (ms) | stack f32/rice (s) | stack RSS f32/rice (MB) | sky noise rise (%) "
             "| diff/noise | centroid shift/err (med, p99) | flux change/err (med, p99) | stack FWHM f32/rice "
             "| 500x24MP f32/rice (GB) | same solution: noise rise (%), diff/noise |"), "|" + "---|" * 17]
    for r in rows:
        io, q, s = r["io"], r["quality"], r["stars"]
        lines.append(
            f"| {r['set']} ({r['frames']}) | {r['shape'][2]}x{r['shape'][1]}x{r['shape'][0]} "
            f"| {r['frame_bytes']['float32'] / 1e6:.2f} | {r['frame_bytes']['compressed'] / 1e6:.2f} "
            f"| {r['ratio']:.2f} | {io['float32']['write_s']:.3f} / {io['compressed']['write_s']:.3f} "
            f"| {io['float32']['read_s']:.3f} / {io['compressed']['read_s']:.3f} "
            f"| {1e3 * io['float32']['box_read_s']:.1f} / {1e3 * io['compressed']['box_read_s']:.1f} "
            f"| {r['stack_step_s']['float32']:.1f} / {r['stack_step_s']['compressed']:.1f} "
            f"| {r['stack_peak_rss_mb']['float32']:.0f} / {r['stack_peak_rss_mb']['compressed']:.0f} "
            f"| {', '.join(f'{v:+.3f}' for v in q['noise_rise_pct'])} "
            f"| {max(q['diff_std_over_noise']):.3f} "
            f"| {s['centroid_shift_over_error']['median']:.3f}, {s['centroid_shift_over_error']['p99']:.2f} "
            f"| {s['flux_change_over_error']['median']:.3f}, {s['flux_change_over_error']['p99']:.2f} "
            f"| {q['stack_fwhm_px']['float32']:.3f} / {q['stack_fwhm_px']['compressed']:.3f} "
            f"| {r['projected_500x24MP_GB']['float32']:.0f} / {r['projected_500x24MP_GB']['compressed']:.0f} "
            f"| {', '.join(f'{v:+.3f}' for v in q['same_solution_noise_rise_pct'])}; "
            f"{max(q['same_solution_diff_std_over_noise']):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="demo,als,seestar")
    parser.add_argument("--keep", action="store_true", help="reuse finished work dirs")
    args = parser.parse_args(argv)
    rows = []
    for name in args.sets.split(","):
        print(f"{name} ...", flush=True)
        rows.append(measure(name.strip(), args.keep))
    text = table(rows)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"storage_{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"rows": rows, "table": text}, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
