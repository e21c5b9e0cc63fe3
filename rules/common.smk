import functools
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from nightstack import config as ns_config
from nightstack import demo as ns_demo
from nightstack import io as ns_io
from nightstack import landscape as ns_landscape
from nightstack import loading as ns_loading
from nightstack import scheduling as ns_scheduling
from nightstack.errors import NightstackError

# Snakemake (8.17-9.x) starts one more scheduler wake-up timer on every pass, so wake-ups grow
# with the square of the jobs: 630 s of its own CPU on a 500-frame night (40 % of a core).
ns_scheduling.coalesce_reevaluation_timers()


def _load_nights():
    """Validate the config and list every night's frames (folder scan at parse time)."""
    ns_config.validate(config)
    nights = ns_config.resolve_nights(config["nights"])
    demo_folder = Path(config.get("demo", {}).get("folder", "resources/demo-night"))
    frames, calib = {}, {}
    for name, folder in nights.items():
        if not folder.exists() and folder.resolve() == demo_folder.resolve():
            found = ns_config.demo_inventory(folder, demo_config())
        else:
            found = ns_config.inventory(folder)
        if not found["light"]:
            raise NightstackError(f"night '{name}' ({folder}) holds no light frames")
        ignored = found.get("ignored", [])
        if ignored:
            names = ", ".join(p.name for p in ignored)
            logger.warning(
                f"night '{name}': ignoring files nightstack does not read: {names}"
            )
        frames[name] = ns_config.frame_ids(found["light"])
        calib[name] = {k: found[k] for k in ns_config.CALIBRATION_KINDS}
    ns_config.check_results_writable(config.get("results", "results"))
    return nights, frames, calib


def demo_config():
    params = {k: v for k, v in config.get("demo", {}).items() if k != "folder"}
    return ns_demo.DemoConfig(**params)


try:
    NIGHTS, FRAMES, CALIB = _load_nights()
    ns_config.check_combine(config, NIGHTS)
except NightstackError as exc:
    raise WorkflowError(f"nightstack: {exc}")

RESULTS = config.get("results", "results")
DEMO_FOLDER = config.get("demo", {}).get("folder", "resources/demo-night")


wildcard_constraints:
    night="|".join(re.escape(n) for n in NIGHTS),
    frame="[^/]+",
    kind="bias|dark|flat|darkflat",


def night_dir(night):
    return f"{RESULTS}/{night}"


def combining():
    """Nights are combined when there are several and they are stacked (not star trails)."""
    return len(NIGHTS) > 1 and config.get("mode", "deep") == "deep"


def final_outputs():
    nights = [
        f"{night_dir(n)}/stack.{ext}" for n in NIGHTS for ext in ("fits", "tif", "png")
    ]
    combined = [f"{RESULTS}/combined/stack.{ext}" for ext in ("fits", "tif", "png")]
    return nights + (combined if combining() else [])


def night_stacks(wildcards):
    return [f"{night_dir(n)}/stack.fits" for n in NIGHTS]


def night_solutions(wildcards):
    return [f"{night_dir(n)}/solution.json" for n in NIGHTS]


def combine_mem_mb(wildcards, attempt):
    """Each night's stack, its warp and work copies (about 1.5 GB for a 24 MP colour night)."""
    return 1000 + 1500 * len(NIGHTS) * attempt


def light_file(wildcards):
    return str(FRAMES[wildcards.night][wildcards.frame])


def light_input(wildcards):
    """The light as a tracked input; a broken link is no input (its job rejects it by name).

    Files still to be made (the demo night) are inputs like any other.
    """
    path = FRAMES[wildcards.night][wildcards.frame]
    return [] if path.is_symlink() and not path.exists() else [str(path)]


def calibration_files(wildcards):
    return [str(p) for p in CALIB[wildcards.night][wildcards.kind]]


def has_kind(night, kind):
    return bool(CALIB[night][kind])


def master_path(night, kind):
    return f"{night_dir(night)}/masters/{kind}.fits"


def master_dependencies(wildcards):
    """Masters a master needs: darks lose the bias; flats lose the dark-flat or the bias."""
    night, kind = wildcards.night, wildcards.kind
    deps = {}
    if kind == "dark" and has_kind(night, "bias"):
        deps["bias"] = master_path(night, "bias")
    if kind == "flat":
        if has_kind(night, "darkflat"):
            deps["bias"] = master_path(night, "darkflat")
        elif has_kind(night, "bias"):
            deps["bias"] = master_path(night, "bias")
    return deps


def light_masters(wildcards):
    return {
        kind: master_path(wildcards.night, kind)
        for kind in ("bias", "dark", "flat")
        if has_kind(wildcards.night, kind)
    }


def frames_of(night):
    return list(FRAMES[night])


def frame_list(wildcards):
    return frames_of(wildcards.night)


def catalogs_of(wildcards):
    return [
        f"{night_dir(wildcards.night)}/stars/{f}.ecsv" for f in frame_list(wildcards)
    ]


def poses_of(wildcards):
    return [
        f"{night_dir(wildcards.night)}/poses/{f}.json" for f in frame_list(wildcards)
    ]


def calibrated_of(wildcards):
    return [
        f"{night_dir(wildcards.night)}/calibrated/{f}.fits"
        for f in frame_list(wildcards)
    ]


def demo_frames():
    files = ns_config.demo_inventory(DEMO_FOLDER, demo_config())
    return [str(p) for kind in files for p in files[kind]]


