"""Wall time and peak memory of nightstack against Siril and an astroalign loop, same frames.

For every data set the same light frames go through three tools, one after the other, on the
same 2 cores:

- **nightstack**: the Snakemake workflow (shipped config.yaml, only ``nights`` replaced) in a
  fresh work dir, ``--cores 2``;
- **siril**: ``siril-cli -s`` (Siril 1.0.x) with ``setcpu 2``: convert (debayer for CFA data),
  register (global star alignment), ``stack ... rej w 3 3 -norm=addscale``; when the night
  holds biases/darks/flats the script first builds masters and calibrates the lights with them
  (``preprocess -cfa -equalize_cfa -debayer``), as nightstack does;
- **astroalign**: a plain Python loop: read each light, bilinear debayer, register it on the
  first with ``astroalign.find_transform`` / ``apply_transform``, then an
  ``astropy.stats.sigma_clip`` (3, 3) mean of the cube. Lights only, no calibration.

Each tool runs under ``/usr/bin/time -v``; its "Maximum resident set size" is the peak memory
of the largest single process of the tool's process tree (Snakemake jobs included). Wall time
is measured around the whole command. For nightstack the Snakemake log is also parsed into
per-rule job times (from the '[date]' lines before 'rule X:' and 'Finished jobid: N'; 1 s
resolution) and a psutil sampler (every 0.1 s) records each job process's peak memory; those
go to the JSON file only (``--per-rule`` prints them too).

Data sets: ``als`` (6 FITS RGGB 1304x976), ``seestar`` (6 FITS GRBG 1080x1920, names with
spaces: Siril gets symlinks with safe names), ``demo`` (nightstack.demo.generate_night with
DemoConfig(n_lights=16): 16 DNG lights + 8 biases, darks, flats; generated once into
benchmarks/out/data/), and ``genNxWxH`` (N generated DNG lights of W x H pixels with the demo's
field of view and star density, 8 biases, darks and flats; e.g. ``gen16x6000x4000`` for 16 x 24 MP).

    python benchmarks/bench_pipeline.py --quick               # als only
    python benchmarks/bench_pipeline.py --sets als,seestar    # default: als,seestar,demo
    python benchmarks/bench_pipeline.py --sets gen16x6000x4000,gen64x6000x4000 --tools nightstack,siril
    python benchmarks/bench_pipeline.py --tools nightstack,siril --per-rule --keep

Prints one table and writes the figures to benchmarks/out/pipeline_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
SHARED = REPO.parent / "shared" / "data"
CORES = 2
TOOLS = ("nightstack", "siril", "astroalign")
CALIBRATION_DIRS = ("biases", "darks", "flats")
CALIBRATION_STEMS = {"biases": "bias", "darks": "dark", "flats": "flat"}
IMAGE_SUFFIXES = (".fits", ".fit", ".fts", ".dng")
RSS_SAMPLE_S = 0.1
READ_ONCE_SAMPLE = 32  # frames read to time "read once" on big nights


@dataclass
class DataSet:
    """One night: its lights (and optional calibration frames by kind), from one folder."""

    name: str
    folder: Path
    lights: list[Path]
    calibration: dict[str, list[Path]] = field(default_factory=dict)


@dataclass
class Measurement:
    """One tool on one data set. ``stacked`` is the number of frames in the result."""

    data_set: str
    frames: int
    frame_size: str
    tool: str
    wall_s: float | None
    peak_rss_mb: float | None
    stacked: int | None
    returncode: int | None
    error: str = ""
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data sets


def images_in(folder: Path) -> list[Path]:
    """Image files (FITS, DNG) directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def shared_set(name: str, folder_name: str) -> DataSet:
    folder = SHARED / folder_name
    if not folder.is_dir():
        raise SystemExit(f"bench_pipeline: data set '{name}' not found at {folder}")
    return DataSet(name, folder, images_in(folder))


