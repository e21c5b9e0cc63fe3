"""The stack step on N frames, made from a finished night by repeating its frames.

A 500 x 24 MP night takes about an hour of calibration and star detection on 2 cores before
its stack step starts. The stack step's cost depends on the number, size and storage of the
calibrated frames (reading, warping, combining every value), and on what they show only
through the clipping's iterations, so this benchmark takes the results of a night
that went through the workflow (its calibrated frames, star catalogs and solution.json),
copies its accepted frames round-robin into N files on disk (real copies: the page cache
sees N different files, as in a real night) and runs the workflow's stack step
(nightstack.steps.stack_step, through run_step like scripts/stack.py, 2 threads) on them in
a fresh process. It prints wall time, peak memory (/usr/bin/time -v), the tile plan, the
time to read the copies once, and the stack / read ratio, as JSON.

    # a finished night with compressed calibrated frames (config output.calibrated_frames:
    # compressed), e.g. 16 generated lights of 24 MP, then:
    python benchmarks/bench_stack_scale.py WORK/results/NIGHT --frames 500 --work /big/disk
    python benchmarks/bench_stack_scale.py WORK/results/NIGHT --frames 16 --reader astropy

``--reader astropy`` reads compressed boxes through astropy's CompImageHDU.section (the
reader before nightstack.compressed_boxes) for a before/after figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def replicate(night_dir: Path, work: Path, n_frames: int) -> dict:
    """Write N frames' inputs for stack_step under ``work``: copied calibrated frames, the
    original catalogs, and a solution whose records cycle through the accepted frames."""
    solution = json.loads((night_dir / "solution.json").read_text())
    accepted = [r for r in solution["frames"] if r["status"] == "accepted"]
    reference = solution["reference"]
    reference_record = next(r for r in accepted if r["frame"] == reference)
    frames_dir = work / "calibrated"
    frames_dir.mkdir(parents=True, exist_ok=True)
    records, calibrated, catalogs = [], {}, {}
    for i in range(n_frames):
        # the first is the reference itself, the others cycle through the accepted frames
        source = reference_record if i == 0 else accepted[i % len(accepted)]
        frame = reference if i == 0 else f"copy{i:04d}_{source['frame']}"
        target = frames_dir / f"{frame}.fits"
        if not target.exists():
            shutil.copyfile(night_dir / "calibrated" / f"{source['frame']}.fits", target)
        calibrated[frame] = str(target)
        catalogs[frame] = str(night_dir / "stars" / f"{source['frame']}.ecsv")
        records.append({**source, "frame": frame})
    replicated = {**solution, "frames": records, "n_accepted": n_frames}
    solution_path = work / "solution.json"
    solution_path.write_text(json.dumps(replicated))
    return {"solution": str(solution_path), "calibrated": calibrated, "catalogs": catalogs}


def stack_in_process(spec_path: str) -> None:
    """Run stack_step as scripts/stack.py does (worker entry point)."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["reader"] == "astropy":
        from nightstack import compressed_boxes

        compressed_boxes.supports = lambda hdu: False
    from nightstack.logs import run_step
    from nightstack.steps import stack_step

    run_step(stack_step, "scale", spec["solution"], spec["calibrated"], spec["catalogs"],
             spec["output"], spec["stacking"], sky_mask=None, landscape_params=None,
             threads=2, log_path=spec["log"], reuse_memory=True, job_threads=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("night_dir", type=Path, help="results/<night> of a finished run")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "stack_scale")
    parser.add_argument("--reader", choices=("nightstack", "astropy"), default="nightstack")
    parser.add_argument("--keep", action="store_true", help="keep the copied frames")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        stack_in_process(args.worker)
        return 0

    import yaml
    from bench_pipeline import read_once_s, run_timed  # the pipeline table's figures

    work = args.work / f"{args.night_dir.name}_{args.frames}"
    start = time.perf_counter()
    inputs = replicate(args.night_dir, work, args.frames)
    copy_s = time.perf_counter() - start
    stacking = yaml.safe_load((REPO / "config.yaml").read_text())["stacking"]
    spec = {**inputs, "reader": args.reader, "stacking": stacking,
            "output": str(work / f"stack_{args.reader}.fits"), "log": str(work / "stack.log")}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, str(args.night_dir), "--worker", str(spec_path)]
    run = run_timed(cmd, REPO, work / "worker.log")
    if run["returncode"] != 0:
        print((work / "worker.log").read_text()[-3000:], file=sys.stderr)
        return run["returncode"]
    info = json.loads(Path(spec["output"]).with_suffix(".json").read_text())["info"]
    read_s = read_once_s([Path(p) for p in inputs["calibrated"].values()])
    frame_bytes = sum(os.path.getsize(p) for p in set(inputs["calibrated"].values()))
    result = {
        "frames": args.frames,
        "reader": args.reader,
        "stack_s": round(run["wall_s"], 1),
        "peak_rss_mb": round(run["peak_rss_mb"] or 0, 1),
        "read_once_s": round(read_s, 1),
        "stack_over_read": round(run["wall_s"] / read_s, 2),
        "calibrated_gb": round(frame_bytes / 1e9, 2),
        "copy_s": round(copy_s, 1),
        "n_tiles": info["n_tiles"],
        "tile_px": [info["tile_h"], info["tile_w"]],
        "memory_mb": info["memory_mb"],
    }
    print(json.dumps(result, indent=1))
    (work / f"result_{args.reader}.json").write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(work / "calibrated", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
