"""Stage helpers that decide a frame's fate: duplicates, other cameras, other sizes, stray
calibration frames; and the clear errors for an unwritable results folder or a full disk."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys

import numpy as np
import pytest

from nightstack import config as ns_config
from nightstack import logs, steps
from nightstack.camera import Camera
from nightstack.errors import NightstackError
from nightstack.io import write_fits_image
from nightstack.loading import RawFrame


def _record(frame, status="accepted", reference=False):
    return {"frame": frame, "file": f"{frame}.fits", "status": status, "reason": "",
            "reference": reference, "H": np.eye(3).tolist(), "zoom": 1.0}


def _metas(digests: dict) -> dict:
    return {frame: {"sha256": digest} for frame, digest in digests.items()}


def test_later_copies_of_a_file_are_rejected_naming_the_first():
    records = [_record("c"), _record("b"), _record("a"), _record("d", status="rejected")]
    steps._reject_duplicates(records, _metas({"a": "x1", "b": "x2", "c": "x1", "d": "x1"}))
    by = {r["frame"]: r for r in records}
    assert by["a"]["status"] == by["b"]["status"] == "accepted"
    assert by["c"]["status"] == "rejected"
    assert by["c"]["reason"] == "duplicate of a.fits (identical file content)"
    assert "H" not in by["c"]
    assert by["d"]["reason"] == ""  # already rejected for its own reason: left alone


def test_the_reference_is_the_copy_kept():
    records = [_record("a"), _record("b", reference=True)]
    steps._reject_duplicates(records, _metas({"a": "same", "b": "same"}))
    assert records[1]["status"] == "accepted"
    assert records[0]["reason"] == "duplicate of b.fits (identical file content)"


def test_file_sha256_changes_with_one_byte(tmp_path):
    one, two = tmp_path / "one.fits", tmp_path / "two.fits"
    one.write_bytes(b"\0" * 100_000)
    two.write_bytes(b"\0" * 99_999 + b"\1")
    assert steps.file_sha256(one) == steps.file_sha256(one)
    assert steps.file_sha256(one) != steps.file_sha256(two)
    assert len(steps.file_sha256(one)) == 64


@pytest.mark.parametrize(
    "mine, theirs, rejected",
    [("Seestar S50", "ZWO CCD ASI224MC", True), ("ZWO CCD ASI224MC ", "ZWO CCD ASI224MC", False),
     (None, "ZWO CCD ASI224MC", False), ("Canon EOS 6D", None, False)],
)
def test_other_camera_is_named_only_when_both_are_known(mine, theirs, rejected):
    reason = steps.other_camera({"instrument": mine}, {"instrument": theirs})
    assert bool(reason) is rejected
    if rejected:
        assert f"'{mine}'" in reason and f"'{theirs}'" in reason


def test_size_mismatch_says_when_the_camera_was_turned():
    cam = Camera(1304, 976, 3000.0)
    turned = steps.size_mismatch({"width_px": 976, "height_px": 1304}, cam)
    assert turned.startswith("frame is 976x1304 px but the reference is 1304x976 px")
    assert "portrait" in turned and "quarter turn" in turned
    other = steps.size_mismatch({"width_px": 1000, "height_px": 800}, cam)
    assert other == "frame is 1000x800 px but the reference is 1304x976 px"


def _raw(shape, pattern="RGGB", source="f.fits"):
    return RawFrame(data=np.full(shape, 100.0, np.float32), cfa_pattern=pattern, source=source,
                    exptime_s=0.0, date_obs=None, instrument=None, gain=None, iso=None,
                    black_level=0.0, white_level=65535.0, focal_mm=None, pixel_um=None, header={})


def test_stray_calibration_frames_are_dropped_by_name(caplog):
    frames = [_raw((40, 60), source=f"b{i}.fits") for i in range(3)]
    frames += [_raw((30, 60), source="odd_size.fits"), _raw((40, 60), "GRBG", source="odd_cfa.fits")]
    with caplog.at_level(logging.WARNING, logger="nightstack"):
        logs.log.propagate = True
        try:
            kept = steps._majority_geometry(frames, "bias")
        finally:
            logs.log.propagate = False
    assert [f.source for f in kept] == ["b0.fits", "b1.fits", "b2.fits"]
    text = caplog.text
    assert "skipping bias frame odd_size.fits: 60x30 px, CFA RGGB, but the other 3 bias frames are 60x40 px" in text
    assert "skipping bias frame odd_cfa.fits: 60x40 px, CFA GRBG" in text


def test_ignored_files_are_listed(tmp_path):
    lights = tmp_path / "night" / "lights"
    lights.mkdir(parents=True)
    write_fits_image(lights / "a.fits", np.zeros((8, 8), np.float32))
    (lights / "notes.txt").write_text("clouds after 23h")
    (lights / "a.fits.xmp").write_text("<x/>")
    (lights / ".hidden").write_text("")
    assert [p.name for p in ns_config.inventory(tmp_path / "night")["ignored"]] == ["a.fits.xmp", "notes.txt"]


def test_results_folder_that_cannot_be_made_is_named(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    ns_config.check_results_writable(tmp_path / "fine" / "results")
    with pytest.raises(NightstackError, match=r"results folder .*a file/results is not writable \(Not a directory\)"):
        ns_config.check_results_writable(blocker / "results")


def _failing_step(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_ends_a_step_with_one_line(tmp_path):
    code = (
        "import sys; from nightstack import logs; import test_steps;"
        f"logs.run_step(test_steps._failing_step, {str(tmp_path / 'out.fits')!r}, log_path={str(tmp_path / 'x.log')!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).parent))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"nightstack error: cannot read or write {tmp_path / 'out.fits'}: no space left on device (disk full)"