def demo_set(n_lights: int = 16) -> DataSet:
    """The generated demo night (made once, then reused) with its biases, darks and flats."""
    from nightstack.demo import DemoConfig, generate_night

    folder = OUT / "data" / f"demo-night-{n_lights}"
    if not (folder / "truth.json").exists():
        print(f"generating the demo night ({n_lights} lights) in {folder} ...", flush=True)
        generate_night(folder, DemoConfig(n_lights=n_lights))
    calibration = {kind: images_in(folder / kind) for kind in CALIBRATION_DIRS if (folder / kind).is_dir()}
    return DataSet("demo", folder, images_in(folder / "lights"), calibration)


GENERATED = re.compile(r"^gen(\d+)x(\d+)x(\d+)$")


def generated_config(n_lights: int, width_px: int, height_px: int):
    """DemoConfig of a generated night of any size: the demo's field of view and star density.

    The focal length scales with the width (same lens, finer pixels), the star count with the
    area (about 1500 per megapixel, the demo's density), the calibration sets stay at 8 frames
    each, and the satellite goes to the sixth light when there is one. Lights are 8 s every
    10 s, so even 500 of them (83 min, 21 deg of sky rotation on the fixed tripod) overlap.
    """
    from nightstack.demo import DemoConfig

    base = DemoConfig()
    scale = width_px / base.width_px
    area = width_px * height_px / (base.width_px * base.height_px)
    return DemoConfig(n_lights=n_lights, width_px=width_px, height_px=height_px,
                      focal_px=base.focal_px * scale, n_stars=int(base.n_stars * area),
                      fwhm_px=base.fwhm_px * max(1.0, scale ** 0.5),
                      cadence_s=10.0, exptime_s=8.0, satellite_frame=5 if n_lights > 5 else -1)


def generated_set(name: str) -> DataSet:
    """``genNxWxH``: N generated DNG lights of W x H with 8 biases, darks and flats (made once)."""
    from nightstack.demo import generate_night

    n_lights, width_px, height_px = (int(g) for g in GENERATED.match(name).groups())
    folder = OUT / "data" / name
    if not (folder / "truth.json").exists():
        print(f"generating {n_lights} lights of {width_px}x{height_px} in {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        generate_night(folder, generated_config(n_lights, width_px, height_px), workers=os.cpu_count() or 1)
    calibration = {kind: images_in(folder / kind) for kind in CALIBRATION_DIRS if (folder / kind).is_dir()}
    return DataSet(name, folder, images_in(folder / "lights"), calibration)


def load_data_set(name: str) -> DataSet:
    if name == "als":
        return shared_set(name, "als_m27_asi224mc")
    if name == "seestar":
        return shared_set(name, "seestar_ngc7023_s50")
    if name == "demo":
        return demo_set()
    if GENERATED.match(name):
        return generated_set(name)
    raise SystemExit(f"bench_pipeline: unknown data set '{name}' (als, seestar, demo, genNxWxH)")


def frame_size(path: Path) -> str:
    """'WxH' of a light's raw mosaic (FITS header or LibRaw's visible area)."""
    if path.suffix.lower() == ".dng":
        import rawpy

        with rawpy.imread(str(path)) as raw:
            height, width = raw.raw_image_visible.shape
    else:
        from astropy.io import fits

        header = fits.getheader(path)
        width, height = header["NAXIS1"], header["NAXIS2"]
    return f"{width}x{height}"


# ----------------------------------------------------------------------------- measuring


class RssSampler(threading.Thread):
    """Polls a process tree; keeps each process's command line and peak resident set (bytes)."""

    def __init__(self, root_pid: int, interval_s: float = RSS_SAMPLE_S):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.processes: dict[int, dict] = {}
        self._stop_event = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                    rec = self.processes.get(proc.pid)
                    if rec is None:
                        rec = self.processes[proc.pid] = {"cmdline": proc.cmdline(), "peak_rss": 0}
                    rec["peak_rss"] = max(rec["peak_rss"], rss)
                except psutil.Error:
                    continue
            self._stop_event.wait(self.interval_s)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)


