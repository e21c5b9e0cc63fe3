"""The workflow on nights with faulty inputs: bad frames are rejected with a reason and the
rest still stacks, a night with no usable frame stops with one clear line, inputs are never
modified, config mistakes are named, and folder/file names with spaces and accents work.

Nights are built in tmp dirs from copies of the real ALS M27 frames (ASI224MC, 1304x976
RGGB); the originals are only read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from nightstack.io import read_catalog, read_json
from nightstack.outputs import frame_names_from_header

from conftest import shared_dataset
from workflow_helpers import snakemake, write_config

pytestmark = pytest.mark.workflow

ALS = "als_m27_asi224mc"
ALS_FRAMES = ("Light_1069.fits", "Light_1114.fits", "Light_1171.fits", "Light_1254.fits")
TRUNCATED_BYTES = 100_000
CROP_W, CROP_H = 1000, 800


# --------------------------------------------------------------------------- building nights


def copy_good_frames(source: Path, lights: Path, names=None) -> list[str]:
    """Copy the first 4 ALS frames into ``lights`` (optionally renamed); return the new names."""
    lights.mkdir(parents=True, exist_ok=True)
    names = names or ALS_FRAMES
    for src, dest in zip(ALS_FRAMES, names):
        shutil.copyfile(source / src, lights / dest)
    return list(names)


def write_truncated(src: Path, dest: Path, n_bytes: int = TRUNCATED_BYTES) -> None:
    with open(src, "rb") as fh:
        dest.write_bytes(fh.read(n_bytes))


def _header_for_rewrite(header: fits.Header) -> fits.Header:
    """A copy of a raw frame's header without the keys astropy sets itself on writing."""
    hdr = header.copy()
    for key in ("BZERO", "BSCALE", "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND"):
        hdr.remove(key, ignore_missing=True)
    return hdr


def write_cropped(src: Path, dest: Path, width_px: int = CROP_W, height_px: int = CROP_H) -> None:
    """A new FITS holding the top-left width x height of ``src`` (even offsets keep RGGB)."""
    with fits.open(src) as hdul:
        data = np.array(hdul[0].data[:height_px, :width_px])
        hdr = _header_for_rewrite(hdul[0].header)
    fits.PrimaryHDU(data=data, header=hdr).writeto(dest)


def write_starless(src: Path, dest: Path, seed: int = 3) -> None:
    """A copy of ``src`` whose pixels are its median plus Gaussian noise of its sky noise."""
    with fits.open(src) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float64)
        hdr = _header_for_rewrite(hdul[0].header)
    med = np.median(data)
    noise = 1.4826 * np.median(np.abs(data - med))
    rng = np.random.default_rng(seed)
    fake = np.clip(np.rint(rng.normal(med, noise, data.shape)), 0, 65535).astype(np.uint16)
    fits.PrimaryHDU(data=fake, header=hdr).writeto(dest)


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``; symlinks by their target."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            digest[rel] = "symlink -> " + os.readlink(path)
        elif path.is_file():
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[rel] = "folder"
    return digest


