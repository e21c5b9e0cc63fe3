"""Peak memory of nightstack.stacking.stack_frames on many large frames.

Writes N noise-only float32 FITS frames (C, H, W) with small random rotations into a
temporary folder (default 200 frames of 3 x 1500 x 2000: 7.2 GB of disk), then stacks them
in a fresh Python process and reports that process's peak resident set size
(resource.getrusage ru_maxrss), the peak of numpy/Python allocations (tracemalloc), the tile
plan and the wall time, as JSON.

    python benchmarks/bench_stack_memory.py                      # 200 frames, 512 MB budget
    python benchmarks/bench_stack_memory.py --frames 20 --method mean --memory-mb 128
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_frames(folder: Path, n_frames: int, shape, seed: int = 0) -> list[dict]:
    """Write noise frames and return their poses (rotation vectors, radians) as dicts."""
    from nightstack.io import write_fits_image

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_frames):
        path = folder / f"frame_{i:04d}.fits"
        data = 100.0 + rng.standard_normal(shape, dtype=np.float32)
        write_fits_image(path, data)
        frames.append({"path": str(path), "rotvec": rng.normal(0.0, 2e-3, 3).tolist()})
    return frames


def stack_and_measure(frames: list[dict], shape, method: str, interpolation: str,
                      memory_mb: int) -> dict:
    """Stack the frames in this process and return the memory and time figures."""
    import tracemalloc

    from nightstack.camera import Camera, rotation_matrix
    from nightstack.stacking import FrameWarp, StackConfig, stack_frames

    n_channels, height, width = shape
    camera = Camera(width, height, focal_px=float(np.hypot(width, height)))
    warps = [
        FrameWarp(f["path"], camera, camera, rotation_matrix(f["rotvec"]),
                  offset=np.full(n_channels, 100.0), scale=np.ones(n_channels),
                  target_level=np.full(n_channels, 100.0))
        for f in frames
    ]
    cfg = StackConfig(method=method, interpolation=interpolation, memory_mb=memory_mb)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    start = time.perf_counter()
    image, coverage, info = stack_frames(warps, shape, cfg)
    elapsed_s = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "frames": len(frames),
        "shape": list(shape),
        "frame_data_mb": round(len(frames) * int(np.prod(shape)) * 4 / 2**20, 1),
        "method": method,
        "interpolation": interpolation,
        "memory_mb": memory_mb,
        "tile": [info["tile_h"], info["tile_w"]],
        "n_tiles": info["n_tiles"],
        "planned_buffer_mb": info["buffer_mb"],
        "planned_peak_mb": info["peak_buffer_mb"],
        "output_arrays_mb": round((image.nbytes + coverage.nbytes) / 2**20, 1),
        "rss_after_imports_mb": round(rss_before_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
        "result_std": float(image.std()),
        "elapsed_s": round(elapsed_s, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--method", default="winsorized")
    parser.add_argument("--interpolation", default="cubic")
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--folder", help="keep the frames here (default: a temporary folder)")
    parser.add_argument("--stack-only", help=argparse.SUPPRESS)  # JSON list of frames
    args = parser.parse_args(argv)
    shape = (args.channels, args.height, args.width)

    if args.stack_only:
        frames = json.loads(Path(args.stack_only).read_text())
        print(json.dumps(stack_and_measure(frames, shape, args.method, args.interpolation,
                                           args.memory_mb)))
        return

    folder = Path(args.folder or tempfile.mkdtemp(prefix="nightstack_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        listing = folder / "frames.json"
        if listing.exists() and len(json.loads(listing.read_text())) == args.frames:
            print(f"reusing frames in {folder}", file=sys.stderr)
        else:
            print(f"writing {args.frames} frames {shape} to {folder}", file=sys.stderr)
            listing.write_text(json.dumps(write_frames(folder, args.frames, shape)))
        # A fresh process, so its peak RSS counts the stack alone, not the frame writing.
        cmd = [sys.executable, __file__, "--stack-only", str(listing),
               "--channels", str(args.channels), "--height", str(args.height),
               "--width", str(args.width), "--method", args.method,
               "--interpolation", args.interpolation, "--memory-mb", str(args.memory_mb)]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(json.dumps(json.loads(result.stdout), indent=2))
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