def pinned(cmd: list[str]) -> list[str]:
    """The command restricted to CPUs 0 and 1 when the machine has more than 2."""
    if (os.cpu_count() or 1) > CORES and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(str(c) for c in range(CORES)), *cmd]
    return cmd


def tool_env() -> dict:
    """Environment for every tool: BLAS/OpenMP thread pools capped at the core count."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(CORES)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_timed(cmd: list[str], cwd: Path, log_path: Path, sample_rss: bool = False) -> dict:
    """Run ``cmd`` under /usr/bin/time -v, stdout+stderr to ``log_path``.

    Returns wall_s (seconds, measured here), peak_rss_mb (MB = 2**20 bytes, GNU time's maximum
    resident set size of the largest process in the tree), returncode and, with
    ``sample_rss``, the sampled processes (cmdline, peak_rss bytes).
    """
    time_path = log_path.with_suffix(".time")
    full = ["/usr/bin/time", "-v", "-o", str(time_path), *pinned(cmd)]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(full, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=tool_env())
        sampler = RssSampler(proc.pid) if sample_rss else None
        if sampler:
            sampler.start()
        returncode = proc.wait()
        wall_s = time.perf_counter() - start
        if sampler:
            sampler.stop()
    peak_kb = None
    if time_path.exists():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_path.read_text())
        peak_kb = int(match.group(1)) if match else None
    return {
        "wall_s": wall_s,
        "peak_rss_mb": peak_kb / 1024 if peak_kb is not None else None,
        "returncode": returncode,
        "processes": list(sampler.processes.values()) if sampler else [],
    }


def log_tail(path: Path, pattern: str = r"error|fail|exception|traceback", n: int = 3) -> str:
    """The last ``n`` lines of a log that look like an error, joined (for the table's footnotes)."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    hits = [ln for ln in lines if re.search(pattern, ln, re.IGNORECASE)]
    return " | ".join((hits or lines)[-n:])[:400]


# ----------------------------------------------------------------------------- nightstack


SNAKEMAKE_DATE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
SNAKEMAKE_RULE = re.compile(r"^(?:local)?rule (\w+):$")
SNAKEMAKE_JOBID = re.compile(r"^jobid: (\d+)$")
SNAKEMAKE_DONE = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
SNAKEMAKE_SCRIPT = re.compile(r"\.snakemake/scripts/tmp[^/]*?\.(\w+)\.py$")


def snakemake_job_times(log_text: str) -> list[dict]:
    """Jobs of a Snakemake log: rule, jobid, start and end (datetime), wall_s (1 s resolution)."""
    jobs: dict[int, dict] = {}
    stamp, rule = None, None
    for line in (ln.strip() for ln in log_text.splitlines()):
        if m := SNAKEMAKE_DATE.match(line):
            stamp = dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := SNAKEMAKE_RULE.match(line):
            rule = m.group(1)
        elif (m := SNAKEMAKE_JOBID.match(line)) and rule is not None:
            jobs[int(m.group(1))] = {"rule": rule, "jobid": int(m.group(1)), "start": stamp, "end": None}
            rule = None
        elif (m := SNAKEMAKE_DONE.match(line)) and int(m.group(1)) in jobs:
            jobs[int(m.group(1))]["end"] = stamp
    for job in jobs.values():
        done = job["start"] is not None and job["end"] is not None
        job["wall_s"] = (job["end"] - job["start"]).total_seconds() if done else None
    return list(jobs.values())


def per_rule_summary(jobs: list[dict], processes: list[dict]) -> dict[str, dict]:
    """Rule -> jobs, summed and longest job wall time (s), peak sampled job memory (MB)."""
    rules: dict[str, dict] = {}
    for job in jobs:
        rec = rules.setdefault(job["rule"], {"jobs": 0, "sum_wall_s": 0.0, "max_wall_s": 0.0, "peak_rss_mb": None})
        rec["jobs"] += 1
        if job["wall_s"] is not None:
            rec["sum_wall_s"] += job["wall_s"]
            rec["max_wall_s"] = max(rec["max_wall_s"], job["wall_s"])
    for proc in processes:
        cmd = proc["cmdline"]
        m = SNAKEMAKE_SCRIPT.search(cmd[-1]) if cmd else None
        name = m.group(1) if m else ("snakemake" if any("snakemake" in c for c in cmd) else None)
        if name is None:
            continue
        rec = rules.setdefault(name, {"jobs": 0, "sum_wall_s": 0.0, "max_wall_s": 0.0, "peak_rss_mb": None})
        rec["peak_rss_mb"] = max(rec["peak_rss_mb"] or 0.0, proc["peak_rss"] / 2**20)
    return rules


def read_once_s(paths: list[Path], max_frames: int = READ_ONCE_SAMPLE) -> float | None:
    """Seconds to read (and decompress) every calibrated frame whole, once: the floor of the
    stack step, which reads each of them once more (tile by tile) to warp and combine it.

    Nights of more than ``max_frames`` frames read an evenly spaced sample of that many and
    scale its time by the frame count (every frame has the same size and compression), so a
    500-frame night does not spend a quarter of an hour on a figure.
    """
    from nightstack.io import read_fits_image

    if not paths:
        return None
    sample = paths if len(paths) <= max_frames else [paths[int(i)] for i in np.linspace(0, len(paths) - 1, max_frames)]
    start = time.perf_counter()
    for path in sample:
        read_fits_image(path, memmap=False)
    return (time.perf_counter() - start) * len(paths) / len(sample)


def run_nightstack(ds: DataSet, workdir: Path) -> dict:
    """The workflow on the data set's folder in a fresh work dir (shipped config, this night)."""
    import yaml

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["nights"] = {ds.name: str(ds.folder)}
    cfg["results"] = "results"
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", str(CORES)]
    log = workdir / "snakemake.log"
    result = run_timed(cmd, workdir, log, sample_rss=True)
    jobs = snakemake_job_times(log.read_text(errors="replace"))
    result["per_rule"] = per_rule_summary(jobs, result.pop("processes"))
    solution = workdir / "results" / ds.name / "solution.json"
    result["stacked"] = json.loads(solution.read_text())["n_accepted"] if solution.exists() else None
    result["read_calibrated_s"] = read_once_s(sorted((workdir / "results" / ds.name / "calibrated").glob("*.fits")))
    if result["returncode"] != 0:
        result["error"] = log_tail(log)
    return result


# ----------------------------------------------------------------------------- Siril


def safe_links(files: list[Path], folder: Path, stem: str) -> None:
    """Symlinks ``stem_0001.ext`` ... in ``folder``: Siril's convert chokes on odd names."""
    folder.mkdir(parents=True)
    for index, path in enumerate(files, 1):
        (folder / f"{stem}_{index:04d}{path.suffix.lower()}").symlink_to(path)


def siril_script(ds: DataSet) -> str:
    """A Siril 1.0 script: (masters, calibration,) convert + debayer, register, winsorized stack."""
    lines = ["requires 1.0.0", f"setcpu {CORES}"]
    cal = ds.calibration
    pre = []
    if cal.get("biases"):
        lines += ["cd biases", "convert bias -out=../process", "cd ../process",
                  "stack bias rej w 3 3 -nonorm -out=master_bias", "cd .."]
    if cal.get("flats"):
        bias = " -bias=master_bias" if cal.get("biases") else ""
        lines += ["cd flats", "convert flat -out=../process", "cd ../process"]
        if bias:
            lines += [f"preprocess flat{bias}", "stack pp_flat rej w 3 3 -norm=mul -out=master_flat"]
        else:
            lines += ["stack flat rej w 3 3 -norm=mul -out=master_flat"]
        lines += ["cd .."]
        pre.append("-flat=master_flat")
    if cal.get("darks"):
        lines += ["cd darks", "convert dark -out=../process", "cd ../process",
                  "stack dark rej w 3 3 -nonorm -out=master_dark", "cd .."]
        pre.insert(0, "-dark=master_dark")
    elif cal.get("biases"):
        pre.insert(0, "-bias=master_bias")
    if pre:
        # calibrate on the mosaic, then demosaic (Siril's OSC preprocessing)
        lines += ["cd lights", "convert light -out=../process", "cd ../process",
                  f"preprocess light {' '.join(pre)} -cfa -equalize_cfa -debayer",
                  "register pp_light",
                  "stack r_pp_light rej w 3 3 -norm=addscale -output_norm -out=result"]
    else:
        lines += ["cd lights", "convert light -debayer -out=../process", "cd ../process",
                  "register light",
                  "stack r_light rej w 3 3 -norm=addscale -output_norm -out=result"]
    lines.append("close")
    return "\n".join(lines) + "\n"


def run_siril(ds: DataSet, workdir: Path) -> dict:
    siril = shutil.which("siril-cli")
    if siril is None:
        return {"wall_s": None, "peak_rss_mb": None, "returncode": None, "stacked": None,
                "error": "siril-cli not installed (apt-get install siril)"}
    safe_links(ds.lights, workdir / "lights", "light")
    for kind, files in ds.calibration.items():
        if files:
            safe_links(files, workdir / kind, CALIBRATION_STEMS[kind])
    (workdir / "process").mkdir()
    script = workdir / "bench.ssf"
    script.write_text(siril_script(ds))
    log = workdir / "siril.log"
    result = run_timed([siril, "-d", str(workdir), "-s", str(script)], workdir, log)
    text = log.read_text(errors="replace")
    stacked = re.findall(r"(\d+) images have been stacked", text)
    registered = re.findall(r"Total: (\d+) failed, (\d+) registered", text)
    result.pop("processes")
    result["stacked"] = int(stacked[-1]) if stacked else None
    result["registered"] = int(registered[-1][1]) if registered else None
    result["version"] = (re.findall(r"Welcome to siril v(\S+)", text) or [None])[0]
    failed = "Script execution failed" in text or result["returncode"] != 0
    if failed or not (workdir / "process" / "result.fit").exists():
        result["error"] = log_tail(log, r"error|fail|cannot|not ")
    return result


# ----------------------------------------------------------------------------- astroalign


def read_mosaic(path: Path) -> tuple[np.ndarray, str | None]:
    """(float32 (H, W) mosaic, CFA pattern or None) of a FITS or camera RAW light.

    RAW: LibRaw's visible area minus the black level; FITS: BAYERPAT from the header.
    """
    if path.suffix.lower() == ".dng":
        import rawpy

        with rawpy.imread(str(path)) as raw:
            mosaic = raw.raw_image_visible.astype(np.float32) - float(np.mean(raw.black_level_per_channel))
            desc = raw.color_desc.decode()
            pattern = "".join(desc[i] for i in raw.raw_pattern.ravel())
        return mosaic, pattern
    from astropy.io import fits

    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None)
        pattern = str(hdu.header.get("BAYERPAT", "")).strip().upper() or None
        return np.asarray(hdu.data, dtype=np.float32), pattern


