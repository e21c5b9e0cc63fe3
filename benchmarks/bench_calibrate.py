"""Per-kernel CPU time and peak memory of the calibrate side (calibration.py, loading.py) on
large frames, optionally next to an older revision of the code (a before/after table).

Frames:

- ``jpeg``: the 18 MP Canon JPEG of ``shared/data/dslr_canon_jpeg_pair`` (3 x 3456 x 5184
  colour, no masters: only the per-frame outlier search and repair run);
- ``demo24``: a 24 MP raw night from ``nightstack.demo.generate_night`` with
  ``DemoConfig(n_lights=6, width_px=6000, height_px=4000, n_biases=3, n_darks=3, n_flats=3)``
  (RGGB DNG mosaics), generated once into ``benchmarks/out/data/demo-24mp/`` (~70 s, ~700 MB).

Kernels run in this process, one after the other: **cpu s** is ``time.process_time`` (all
threads of the process, so BLAS threads count; other work on the machine barely changes it,
unlike wall time), best of ``--repeat``; **peak MB** is the tracemalloc peak above the memory
held before the call (numpy arrays are traced; LibRaw's and scipy's own C buffers are not).
The whole steps (``master_step``, ``calibrate_step``: load, calibrate, background removal,
FITS write) each run in a fresh ``python`` subprocess: wall s, cpu s and its peak resident
memory in MB (2^20 bytes; Linux VmHWM, interpreter and imports included).

``remove_background`` (nightstack/background.py) is timed for its share of calibrate_step only;
it is not a calibration kernel.

With ``--baseline REV`` the ``nightstack`` package of that git revision is extracted (``git
archive``) into benchmarks/out/ and timed the same way, imported under another name; the
table then shows both and the speed-up, and the outlier, hot and cold masks and the
calibrated frames of both are compared pixel for pixel.

    python benchmarks/bench_calibrate.py                        # current code, both frames
    python benchmarks/bench_calibrate.py --baseline bc74904     # before/after table
    python benchmarks/bench_calibrate.py --frames jpeg --no-steps --repeat 3
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
DEMO_DIR = OUT / "data" / "demo-24mp"
JPEG_NAME = "dslr_canon_jpeg_pair/20130906_015110_IMG_8470-preview3.jpg"
DEMO_CONFIG = {"n_lights": 6, "width_px": 6000, "height_px": 4000, "n_biases": 3, "n_darks": 3, "n_flats": 3}
MB = 2**20


def shared_data() -> Path:
    """The shared data folder: ``shared/data`` beside the repository or one of its parents."""
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    raise SystemExit("no shared/data folder found above the repository")


def import_nightstack(root: Path | None, alias: str):
    """The nightstack package under ``root`` (None: this repository), imported as ``alias``."""
    if root is None:
        sys.path.insert(0, str(REPO))
        alias = "nightstack"
    else:
        spec = importlib.util.spec_from_file_location(
            alias, root / "nightstack" / "__init__.py",
            submodule_search_locations=[str(root / "nightstack")],
        )  # fmt: skip
        sys.modules[alias] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[alias])
    for sub in ("loading", "calibration", "background", "demo"):
        importlib.import_module(f"{alias}.{sub}")
    return sys.modules[alias]


def extract_revision(rev: str) -> Path:
    """``git archive`` of ``rev``'s nightstack/ into benchmarks/out/baseline-<rev>/."""
    root = OUT / f"baseline-{rev}"
    if not (root / "nightstack" / "__init__.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "nightstack"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def measure(func, *args, repeat: int = 1):
    """(result, best cpu seconds, peak MB above the start) of ``func(*args)``."""
    best_cpu, peak = float("inf"), 0.0
    for _ in range(repeat):
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        t0 = time.process_time()
        result = func(*args)
        best_cpu = min(best_cpu, time.process_time() - t0)
        peak = max(peak, (tracemalloc.get_traced_memory()[1] - start) / MB)
        tracemalloc.stop()
    return result, best_cpu, peak


# ----------------------------------------------------------------------------- kernels


def jpeg_kernels(ns, path: Path, repeat: int) -> tuple[list, dict]:
    """Kernels on the colour JPEG; returns (rows, results kept for comparison)."""
    loading, cal = ns.loading, ns.calibration
    rows, keep = [], {}
    loading.load_frame(path)  # warm-up: imports and file cache stay out of the figures
    raw, cpu, peak = measure(loading.load_frame, path, repeat=repeat)
    rows.append(("load_frame", cpu, peak))
    mask, cpu, peak = measure(cal.find_outlier_pixels, raw.data, None, 10.0, repeat=repeat)
    rows.append(("find_outlier_pixels", cpu, peak))
    keep["outliers"] = mask
    _, cpu, peak = measure(cal.repair_pixels, raw.data, mask, None, repeat=repeat)
    rows.append(("repair_pixels", cpu, peak))
    frame, cpu, peak = measure(cal.calibrate, raw, None, None, None, repeat=repeat)
    rows.append(("calibrate (all of it)", cpu, peak))
    keep["calibrated"] = frame.data
    return rows, keep


def demo_kernels(ns, folder: Path, repeat: int) -> tuple[list, dict]:
    """Kernels on the 24 MP raw night: masters, hot/cold/outlier masks, demosaic, calibrate."""
    loading, cal = ns.loading, ns.calibration
    rows, keep = [], {}
    first = min(glob.glob(str(folder / "lights" / "*.dng")))
    loading.load_frame(first)  # warm-up
    raw, cpu, peak = measure(loading.load_frame, first, repeat=repeat)
    rows.append(("load_frame (DNG)", cpu, peak))
    frames = {
        kind: [loading.load_frame(p) for p in sorted(glob.glob(str(folder / sub / "*.dng")))]
        for kind, sub in (("bias", "biases"), ("dark", "darks"), ("flat", "flats"))
    }
    bias, cpu, peak = measure(cal.make_master, frames["bias"], "bias", repeat=repeat)
    rows.append(("make_master bias (3)", cpu, peak))
    dark, cpu, peak = measure(cal.make_master, frames["dark"], "dark", repeat=repeat)
    rows.append(("make_master dark (3)", cpu, peak))
    flat, cpu, peak = measure(cal.make_master, frames["flat"], "flat", bias, repeat=repeat)
    rows.append(("make_master flat (3)", cpu, peak))
    del frames
    current = dark.data - bias.data
    hot, cpu, peak = measure(cal.find_hot_pixels, current, raw.cfa_pattern, 8.0, repeat=repeat)
    rows.append(("find_hot_pixels", cpu, peak))
    cold, cpu, peak = measure(cal.find_cold_pixels, flat.data, raw.cfa_pattern, 0.5, repeat=repeat)
    rows.append(("find_cold_pixels", cpu, peak))
    mask, cpu, peak = measure(cal.find_outlier_pixels, raw.data, raw.cfa_pattern, 10.0, repeat=repeat)
    rows.append(("find_outlier_pixels", cpu, peak))
    _, cpu, peak = measure(cal.demosaic, raw.data, raw.cfa_pattern, repeat=repeat)
    rows.append(("demosaic", cpu, peak))

    def calibrate_fresh():  # new Master objects each time: hot/cold masks not cached yet
        fresh = [cal.Master(**{**m.__dict__, "_mask_cache": {}}) for m in (bias, dark, flat)]
        return cal.calibrate(raw, *fresh)

    frame, cpu, peak = measure(calibrate_fresh, repeat=repeat)
    rows.append(("calibrate (all of it, masters)", cpu, peak))
    keep.update(hot=hot, cold=cold, outliers=mask, calibrated=frame.data,
                masters=[m.data for m in (bias, dark, flat)])  # fmt: skip
    return rows, keep


def background_share(ns, image: np.ndarray, repeat: int) -> tuple:
    """remove_background with the config.yaml settings (background.py, not changed here)."""
    import yaml

    with open(REPO / "config.yaml") as fh:
        from_cfg = yaml.safe_load(fh)["background"]
    params = {k: v for k, v in from_cfg.items() if k not in ("before_stars", "after_stack")}
    bg = ns.background
    config = bg.background_config_from_dict(params)
    _, cpu, peak = measure(bg.remove_background, image, config, repeat=repeat)
    return ("remove_background (not calibration)", cpu, peak)


# ----------------------------------------------------------------------------- whole steps

STEP_SCRIPT = r"""
import json, resource, sys, time, yaml
from nightstack.steps import calibrate_step, master_step
args = json.loads(sys.argv[1])
cfg = yaml.safe_load(open(args["config"]))
t0, c0 = time.perf_counter(), time.process_time()
if args["step"] == "calibrate":
    calibrate_step(args["light"], args["out"], args["masters"], cfg["calibration"], cfg["background"])
else:
    master_step(args["step"], args["frames"], args["out"], cfg["calibration"], bias=args.get("bias"))
try:  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    with open("/proc/self/status") as fh:
        peak_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "rss_mb": peak_kb / 1024}))
"""


def run_step(root: Path, args: dict) -> dict:
    """One step in a fresh interpreter importing nightstack from ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory() as cwd:  # keep '' on sys.path free of nightstack/
        done = subprocess.run(
            [sys.executable, "-c", STEP_SCRIPT, json.dumps({**args, "config": str(REPO / "config.yaml")})],
            env=env, cwd=cwd, capture_output=True, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_rows(root: Path, frames: list[str], jpeg: Path, demo: Path, work: Path) -> list:
    """(frame, step, wall, cpu, rss) of master_step x3 and calibrate_step."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "jpeg" in frames:
        r = run_step(root, {"step": "calibrate", "light": str(jpeg), "out": str(work / "jpeg.fits"),
                            "masters": {}})  # fmt: skip
        rows.append(("jpeg", "calibrate_step", r))
    if "demo24" in frames:
        masters = {}
        for kind, sub in (("bias", "biases"), ("dark", "darks"), ("flat", "flats")):
            files = sorted(glob.glob(str(demo / sub / "*.dng")))
            out = str(work / f"{kind}.fits")
            extra = {"bias": masters["bias"]} if kind == "flat" else {}
            r = run_step(root, {"step": kind, "frames": files, "out": out, **extra})
            rows.append(("demo24", f"master_step {kind}", r))
            masters[kind] = out
        light = sorted(glob.glob(str(demo / "lights" / "*.dng")))[1]
        r = run_step(root, {"step": "calibrate", "light": light, "out": str(work / "demo.fits"),
                            "masters": masters})  # fmt: skip
        rows.append(("demo24", "calibrate_step", r))
    return rows


# ----------------------------------------------------------------------------- report


def compare(before: dict, after: dict) -> list[str]:
    """One line per mask / image: identical, or how many pixels differ."""
    lines = []
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        pairs = zip(a, b) if isinstance(a, list) else [(a, b)]
        for i, (x, y) in enumerate(pairs):
            name = f"{key}[{i}]" if isinstance(a, list) else key
            if x.dtype == bool:
                differ = int(np.count_nonzero(x != y))
                lines.append(f"{name}: {int(x.sum())} -> {int(y.sum())} pixels, {differ} differ")
            else:
                same = np.array_equal(x, y, equal_nan=True)
                worst = float(np.nanmax(np.abs(x.astype(np.float64) - y))) if not same else 0.0
                lines.append(f"{name}: {'bit-identical' if same else f'max |diff| {worst:.3g}'}")
    return lines


def kernel_table(label: str, after: list, before: list | None) -> list[str]:
    head = f"| {label} kernel | " + ("before cpu s | before peak MB | " if before else "")
    head += "cpu s | peak MB |" + (" speed-up |" if before else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, (name, cpu, peak) in enumerate(after):
        cells = [name]
        if before:
            _, bcpu, bpeak = before[i]
            cells += [f"{bcpu:.2f}", f"{bpeak:.0f}"]
        cells += [f"{cpu:.2f}", f"{peak:.0f}"]
        if before:
            cells.append(f"{bcpu / cpu:.1f}x" if cpu > 0 else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def step_table(after: list, before: list | None) -> list[str]:
    head = "| frame | step | " + ("before wall s | before cpu s | before max RSS MB | " if before else "")
    head += "wall s | cpu s | max RSS MB |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, (frame, step, r) in enumerate(after):
        cells = [frame, step]
        if before:
            b = before[i][2]
            cells += [f"{b['wall']:.1f}", f"{b['cpu']:.1f}", f"{b['rss_mb']:.0f}"]
        cells += [f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{r['rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="jpeg,demo24", help="jpeg,demo24")
    parser.add_argument("--baseline", help="git revision to compare with (before/after table)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N per kernel")
    parser.add_argument("--jpeg", type=Path, help=f"default: shared/data/{JPEG_NAME}")
    parser.add_argument("--demo", type=Path, default=DEMO_DIR, help="24 MP demo night folder")
    parser.add_argument("--no-steps", action="store_true", help="skip the whole-step subprocesses")
    args = parser.parse_args(argv)
    frames = args.frames.split(",")
    jpeg = args.jpeg or shared_data() / JPEG_NAME
    after_ns = import_nightstack(None, "nightstack")
    if "demo24" in frames and not (args.demo / "lights").is_dir():
        print(f"generating the 24 MP demo night into {args.demo} (about a minute)", flush=True)
        after_ns.demo.generate_night(args.demo, after_ns.demo.DemoConfig(**DEMO_CONFIG))
    base_root = extract_revision(args.baseline) if args.baseline else None
    base_ns = import_nightstack(base_root, "nightstack_baseline") if base_root else None

    report = [f"# bench_calibrate {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f}"]
    for frame in frames:
        kernels = jpeg_kernels if frame == "jpeg" else demo_kernels
        source = jpeg if frame == "jpeg" else args.demo
        before, kept_before = kernels(base_ns, source, args.repeat) if base_ns else (None, None)
        after, kept_after = kernels(after_ns, source, args.repeat)
        after.append(background_share(after_ns, kept_after["calibrated"], args.repeat))
        if before:
            before.append(background_share(base_ns, kept_before["calibrated"], args.repeat))
        report += ["", *kernel_table(frame, after, before)]
        if kept_before:
            report += ["", f"{frame}: before vs after", *compare(kept_before, kept_after)]
        print("\n".join(kernel_table(frame, after, before)), flush=True)
    if not args.no_steps:
        work = OUT / "bench_calibrate"
        after_steps = step_rows(REPO, frames, jpeg, args.demo, work / "after")
        before_steps = step_rows(base_root, frames, jpeg, args.demo, work / "before") if base_root else None
        report += ["", *step_table(after_steps, before_steps)]
    print("\n".join(report))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"calibrate_{time.strftime('%Y%m%d_%H%M%S')}.md").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
