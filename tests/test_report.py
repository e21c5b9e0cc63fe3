"""`snakemake --report` on a small demo night: a self-contained HTML report that embeds the
stacked preview and the diagnostic plots, and that a headless browser actually renders."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workflow_helpers import snakemake, write_config

from nightstack import plots
from nightstack.io import read_catalog, read_json

pytestmark = pytest.mark.workflow

CHROMIUM = "/usr/bin/chromium"
PLOTS = ("frame_quality", "star_matches", "residual_field", "noise_curve", "light_pollution")


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    write_config(work, demo={"n_lights": 6, "width_px": 800, "height_px": 533})
    snakemake(work, timeout=1200)
    snakemake(work, "--report", "report.html", timeout=300)
    return work


def _embedded_png(html: str, name: str):
    """Bytes of the image the report embeds under file name ``name`` (None if absent)."""
    m = re.search(rf"data:image/png;[^,\"]*filename={re.escape(name)};base64,([A-Za-z0-9+/=]+)", html)
    return base64.b64decode(m.group(1)) if m else None


def test_report_is_self_contained(report_run):
    html = (report_run / "report.html").read_text(encoding="utf-8")
    # nothing is fetched from the network: no remote script/image src, stylesheet or CSS import
    remote_src = re.findall(r"""\bsrc\s*=\s*["']?(https?://[^"' >]+)""", html, flags=re.IGNORECASE)
    remote_css = re.findall(r"""<link[^>]+href\s*=\s*["']?(https?://[^"' >]+)""", html, flags=re.IGNORECASE)
    assert not remote_src and not remote_css, (remote_src + remote_css)[:5]
    assert not re.search(r"""(?:@import|url\()\s*["']?https?://""", html)


def test_report_embeds_the_stack_and_every_plot(report_run):
    html = (report_run / "report.html").read_text(encoding="utf-8")
    night = report_run / "results" / "demo"
    files = {f"{p}.png": night / "plots" / f"{p}.png" for p in PLOTS}
    files["stack.png"] = night / "stack.png"
    for name, path in files.items():
        assert path.is_file(), name
        assert _embedded_png(html, name) == path.read_bytes(), f"{name} is not embedded whole"
    for name in (f"{p}.png" for p in PLOTS):
        with Image.open(night / "plots" / name) as im:
            pixels = np.asarray(im.convert("L"), float)
        assert im.size[0] >= 600 and pixels.std() > 10, name  # a real figure, not an empty canvas


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"CI run without {CHROMIUM}: list `chromium` in .ci/apt-packages")
        pytest.skip(f"{CHROMIUM} is not installed")
    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,1000",
           (report_run / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), proc.stderr[-3000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), float)
    assert pixels.shape == (1000, 1400)
    # the rendered single-page app (grey sidebar, menu text, workflow graph) is far from a blank
    # page; a report whose scripts failed to run shows one uniform colour
    assert pixels.std() > 15, pixels.std()
    _, counts = np.unique(pixels, return_counts=True)
    assert 1 - counts.max() / pixels.size > 0.1  # more than a tenth of the page is drawn on
    assert (pixels < 100).sum() > 2000  # dark text and graph nodes


def test_rejected_frames_are_marked_with_their_reason(report_run, tmp_path):
    night = report_run / "results" / "demo"
    sol = read_json(night / "solution.json")
    victim = next(r for r in sol["frames"] if r["frame"] != sol["reference"])
    victim.update(status="rejected", reason="only 2 stars match the reference (need 6)")
    catalogs = {r["frame"]: night / "stars" / f"{r['frame']}.ecsv" for r in sol["frames"]}
    series = plots.frame_quality_series(sol, catalogs)
    i = series["frame"].index(victim["frame"])
    assert not series["accepted"][i] and series["reason"][i].startswith("only 2 stars")
    assert series["accepted"].sum() == len(sol["frames"]) - 1
    out = tmp_path / "quality.png"
    plots.plot_frame_quality(sol, catalogs, out)
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB"), int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 200  # the rejected markers and the reason are drawn in red


def test_noise_curve_expectation():
    # equal frames: 1/sqrt(N); one frame weighted out: the curve stops falling
    assert np.allclose(plots.expected_noise_curve([4.0] * 4, [1] * 4), 4.0 / np.sqrt([1, 2, 3, 4]))
    curve = plots.expected_noise_curve([4.0, 4.0, 4.0], [1.0, 1.0, 1e-9])
    assert curve[2] == pytest.approx(curve[1], rel=1e-6)


def test_noise_curve_is_measured_in_the_stack(report_run):
    night = report_run / "results" / "demo"
    sol = read_json(night / "solution.json")
    info = read_json(night / "stack_linear.json")["info"]
    curve = info["noise_curve"]
    n_used = sum(r["status"] == "accepted" for r in sol["frames"])
    assert curve["n_frames"] == list(range(1, n_used + 1))
    noise = np.array(curve["noise_adu"])
    assert noise[-1] < 0.6 * noise[0]  # 6 frames: ideally 1/sqrt(6) = 0.41
    # close to the expectation from each frame's own noise and weight
    used = [r for r in plots.frames_by_time(sol) if r["status"] == "accepted"]
    catalogs = [read_catalog(night / "stars" / f"{r['frame']}.ecsv") for r in used]
    frame_noise = [np.sqrt(np.mean(np.square(c.meta["channel_noise"]))) / (r.get("flux_scale") or 1.0)
                   for c, r in zip(catalogs, used)]
    by_frame = {Path(p).stem: w for p, w in (info["weights"] or {}).items()}
    weights = [by_frame[r["frame"]] for r in used] if by_frame else [1.0] * n_used
    expected = plots.expected_noise_curve(frame_noise, weights)
    assert noise[-1] == pytest.approx(expected[-1], rel=0.15)
    assert curve["stack_noise_adu"] == pytest.approx(noise[-1], rel=0.15)


def test_light_pollution_summary_and_plot(tmp_path):
    from nightstack.outputs import write_background_model

    yy, xx = np.mgrid[0:300, 0:400]
    model = np.stack([500 + 0.1 * xx, 400 + 0.05 * yy, 300 + 0.0 * xx])  # R brightens to the right
    s = plots.light_pollution_summary(model)
    np.testing.assert_allclose(s["sky_adu"], [500 + 0.1 * 199.5, 400 + 0.05 * 149.5, 300], rtol=1e-3)
    np.testing.assert_allclose(s["ptp_adu"], [0.1 * 399, 0.05 * 299, 0.0], rtol=1e-6)
    assert s["ptp_percent"][0] == pytest.approx(100 * 39.9 / 519.95, rel=1e-3)
    path = tmp_path / "background_model.fits"
    write_background_model(path, model, removed=True)
    out = tmp_path / "light_pollution.png"
    plots.plot_light_pollution(path, out)
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB"), int)
    assert im.size[0] >= 600 and rgb.std() > 10
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 500  # the R - G tint panel is red where R is brighter


def test_chromium_listed_for_ci():
    from workflow_helpers import REPO

    packages = (REPO / ".ci" / "apt-packages").read_text().split()
    assert "chromium" in packages