def bilinear_debayer(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    """(3, H, W) float32 R, G, B of a CFA mosaic by normalised bilinear interpolation."""
    from scipy.ndimage import convolve

    height, width = mosaic.shape
    cell = np.array(list(pattern)).reshape(2, 2)
    letters = np.tile(cell, ((height + 1) // 2, (width + 1) // 2))[:height, :width]
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
    rgb = np.empty((3, height, width), np.float32)
    for c, letter in enumerate("RGB"):
        mask = (letters == letter).astype(np.float32)
        # dividing by the convolved mask normalises at the borders and for any pattern
        rgb[c] = convolve(mosaic * mask, kernel, mode="mirror") / convolve(mask, kernel, mode="mirror")
    return rgb


def astroalign_stack(lights: list[Path], out_path: Path) -> dict:
    """Register each light on the first with astroalign, then a sigma-clipped (3, 3) mean.

    Returns stacked (frames in the mean) and failed ({file: reason}); writes the stack as FITS.
    """
    import astroalign
    from astropy.io import fits
    from astropy.stats import sigma_clip

    aligned, failed = [], {}
    reference_lum = None
    for path in lights:
        mosaic, pattern = read_mosaic(path)
        image = bilinear_debayer(mosaic, pattern) if pattern else mosaic[None]
        lum = image.mean(axis=0)
        if reference_lum is None:
            reference_lum = lum
            aligned.append(image)
            continue
        try:
            transform, _ = astroalign.find_transform(lum, reference_lum)
        except Exception as exc:  # astroalign raises MaxIterError/ValueError/TypeError
            failed[path.name] = f"{type(exc).__name__}: {exc}"
            continue
        channels = []
        for channel in image:
            warped, footprint = astroalign.apply_transform(transform, channel, reference_lum)
            warped = warped.astype(np.float32)
            warped[footprint] = np.nan
            channels.append(warped)
        aligned.append(np.stack(channels))
    cube = np.stack(aligned)
    clipped = sigma_clip(cube, sigma_lower=3.0, sigma_upper=3.0, maxiters=5, axis=0, masked=True)
    stack = clipped.mean(axis=0).filled(np.nan).astype(np.float32)
    fits.writeto(out_path, stack, overwrite=True)
    return {"stacked": len(aligned), "failed": failed}


def run_astroalign(ds: DataSet, workdir: Path) -> dict:
    """The astroalign loop in a fresh Python process (so its memory is its own)."""
    spec = workdir / "spec.json"
    spec.write_text(json.dumps({"lights": [str(p) for p in ds.lights], "out": str(workdir / "stack.fits"),
                                "report": str(workdir / "report.json")}))
    log = workdir / "astroalign.log"
    result = run_timed([sys.executable, str(Path(__file__).resolve()), "--astroalign-worker", str(spec)],
                       workdir, log)
    result.pop("processes")
    report_path = workdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    result["stacked"] = report.get("stacked")
    result["failed_frames"] = report.get("failed", {})
    if result["returncode"] != 0:
        result["error"] = log_tail(log)
    elif result["failed_frames"]:
        result["error"] = "; ".join(f"{k}: {v}" for k, v in result["failed_frames"].items())[:400]
    return result


def astroalign_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    report = astroalign_stack([Path(p) for p in spec["lights"]], Path(spec["out"]))
    Path(spec["report"]).write_text(json.dumps(report, indent=2))


# ----------------------------------------------------------------------------- table


RUNNERS = {"nightstack": run_nightstack, "siril": run_siril, "astroalign": run_astroalign}


def measure(ds: DataSet, tool: str, keep: bool) -> Measurement:
    workdir = OUT / "work" / ds.name / tool
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    print(f"  {ds.name}: {tool} ...", end=" ", flush=True)
    # other work on the machine skews the timings; the load average says how much there was
    load_before = os.getloadavg()[0]
    result = RUNNERS[tool](ds, workdir)
    result["load_avg_1min_before"] = load_before
    result["load_avg_1min_after"] = os.getloadavg()[0]
    wall = result.get("wall_s")
    print(f"{wall:.1f} s" if wall is not None else "skipped", flush=True)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
        for empty in (workdir.parent, workdir.parent.parent):
            if empty.exists() and not any(empty.iterdir()):
                empty.rmdir()
    details = {k: v for k, v in result.items() if k not in ("wall_s", "peak_rss_mb", "returncode", "stacked", "error")}
    details["workdir"] = str(workdir) if keep else None
    return Measurement(ds.name, len(ds.lights), frame_size(ds.lights[0]), tool, wall,
                       result.get("peak_rss_mb"), result.get("stacked"), result.get("returncode"),
                       result.get("error", ""), details)


def ratio_to_siril(rows: list[Measurement], row: Measurement) -> float | None:
    siril = next((r for r in rows if r.data_set == row.data_set and r.tool == "siril"), None)
    if siril is None or siril.wall_s is None or row.wall_s is None or siril.error:
        return None
    return row.wall_s / siril.wall_s


def format_table(rows: list[Measurement]) -> str:
    """One Markdown table of all measurements, then one footnote per tool that went wrong."""
    head = ["data set", "frames", "frame size", "tool", "wall time (s)", "peak memory (MB)",
            "stacked", "wall / Siril"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes = []
    for row in rows:
        ratio = ratio_to_siril(rows, row)
        mark = ""
        if row.error:
            notes.append(row.error)
            mark = f" [{len(notes)}]"
        cells = [row.data_set, str(row.frames), row.frame_size, row.tool + mark,
                 f"{row.wall_s:.1f}" if row.wall_s is not None else "-",
                 f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb is not None else "-",
                 f"{row.stacked}/{row.frames}" if row.stacked is not None else "-",
                 f"{ratio:.1f}x" if ratio is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def format_rules(rows: list[Measurement]) -> str:
    """nightstack's per-rule table; the stack rule's line also gives reading its inputs once."""
    lines = ["| data set | rule | jobs | summed job time (s) | longest job (s) | peak job memory (MB) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        read_s = row.details.get("read_calibrated_s")
        stack = row.details.get("per_rule", {}).get("stack")
        if read_s and stack:
            lines.append(f"| {row.data_set} | (read the calibrated frames once) | - | {read_s:.1f} | - | "
                         f"stack / read = {stack['sum_wall_s'] / read_s:.1f}x |")
        for rule, rec in row.details.get("per_rule", {}).items():
            peak = f"{rec['peak_rss_mb']:.0f}" if rec["peak_rss_mb"] is not None else "-"
            lines.append(f"| {row.data_set} | {rule} | {rec['jobs']} | {rec['sum_wall_s']:.0f} | "
                         f"{rec['max_wall_s']:.0f} | {peak} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the als data set")
    parser.add_argument("--sets", default="als,seestar,demo", help="comma-separated: als, seestar, demo, genNxWxH")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ", ".join(TOOLS))
    parser.add_argument("--per-rule", action="store_true", help="also print nightstack's per-rule table")
    parser.add_argument("--keep", action="store_true", help="keep the work dirs under benchmarks/out/work")
    parser.add_argument("--astroalign-worker", metavar="SPEC", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.astroalign_worker:
        astroalign_worker(args.astroalign_worker)
        return 0
    sets = ["als"] if args.quick else [s.strip() for s in args.sets.split(",") if s.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        raise SystemExit(f"bench_pipeline: unknown tool(s) {unknown} ({', '.join(TOOLS)})")
    if not Path("/usr/bin/time").exists():
        raise SystemExit("bench_pipeline: needs GNU time at /usr/bin/time (apt-get install time)")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in sets:
        ds = load_data_set(name)
        for tool in tools:
            rows.append(measure(ds, tool, args.keep))
    table = format_table(rows)
    print()
    print(table)
    if args.per_rule:
        print()
        print(format_rules(rows))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = OUT / f"pipeline_{stamp}.json"
    out_path.write_text(json.dumps({
        "date": stamp, "cores": CORES, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
        "rows": [asdict(r) | {"wall_over_siril": ratio_to_siril(rows, r)} for r in rows],
        "table": table,
    }, indent=2, default=str))
    print(f"\nwritten {out_path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