# The faulty night: 4 good frames and one frame of every kind of fault, each file named
# after its fault. frame id (file stem) -> file name.
GOOD_IDS = ("Light_1069", "Light_1114", "Light_1171", "Light_1254")
FAULTS = {
    "truncated": "truncated.fits",
    "empty": "empty.fits",
    "text_raw": "text_raw.CR2",
    "other_size": "other_size.fits",
    "no_stars": "no_stars.fits",
    "dangling_link": "dangling_link.fits",
    "truncated_raw": "truncated_raw.KDC",
    "table_only": "table_only.fits",
}
KODAK = "raw_kodak_dc50"
KODAK_RAW = "RAW_KODAK_DC50.KDC"
TRUNCATED_RAW_BYTES = 40_000
IGNORED = ("notes.txt", "frame_copy.xisf", "sidecar.fits.xmp")
FOLDER_NAMED_LIKE_A_FRAME = "Light_0000.fits"


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    source = shared_dataset(ALS)
    base = tmp_path_factory.mktemp("faulty")
    night = base / "faulty"
    lights = night / "lights"
    copy_good_frames(source, lights)
    third = source / ALS_FRAMES[2]
    write_truncated(third, lights / FAULTS["truncated"])
    (lights / FAULTS["empty"]).write_bytes(b"")
    (lights / FAULTS["text_raw"]).write_text("this is not a Canon raw file\n" * 20)
    write_cropped(source / ALS_FRAMES[1], lights / FAULTS["other_size"])
    write_starless(third, lights / FAULTS["no_stars"])
    write_truncated(shared_dataset(KODAK) / KODAK_RAW, lights / FAULTS["truncated_raw"], TRUNCATED_RAW_BYTES)
    # a FITS file nightstack cannot use: a table and no image
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="flux", format="E", array=np.arange(3.0))])]).writeto(lights / FAULTS["table_only"])
    # root reads any file whatever its permissions, so "unreadable" is a link to nothing
    os.symlink(lights / "gone" / "Light_9999.fits", lights / FAULTS["dangling_link"])
    # a folder named like a frame must not stop the night (ignored or rejected, never stacked)
    (lights / FOLDER_NAMED_LIKE_A_FRAME).mkdir()
    # files whose suffix nightstack does not read: ignored, even when the content is a frame
    (lights / IGNORED[0]).write_text("seeing 2 arcsec, some clouds after 23h\n")
    shutil.copyfile(third, lights / IGNORED[1])
    (lights / IGNORED[2]).write_text("<x:xmpmeta/>\n")
    before = tree_digest(night)
    work = base / "work"
    work.mkdir()
    write_config(work, nights=str(night))
    proc = snakemake(work, check=False, timeout=900)
    return {"work": work, "night": night, "proc": proc, "before": before,
            "results": work / "results" / "faulty"}


def _frames_by_id(run) -> dict[str, dict]:
    sol = read_json(run["results"] / "solution.json")
    return {rec["frame"]: rec for rec in sol["frames"]}


def _require_success(run):
    proc = run["proc"]
    assert proc.returncode == 0, f"snakemake failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


# --------------------------------------------------------------------------- faulty night


def test_faulty_night_still_stacks_the_good_frames(faulty_run):
    _require_success(faulty_run)
    res = faulty_run["results"]
    frames = _frames_by_id(faulty_run)
    accepted = sorted(f for f, r in frames.items() if r["status"] == "accepted")
    assert accepted == sorted(GOOD_IDS), frames
    assert all(r["status"] == "rejected" for r in frames.values() if r["file"] == FOLDER_NAMED_LIKE_A_FRAME)
    with fits.open(res / "stack.fits") as hdul:
        hdr = hdul[0].header
        assert hdul[0].data.shape == (3, 976, 1304)
        assert np.isfinite(hdul[0].data).mean() > 0.9
    assert hdr["NCOMBINE"] == 4
    assert hdr["EXPTIME"] == pytest.approx(4 * 6.0)
    assert (res / "stack.tif").is_file() and (res / "stack.png").is_file()


def test_unknown_suffixes_are_ignored(faulty_run):
    _require_success(faulty_run)
    frames = _frames_by_id(faulty_run)
    files = {r["file"] for r in frames.values()}
    for name in IGNORED:
        assert name not in files
        assert not list((faulty_run["results"] / "logs" / "calibrate").glob(Path(name).stem.split(".")[0] + "*"))
    # the .xisf copy holds a perfectly good frame: it must not have been stacked either
    expected = {f"{g}.fits" for g in GOOD_IDS} | set(FAULTS.values()) | {FOLDER_NAMED_LIKE_A_FRAME}
    assert files <= expected, files
    assert read_json(faulty_run["results"] / "solution.json")["n_frames"] == len(frames)
    # and the user is told which files were left out
    told = "night 'faulty': ignoring files nightstack does not read: " + ", ".join(sorted(IGNORED))
    assert told in faulty_run["proc"].stdout + faulty_run["proc"].stderr


def _calibrate_log(run, frame_id) -> str:
    return (run["results"] / "logs" / "calibrate" / f"{frame_id}.log").read_text()


