"""Landscape nights through the workflow, default settings: a small landscape demo night against
its truth mask, the Canon 40D frames through bare branches, and deep-sky nights that must keep
an all-sky mask (so their results do not change)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image
from scipy import ndimage

from conftest import shared_dataset
from nightstack.io import read_catalog, read_json
from nightstack.stars import StarConfig, fit_stars, luminance
from nightstack.steps import stack_step

from workflow_helpers import read_stack, snakemake, write_config

pytestmark = [pytest.mark.workflow]

DEMO = {"landscape": True, "n_lights": 8, "width_px": 640, "height_px": 427}


# ---------------------------------------------------------------------------- measures


def iou(a, b) -> float:
    """Intersection over union of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def signed_distance_px(sky) -> np.ndarray:
    """Distance (px) of every pixel from the sky/ground boundary: > 0 in the sky, < 0 on the
    ground."""
    return np.where(sky, ndimage.distance_transform_edt(sky), -ndimage.distance_transform_edt(~sky))


def gradient(image2d) -> np.ndarray:
    """Gradient magnitude (ADU/px): Sobel over 8."""
    return np.hypot(ndimage.sobel(image2d, 0), ndimage.sobel(image2d, 1)) / 8.0


def high_pass(image2d) -> np.ndarray:
    """The image minus its Gaussian blur (sigma 3 px): edges and texture, no levels."""
    return image2d - ndimage.gaussian_filter(image2d, 3.0)


def edge_energy_ratio(stack, single, signed) -> float:
    """Mean squared gradient on the silhouettes (|distance| <= 2 px) of the stack over that of
    the single frame: a smeared or doubled silhouette spreads its step and loses energy here."""
    band = np.abs(signed) <= 2
    return float(np.mean(gradient(stack)[band] ** 2) / np.mean(gradient(single)[band] ** 2))


def ghost_ratio(image2d, signed) -> float:
    """Doubled-silhouette measure: mean squared gradient 4-9 px from the silhouettes over that
    12-20 px away, on the sky side and on the ground side; the larger of the two. A copy of the
    silhouette shifted by the sky's motion (the ground registered with the sky) lands there."""
    energy = gradient(image2d) ** 2
    ratios = []
    for side in (-1, 1):
        d = side * signed
        ratios.append(energy[(d >= 4) & (d <= 9)].mean() / energy[(d >= 12) & (d <= 20)].mean())
    return float(max(ratios))


def silhouette_correlation(stack, single, signed) -> float:
    """Correlation of the high-passed stack and single frame within 6 px of the silhouettes."""
    zone = np.abs(signed) <= 6
    return float(np.corrcoef(high_pass(stack)[zone], high_pass(single)[zone])[0, 1])


def rim_profile(stack, single, signed) -> np.ndarray:
    """Halo measure: for d = 1..8 px on each side of the silhouettes, the median of
    (stack - single frame) at distance d minus its median 12-20 px away on the same side.
    A halo (sky lifted or darkened along the silhouette, or ground light spread into the sky)
    is a rim in this profile. Returns (16,): ground side d = -8..-1, then sky side d = 1..8."""
    diff = stack - single
    d = np.round(signed)
    out = []
    for side in (-1, 1):
        far = np.median(diff[(side * signed >= 12) & (side * signed <= 20)])
        steps = range(8, 0, -1) if side < 0 else range(1, 9)
        out += [np.median(diff[d == side * k]) - far for k in steps]
    return np.array(out)


def pixel_noise(image2d, where) -> float:
    """Per-pixel noise (ADU) of an image: robust sigma of its high pass on pixels ``where``."""
    v = high_pass(image2d)[where]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def star_shapes(image2d, xy):
    """(median ellipticity, median FWHM px) of the library's Gaussian fits at positions xy."""
    fit = fit_stars(image2d, xy[:, 0], xy[:, 1], StarConfig())
    ok = np.asarray(fit["ok"], bool)
    return float(np.median(np.asarray(fit["ellipticity"])[ok])), float(np.median(np.asarray(fit["fwhm_px"])[ok]))


def night_images(results):
    """(solution, sky mask, stack luminance, reference frame luminance, reference star xy)."""
    sol = read_json(results / "solution.json")
    ref = sol["reference"]
    sky = fits.getdata(results / "sky_mask.fits") > 0
    stack = luminance(read_stack(results / "stack_linear.fits").astype(np.float32))
    single = luminance(fits.getdata(results / "calibrated" / f"{ref}.fits").astype(np.float32))
    cat = read_catalog(results / "stars" / f"{ref}.ecsv")
    return sol, sky, stack, single, np.column_stack([cat["x"], cat["y"]])


def naive_stack(results, sol, tmp_path):
    """Control: the same frames and registration, stacked as if all were sky."""
    frames = [r["frame"] for r in sol["frames"]]
    out = tmp_path / "naive.fits"
    stack_step("control", results / "solution.json",
               {f: results / "calibrated" / f"{f}.fits" for f in frames},
               {f: results / "stars" / f"{f}.ecsv" for f in frames}, out,
               {"method": "winsorized", "weighting": "sharpness", "interpolation": "lanczos3"})
    return luminance(read_stack(out).astype(np.float32))


# ---------------------------------------------------------------------------- demo night


@pytest.fixture(scope="module")
def demo_landscape(tmp_path_factory):
    work = tmp_path_factory.mktemp("landscape_demo")
    write_config(work, demo=DEMO)
    snakemake(work, "results/demo/stack.fits", timeout=2400)
    return work


