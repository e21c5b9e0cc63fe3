"""The solve step (global bundle adjustment) on N frames of any size, from star catalogs
projected from a generated sky: time, peak memory and pose error against the truth.

The solve reads only star catalogs and per-frame poses, never an image, so a 500 x 24 MP
night's solve can be measured without rendering, calibrating and detecting 500 frames (an
hour on 2 cores). The sky, the cameras and the frames' rotations are those of the demo
generator (nightstack.demo: a fixed tripod, lights every ``cadence_s``) with the generated
nights' field of view and star density (bench_pipeline.generated_config). Each frame's
catalog holds its brightest ``--stars`` stars (the stars step keeps at most 5,000), at
their true positions plus Gaussian noise of their centroid error (0.6 FWHM / SNR). Then the
workflow's own reference, pose (2 processes) and solve steps run on them; the solve runs in
a fresh process under /usr/bin/time.

    python benchmarks/bench_solve_scale.py --frames 500 --size 6000x4000
    python benchmarks/bench_solve_scale.py --frames 16 --size 6000x4000

Prints JSON: solve wall time and peak memory, frames accepted, observations, and each
frame's largest position error over a grid of the frame against the truth (px).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# SNR of the faintest catalogued star: the 1st percentile of the SNR in the catalogs of the
# generated 16 x 24 MP night (8.6; median 20, 99th percentile 870); every star's SNR then
# follows from its flux, flux / sqrt(flux + noise^2), with one noise for the night
FAINTEST_SNR = 8.6
SKY_ADU = 400.0
START = dt.datetime(2024, 8, 10, 22, 30, 0)  # DATE-OBS of the first light


def synthetic_catalogs(folder: Path, n_frames: int, width_px: int, height_px: int,
                       max_stars: int, seed: int = 0):
    """Write N catalogs (ECSV, the stars step's columns and meta) and return the truth:
    the demo config, the frames' cameras and rotations."""
    from astropy.table import Table
    from bench_pipeline import generated_config

    from nightstack import demo
    from nightstack.io import write_catalog

    cfg = generated_config(n_frames, width_px, height_px)
    rng = np.random.default_rng(seed)
    cameras, rotations = demo.frame_cameras(cfg), demo.frame_rotations(cfg)
    directions, flux_e, _ = demo.draw_star_field(rng, cfg, cameras, rotations)
    times = demo.frame_times_s(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    xy0, front0 = demo.project(cameras[0], rotations[0], directions)
    in_frame0 = np.sort(flux_e[front0 & demo.inside_frame(xy0, cameras[0])])[::-1]
    faintest = in_frame0[min(max_stars, len(in_frame0)) - 1]
    noise_e = np.sqrt(max(faintest**2 / FAINTEST_SNR**2 - faintest, 1.0))
    for k, (camera, rotation) in enumerate(zip(cameras, rotations)):
        xy, front = demo.project(camera, rotation, directions)
        inside = front & demo.inside_frame(xy, camera)
        idx = np.nonzero(inside)[0]
        idx = idx[np.argsort(-flux_e[idx])][:max_stars]
        snr = flux_e[idx] / np.sqrt(flux_e[idx] + noise_e**2)
        sigma = 0.6 * cfg.fwhm_px / snr
        pos = xy[idx] + rng.normal(size=(len(idx), 2)) * sigma[:, None]
        table = Table({"x": pos[:, 0], "y": pos[:, 1], "flux": flux_e[idx],
                       "fwhm_px": np.full(len(idx), cfg.fwhm_px),
                       "ellipticity": np.full(len(idx), 0.05), "snr": snr,
                       "peak": flux_e[idx] / cfg.fwhm_px**2})
        name = f"light_{k:04d}"
        table.meta.update({
            "n_candidates": len(idx), "n_hot_pixels": 0, "n_stars": len(idx),
            "fwhm_px_median": cfg.fwhm_px, "ellipticity_median": 0.05,
            "background_adu": SKY_ADU, "noise_adu": float(np.sqrt(SKY_ADU)),
            "noise_correlation": 1.0, "saturation_adu": float("nan"),
            "width_px": width_px, "height_px": height_px, "presmooth_px": 1.0, "status": "ok",
            "source": f"{name}.dng", "n_channels": 3, "exptime_s": cfg.exptime_s,
            "date_obs": (START + dt.timedelta(seconds=float(times[k]))).isoformat(), "focal_mm": None, "pixel_um": None,
            "instrument": "synthetic", "sha256": f"synthetic-{seed}-{k}",
            "channel_background": [SKY_ADU] * 3,
            "channel_noise": [float(np.sqrt(SKY_ADU))] * 3,
        })
        write_catalog(folder / f"{name}.ecsv", table)
    return cfg, cameras, rotations


def pose_one(args):
    from nightstack.logs import configure
    from nightstack.steps import pose_step

    frame, catalog, reference, output, registration = args
    configure(None)
    pose_step(frame, catalog, reference, output, registration)


def solve_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from nightstack.logs import run_step
    from nightstack.steps import solve_step

    run_step(solve_step, "scale", spec["frames"], spec["catalogs"], spec["poses"],
             spec["reference"], spec["output"], spec["registration"], spec["quality"],
             log_path=spec["log"])


def pose_errors_px(solution: dict, cameras, rotations, ref_index: int) -> np.ndarray:
    """Per accepted frame: the largest distance, over a 9 x 6 grid of reference pixels,
    between the solution's H and the true mapping."""
    from nightstack.camera import map_ref_to_frame

    ref_cam = cameras[ref_index]
    gx, gy = np.meshgrid(np.linspace(0, ref_cam.width_px - 1, 9),
                         np.linspace(0, ref_cam.height_px - 1, 6))
    grid = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    errors = []
    for rec in solution["frames"]:
        if rec["status"] != "accepted" or rec.get("reference"):
            continue
        k = int(rec["frame"].split("_")[1])
        mapped = grid @ np.asarray(rec["H"]).T
        mapped = mapped[:, :2] / mapped[:, 2:]
        rel = rotations[k] @ rotations[ref_index].T
        true = map_ref_to_frame(grid[:, :2], ref_cam, cameras[k], rel)
        errors.append(float(np.max(np.linalg.norm(mapped - true, axis=1))))
    return np.array(errors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--size", default="6000x4000", help="W x H of the frames in pixels")
    parser.add_argument("--stars", type=int, default=5000, help="catalog size (stars step cap)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "solve_scale")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        solve_worker(args.worker)
        return 0

    import yaml
    from bench_pipeline import run_timed  # /usr/bin/time -v, as the pipeline table

    from nightstack.steps import reference_step

    width_px, height_px = (int(v) for v in args.size.split("x"))
    work = args.work / f"{args.frames}x{args.size}"
    start = time.perf_counter()
    _, cameras, rotations = synthetic_catalogs(work / "stars", args.frames, width_px,
                                                 height_px, args.stars)
    frames = [f"light_{k:04d}" for k in range(args.frames)]
    catalogs = {f: str(work / "stars" / f"{f}.ecsv") for f in frames}
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    reference = work / "reference.json"
    reference_step("scale", catalogs, reference, str(config.get("reference", "auto")))
    (work / "poses").mkdir(exist_ok=True)
    poses = {f: str(work / "poses" / f"{f}.json") for f in frames}
    jobs = [(f, catalogs[f], str(reference), poses[f], config["registration"]) for f in frames]
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(pose_one, jobs, chunksize=8))
    prepare_s = time.perf_counter() - start

    spec = {"frames": frames, "catalogs": catalogs, "poses": poses,
            "reference": str(reference), "output": str(work / "solution.json"),
            "registration": config["registration"], "quality": config["quality"],
            "log": str(work / "solve.log")}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--worker", str(spec_path)]
    run = run_timed(cmd, REPO, work / "worker.log")
    if run["returncode"] != 0:
        print((work / "worker.log").read_text()[-3000:], file=sys.stderr)
        return run["returncode"]
    solution = json.loads((work / "solution.json").read_text())
    ref_index = frames.index(solution["reference"])
    errors = pose_errors_px(solution, cameras, rotations, ref_index)
    result = {
        "frames": args.frames, "size": args.size, "stars_per_frame": args.stars,
        "solve_s": round(run["wall_s"], 1), "solve_peak_mb": round(run["peak_rss_mb"] or 0, 1),
        "accepted": solution["n_accepted"], "bundle": solution["bundle"],
        "pose_error_px": {"median": round(float(np.median(errors)), 4),
                          "max": round(float(np.max(errors)), 4)} if len(errors) else None,
        "prepare_s": round(prepare_s, 1),
    }
    print(json.dumps(result, indent=1))
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