@pytest.mark.parametrize(
    "frame_id, words",
    [
        ("truncated", ("truncated", str(TRUNCATED_BYTES))),
        ("empty", ("empty", "0 bytes")),
        ("text_raw", ("raw",)),
        ("dangling_link", ("not found",)),
        ("truncated_raw", ("truncated or corrupt camera raw",)),
        ("table_only", ("no 2d or 3d image",)),
    ],
)
def test_unreadable_frame_rejected_at_calibration(faulty_run, frame_id, words):
    _require_success(faulty_run)
    rec = _frames_by_id(faulty_run).get(frame_id)
    assert rec is not None, f"{FAULTS[frame_id]} is not listed in solution.json"
    assert rec["status"] == "rejected"
    assert rec["file"] == FAULTS[frame_id]
    for word in words:
        assert word.lower() in rec["reason"].lower(), rec["reason"]
    log = _calibrate_log(faulty_run, frame_id)
    prefix = f"rejected {FAULTS[frame_id]}: "
    logged = [ln.split(prefix, 1)[1] for ln in log.splitlines() if prefix in ln]
    assert logged, log
    for word in words:
        assert word.lower() in logged[0].lower(), log
    # solution.json carries the whole reason, not a cut-off copy of it
    assert rec["reason"] == logged[0], (rec["reason"], logged[0])
    with fits.open(faulty_run["results"] / "calibrated" / f"{frame_id}.fits") as hdul:
        assert hdul[0].header["NSSTATUS"] == "rejected" and hdul[0].data is None


def test_frame_of_another_size_rejected_naming_both_sizes(faulty_run):
    _require_success(faulty_run)
    rec = _frames_by_id(faulty_run)["other_size"]
    assert rec["status"] == "rejected"
    assert f"{CROP_W}x{CROP_H}" in rec["reason"] and "1304x976" in rec["reason"], rec["reason"]
    log = (faulty_run["results"] / "logs" / "pose" / "other_size.log").read_text()
    assert f"{CROP_W}x{CROP_H}" in log and "1304x976" in log
    # it was calibrated normally: the size only matters against the reference
    cat = read_catalog(faulty_run["results"] / "stars" / "other_size.ecsv")
    assert (cat.meta["width_px"], cat.meta["height_px"]) == (CROP_W, CROP_H)


def test_frame_without_stars_rejected_about_stars(faulty_run):
    _require_success(faulty_run)
    rec = _frames_by_id(faulty_run)["no_stars"]
    assert rec["status"] == "rejected"
    assert "star" in rec["reason"].lower(), rec["reason"]
    good = [_frames_by_id(faulty_run)[f]["n_stars"] for f in GOOD_IDS]
    assert rec["n_stars"] < 0.05 * min(good), (rec["n_stars"], good)


def test_solution_lists_every_rejection_in_the_solve_log(faulty_run):
    _require_success(faulty_run)
    log = (faulty_run["results"] / "logs" / "solve.log").read_text()
    rejected = [r for r in _frames_by_id(faulty_run).values() if r["status"] == "rejected"]
    assert len(rejected) >= 5
    for rec in rejected:
        assert f"frame {rec['file']} rejected: {rec['reason']}" in log, (rec, log)


def test_inputs_are_never_modified(faulty_run):
    after = tree_digest(faulty_run["night"])
    assert after == faulty_run["before"]


# --------------------------------------------------------------------------- no usable frame


def test_night_without_usable_frame_fails_with_one_clear_line(tmp_path, shared_data):
    source = shared_data(ALS)
    lights = tmp_path / "allbad" / "lights"
    lights.mkdir(parents=True)
    for name in ALS_FRAMES[:2]:
        write_truncated(source / name, lights / name)
    (lights / "empty.fits").write_bytes(b"")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, nights=str(tmp_path / "allbad"))
    proc = snakemake(work, check=False, timeout=600)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    lines = [ln for ln in text.splitlines() if "night 'allbad' has no usable frame" in ln]
    assert lines, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    # the line says why, frame by frame
    assert any(all(n in ln for n in (*ALS_FRAMES[:2], "empty.fits", "truncated")) for ln in lines), lines
    assert not list((work / "results").rglob("stack*.fits"))


# --------------------------------------------------------------------------- config errors


@pytest.fixture
def config_workdir(tmp_path, shared_data):
    lights = tmp_path / "night" / "lights"
    copy_good_frames(shared_data(ALS), lights, names=("a.fits", "b.fits"))
    work = tmp_path / "work"
    work.mkdir()
    return work, tmp_path / "night"