def test_demo_auto_mask_matches_the_truth(demo_landscape):
    truth = np.asarray(Image.open(demo_landscape / "resources/demo-night/truth_sky_mask.png")) > 127
    sky = fits.getdata(demo_landscape / "results/demo/sky_mask.fits") > 0
    assert iou(~sky, ~truth) >= 0.95, iou(~sky, ~truth)
    assert fits.getheader(demo_landscape / "results/demo/sky_mask.fits")["GNDFRAC"] == pytest.approx(
        np.mean(~truth), abs=0.01)


def test_demo_stack_ground_is_frozen_sharp_and_single(demo_landscape, tmp_path):
    results = demo_landscape / "results/demo"
    sol, sky, stack, single, xy = night_images(results)
    assert all(r["status"] == "accepted" for r in sol["frames"])
    signed = signed_distance_px(sky)
    frames = [luminance(fits.getdata(results / "calibrated" / f"{r['frame']}.fits").astype(np.float32))
              for r in sol["frames"]]
    frozen = np.mean(frames, axis=0)
    inner = signed <= -3
    # the ground is the frozen mean of the frames at their own pixels: same texture, no blur
    assert np.corrcoef(high_pass(stack)[inner], high_pass(frozen)[inner])[0, 1] >= 0.95
    assert np.median(np.abs(stack - frozen)[inner]) < 0.2 * np.std(frozen[inner])
    assert edge_energy_ratio(stack, single, signed) >= 0.85
    assert silhouette_correlation(stack, single, signed) >= 0.95
    naive = naive_stack(results, sol, tmp_path)
    # horizon and branches not doubled: no more edges near the silhouettes than in the frame
    assert ghost_ratio(stack, signed) <= 1.2 * max(1.0, ghost_ratio(single, signed))
    assert ghost_ratio(naive, signed) > 2.0  # the control, registered as all sky, has them
    assert edge_energy_ratio(naive, single, signed) < 0.5
    ell, _ = star_shapes(stack, xy[sky[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]])
    assert ell <= 0.15, ell


# ---------------------------------------------------------------------------- real: trees


@pytest.fixture(scope="module")
def trees_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("trees")
    write_config(work, nights={"trees": str(shared_dataset("startrail_canon40d_trees"))})
    snakemake(work, "results/trees/stack.fits", timeout=2400)
    return work / "results" / "trees"


@pytest.mark.realdata
def test_trees_branches_single_sharp_stars_round_no_halo(trees_run, tmp_path):
    sol, sky, stack, single, xy = night_images(trees_run)
    assert sum(r["status"] == "accepted" for r in sol["frames"]) >= 5
    ground = 1 - sky.mean()
    assert 0.35 <= ground <= 0.65, ground  # branches and tree tops fill about half the frame
    assert fits.getheader(trees_run / "sky_mask.fits")["NSMASK"] == "auto"
    signed = signed_distance_px(sky)
    naive = naive_stack(trees_run, sol, tmp_path)
    # branches single and sharp (the registered-everything control fails each of these)
    assert edge_energy_ratio(stack, single, signed) >= 0.85
    assert edge_energy_ratio(naive, single, signed) < 0.8
    assert silhouette_correlation(stack, single, signed) >= 0.95
    assert silhouette_correlation(naive, single, signed) < 0.9
    assert ghost_ratio(stack, signed) <= 1.2 * max(1.0, ghost_ratio(single, signed))
    # no halo: no rim along the silhouettes beyond the single frame's pixel noise
    noise = pixel_noise(single, signed >= 12)
    rim = rim_profile(stack, single, signed)
    assert np.abs(rim).max() <= noise, (rim, noise)
    assert np.abs(rim_profile(naive, single, signed)).max() > 2 * noise
    # stars round, about as in the frame
    in_sky = sky[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    ell_stack, _ = star_shapes(stack, xy[in_sky])
    ell_single, _ = star_shapes(single, xy[in_sky])
    assert ell_stack <= max(0.3, ell_single + 0.05), (ell_stack, ell_single)


# ---------------------------------------------------------------------------- real: deep sky


DEEP = {"als": "als_m27_asi224mc", "seestar": "seestar_ngc7023_s50",
        "panoptes": "panoptes_canon_crops", "tetra3": "tetra3_widefield_tiff"}


@pytest.fixture(scope="module")
def deep_masks(tmp_path_factory):
    work = tmp_path_factory.mktemp("deep_masks")
    write_config(work, nights={n: str(shared_dataset(d)) for n, d in DEEP.items()})
    snakemake(work, *[f"results/{n}/sky_mask.fits" for n in DEEP], timeout=2400)
    return work / "results"


@pytest.mark.realdata
@pytest.mark.parametrize("night", list(DEEP))
def test_deep_sky_nights_have_no_ground(deep_masks, night):
    """auto finds no ground, neither in the night's mask nor in any frame's light-pollution fit,
    so these nights are processed exactly as before."""
    with fits.open(deep_masks / night / "sky_mask.fits") as hdul:
        assert hdul[0].header["GNDFRAC"] == 0.0
        assert hdul[0].data.all()
    for path in sorted((deep_masks / night / "calibrated").glob("*.fits")):
        assert fits.getheader(path).get("GNDFRAC", 0.0) == 0.0, path.name


def test_missing_mask_image_stops_the_workflow_naming_it(tmp_path):
    write_config(tmp_path, landscape={"ground": "masks/nowhere.png"}, demo=DEMO)
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "masks/nowhere.png does not exist" in proc.stdout + proc.stderr
