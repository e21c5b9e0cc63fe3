"""Figures of the stack framings (nightstack.framing), printed as text.

    python benchmarks/framing_figures.py            # crop rectangle vs brute force
    python benchmarks/framing_figures.py WORKDIR    # also a finished tests/test_workflow_framing.py
                                                    # run (pytest --basetemp=DIR: WORKDIR = DIR/framing0)

Run from the repository root.
"""

import sys
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolygonPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_framing import covered, largest_rectangle_in_mask, night_geometry, pixels

from nightstack.framing import footprints_of, output_box


def crop_figures() -> None:
    """Crop of the rotating test geometry (undistorted, barrel, pincushion) vs a brute-force
    search of the mask of pixels every frame covers."""
    for k1 in (0.0, -0.05, 0.08):
        warps = night_geometry(k1=k1)
        ref = warps[0].ref_camera
        box, details = output_box("crop", warps, ref.width_px, ref.height_px)
        mask = covered(warps, pixels(0, 0, ref.width_px - 1, ref.height_px - 1)).all(axis=0)
        brute = largest_rectangle_in_mask(mask.reshape(ref.height_px, ref.width_px))
        area = box.width_px * box.height_px
        cont = details["continuous_rectangle_ref_px"]
        print(f"k1={k1:+.2f}: crop {box.width_px}x{box.height_px} at ({box.x0_px}, {box.y0_px}) "
              f"= {area} px; brute force {brute} px ({100 * (area / brute - 1):+.3f} %); "
              f"continuous optimum {cont['width']:.3f} x {cont['height']:.3f} px")


def workflow_figures(workdir: Path) -> None:
    """Boxes from the solution and the truth, coverage vs point-in-polygon, edge sky levels."""
    from test_workflow_framing import (
        _read,
        edge_and_centre,
        solved_geometry,
        true_geometry,
    )

    run = _read(workdir / "results" / "rotating", "maximize")
    sol = run["solution"]
    for framing in ("crop", "maximize"):
        solved, _ = output_box(framing, solved_geometry(sol), 800, 533)
        truth, _ = output_box(framing, true_geometry(sol), 800, 533)
        print(f"{framing}: from the solution {solved}\n{' ' * len(framing)}  from the truth    {truth}")
    geometry = solved_geometry(sol)
    box, _ = output_box("maximize", geometry, 800, 533)
    yy, xx = np.mgrid[box.y0_px:box.y0_px + box.height_px, box.x0_px:box.x0_px + box.width_px]
    xy = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    counts = [np.sum([PolygonPath(f).contains_points(xy, radius=r) for f in footprints_of(geometry)],
                     axis=0) for r in (5e-3, -5e-3)]
    lo, hi = np.minimum(*counts), np.maximum(*counts)
    cov = run["coverage"].ravel()
    print(f"COVERAGE vs point in polygon: {int(np.sum((cov < lo) | (cov > hi)))} of {cov.size} px "
          f"disagree, {int(np.sum(lo != hi))} px within 0.005 px of a footprint edge; "
          f"frames per px histogram {np.bincount(cov).tolist()}")
    for stage in ("linear", "final"):
        (edge, edge_err, noise), (centre, centre_err, _) = edge_and_centre(run, stage)
        print(f"{stage}: sky where 1 frame covers {np.round(edge, 2)}, where all do "
              f"{np.round(centre, 2)} ADU (R, G, B); difference {np.round(edge - centre, 2)}, "
              f"standard error {np.round(np.hypot(edge_err, centre_err), 2)}, noise per px "
              f"{np.round(noise, 1)}")


if __name__ == "__main__":
    crop_figures()
    if len(sys.argv) > 1:
        workflow_figures(Path(sys.argv[1]))