def _dry_run_failure(work) -> str:
    proc = snakemake(work, "-n", check=False, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "stacking, named",
    [
        ({"methd": "mean"}, ("stacking", "methd")),  # unknown key
        ({"method": "foo"}, ("stacking.method", "foo")),  # wrong value
        ({"memory_mb": "lots"}, ("stacking.memory_mb", "lots")),  # wrong type
    ],
    ids=["unknown_key", "wrong_value", "wrong_type"],
)
def test_config_mistake_is_named(config_workdir, stacking, named):
    work, night = config_workdir
    write_config(work, nights=str(night), stacking=stacking)
    text = _dry_run_failure(work)
    lines = [ln for ln in text.splitlines() if "config error" in ln]
    assert lines and any(all(word in ln for word in named) for ln in lines), text[-3000:]


def test_empty_night_is_named(config_workdir, tmp_path):
    work, _ = config_workdir
    empty = tmp_path / "empty night"
    (empty / "lights").mkdir(parents=True)
    write_config(work, nights={"empty": str(empty)})
    text = _dry_run_failure(work)
    assert any(f"night 'empty' ({empty}) holds no light frames" in ln for ln in text.splitlines()), text[-3000:]


def test_unwritable_results_folder_is_named(config_workdir, tmp_path):
    work, night = config_workdir
    blocker = tmp_path / "not a folder"
    blocker.write_text("a file where the results folder should go")
    write_config(work, nights=str(night), results=str(blocker / "results"))
    text = _dry_run_failure(work)
    assert any(f"results folder {blocker / 'results'} is not writable" in ln for ln in text.splitlines()), text[-3000:]
    assert "Traceback" not in text


def test_missing_night_folder_is_named(config_workdir, tmp_path):
    work, _ = config_workdir
    missing = tmp_path / "no such night"
    write_config(work, nights=str(missing))
    text = _dry_run_failure(work)
    assert any(str(missing) in ln and "not exist" in ln for ln in text.splitlines()), text[-3000:]


# --------------------------------------------------------------------------- names


def test_night_name_with_spaces_and_accents_end_to_end(tmp_path, shared_data):
    night = tmp_path / "Nuit d'été 2024"
    names = ["M27 light 1.fits", "M27 light 2.fits", "M27 été 3.fits", "M27 light (4).fits"]
    copy_good_frames(shared_data(ALS), night / "lights", names=names)
    work = tmp_path / "work space"
    work.mkdir()
    write_config(work, nights=str(night))
    snakemake(work, timeout=900)
    stacks = list((work / "results").glob("*/stack.fits"))
    assert len(stacks) == 1, stacks
    res = stacks[0].parent
    sol = read_json(res / "solution.json")
    assert sorted(r["file"] for r in sol["frames"]) == sorted(names)
    assert all(r["status"] == "accepted" for r in sol["frames"]), sol["frames"]
    with fits.open(stacks[0]) as hdul:
        hdr = hdul[0].header
        assert hdr["NCOMBINE"] == 4
    assert sorted(frame_names_from_header(hdr)) == sorted(names)
    assert (res / "stack.tif").is_file() and (res / "stack.png").is_file()


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB file system (tmpfs) for the results: room for one calibrated ALS frame."""
    mount = tmp_path / "small disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_stops_with_one_clear_line_and_no_half_file(tmp_path, shared_data, small_disk):
    night = tmp_path / "night"
    copy_good_frames(shared_data(ALS), night / "lights")
    work = tmp_path / "work"
    work.mkdir()
    results = small_disk / "results"
    write_config(work, nights={"full": str(night)}, results=str(results))
    proc = snakemake(work, check=False, timeout=600)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-4000:]
    full = [ln for ln in text.splitlines() if ln.startswith("nightstack error: cannot write")]
    assert full and all(str(results) in ln and "no space left on device (disk full)" in ln for ln in full), text[-4000:]
    # every output is whole or absent: no temp file left, every FITS written reads in full
    assert not [p for p in results.rglob(".*") if p.is_file()]
    for path in results.rglob("*.fits"):
        with fits.open(path) as hdul:
            assert hdul[0].data is None or np.isfinite(hdul[0].data).all()