def demo_truth_files():
    """Truth files beside truth.json: the sky mask of a landscape demo night, else none."""
    if not demo_config().landscape:
        return []
    return [f"{DEMO_FOLDER}/{ns_demo.SKY_MASK_FILE}"]


def demo_params():
    return config.get("demo", {})


def landscape_params():
    return config.get("landscape", {})


def landscape_mask_input(wildcards):
    """The mask image of config landscape.ground, when it names one (a tracked input)."""
    ground = str(landscape_params().get("ground", "auto")).strip()
    return [] if ground.lower() in ns_landscape.GROUND_KEYWORDS else [ground]


def _check_landscape_mask():
    """A mask image that does not exist stops the workflow at once, naming it."""
    for path in landscape_mask_input(None):
        if not Path(path).is_file():
            raise WorkflowError(
                f"nightstack: config landscape.ground: mask image {path} does not exist "
                "(give auto, none, horizon or the path of an image the size of the lights)"
            )


_check_landscape_mask()


def final_stack(wildcards):
    """The combined image of a night: registered stack, or star trails in trails mode."""
    name = "stack_trails" if config.get("mode", "deep") == "trails" else "stack_linear"
    return f"{night_dir(wildcards.night)}/{name}.fits"


# Job memory, measured (benchmarks/README.md): peak of a job at 1.7 / 24 MP
#   calibrate 220 / 855 MB   stars 169 / 866   master 228 / 590   sky_mask 523 / 767
#   outputs 228 / 893
# as (fixed MB, MB per megapixel of the night's frames): about 20 % above the measured peaks,
# plus 180 MB for the Snakemake process that runs the job on its node (a cluster counts it).
# Each retry asks 50 % more. A job's memory does not grow with the number of frames.
CALIBRATE_MB = (380, 35)
STARS_MB = (380, 35)
MASTER_MB = (430, 25)
SKY_MASK_MB = (780, 15)
OUTPUTS_MB = (430, 40)


@functools.lru_cache(maxsize=None)
def night_megapixels(night):
    """Megapixels of a night's first light (the demo's configured size before it exists);
    24 when the file cannot be read here (its job then rejects it by name)."""
    path = next(iter(FRAMES[night].values()))
    if not path.exists():
        demo = demo_config()
        return demo.width_px * demo.height_px / 1e6
    try:
        width, height = ns_loading.image_size(path)
    except (NightstackError, OSError):
        return 24.0
    return width * height / 1e6


def _frame_mb(night, fixed_and_per_mp, attempt):
    fixed, per_mp = fixed_and_per_mp
    return int((fixed + per_mp * night_megapixels(night)) * (1 + 0.5 * (attempt - 1)))


def frame_sized_mem_mb(fixed_and_per_mp):
    """A rule's mem_mb (resources callable) of (fixed MB, MB per megapixel) for the night's
    frame size, growing on each retry."""

    def mem_mb(wildcards, attempt):
        return _frame_mb(wildcards.night, fixed_and_per_mp, attempt)

    return mem_mb


calibrate_mem_mb = frame_sized_mem_mb(CALIBRATE_MB)
stars_mem_mb = frame_sized_mem_mb(STARS_MB)
master_mem_mb = frame_sized_mem_mb(MASTER_MB)
sky_mask_mem_mb = frame_sized_mem_mb(SKY_MASK_MB)
outputs_mem_mb = frame_sized_mem_mb(OUTPUTS_MB)


def calibrated_frame_format(wildcards):
    """float32 or compressed for a night's calibrated frames (config output, "auto" by size)."""
    output = config["output"]
    return ns_io.calibrated_format(
        output.get("calibrated_frames", "auto"),
        len(FRAMES[wildcards.night]),
        night_megapixels(wildcards.night),
        float(output.get("calibrated_float32_max_gb", 20)),
    )


# the solve holds every frame's registration stars and searches the stars the reference
# missed, so it grows with frames x megapixels: measured 0.32 GB on 16 x 24 MP and on
# 500 x 1.7 MP, 0.78 GB on 500 x 24 MP (benchmarks/bench_solve_scale.py; 2.9 GB before the
# catalogs were dropped once read and the shared stars searched in chunks)
SOLVE_MB = (550, 0.05)  # fixed MB, MB per frame-megapixel


def solve_mem_mb(wildcards, attempt):
    frame_mp = len(FRAMES[wildcards.night]) * night_megapixels(wildcards.night)
    return int((SOLVE_MB[0] + SOLVE_MB[1] * frame_mp) * (1 + 0.5 * (attempt - 1)))


# the stack reads, warps and combines every frame's every pixel: measured 0.8 min on
# 16 x 24 MP (float32 frames) and 66 min on 500 x 24 MP (compressed), about
# 0.0055 min per frame-megapixel; asked twice that, plus 10 min, growing on each retry
STACK_MIN_PER_FRAME_MP = 0.011


def stack_runtime_min(wildcards, attempt):
    frame_mp = len(FRAMES[wildcards.night]) * night_megapixels(wildcards.night)
    return int((10 + STACK_MIN_PER_FRAME_MP * frame_mp) * attempt)


def stack_mem_mb(wildcards, attempt):
    return int(config["stacking"].get("memory_mb", 512)) * 2 + 500 * attempt


def report_plots():
    """The diagnostic plots of every night for the report (deep stacking only: trails have no
    registration to show)."""
    if config.get("mode", "deep") == "trails":
        return []
    names = (
        "frame_quality",
        "star_matches",
        "residual_field",
        "noise_curve",
        "light_pollution",
    )
    return [f"{night_dir(n)}/plots/{name}.png" for n in NIGHTS for name in names]
