"""The landscape acceptance figures of one finished night, with the tests' own measures.

    python benchmarks/landscape_figures.py RESULTS_NIGHT_DIR [TRUTH_SKY_MASK.png]

RESULTS_NIGHT_DIR is results/<night> of a finished deep run (sky_mask.fits, stack_linear.fits,
calibrated/, stars/, solution.json). Prints the ground fraction, the mask IoU against a truth
mask when given, and for the stack and for a control stack of the same frames registered as
all sky ("naive"): edge energy ratio, silhouette correlation, ghost ratio, rim profile maximum
over the single frame's pixel noise, and star ellipticity. Measures: tests/test_workflow_landscape.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_workflow_landscape import (
    edge_energy_ratio,
    ghost_ratio,
    iou,
    naive_stack,
    night_images,
    pixel_noise,
    rim_profile,
    signed_distance_px,
    silhouette_correlation,
    star_shapes,
)


def main(results: Path, truth=None) -> None:
    sol, sky, stack, single, xy = night_images(results)
    signed = signed_distance_px(sky)
    print(f"night {results.name}: ground fraction {1 - sky.mean():.4f}, frames accepted "
          f"{sum(r['status'] == 'accepted' for r in sol['frames'])}/{len(sol['frames'])}")
    if truth:
        t = np.asarray(Image.open(truth)) > 127
        print(f"mask IoU (ground) vs truth: {iou(~sky, ~t):.4f}")
    noise = pixel_noise(single, signed >= 12)
    in_sky = sky[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        naive = naive_stack(results, sol, Path(tmp))
    print(f"single frame: ghost ratio {ghost_ratio(single, signed):.3f}, pixel noise {noise:.3f} ADU, "
          f"star ellipticity/FWHM {star_shapes(single, xy[in_sky])}")
    for name, image in (("stack", stack), ("naive", naive)):
        rim = rim_profile(image, single, signed)
        print(f"{name}: edge energy ratio {edge_energy_ratio(image, single, signed):.3f}, "
              f"silhouette correlation {silhouette_correlation(image, single, signed):.3f}, "
              f"ghost ratio {ghost_ratio(image, signed):.3f}, rim max {np.abs(rim).max():.3f} ADU "
              f"({np.abs(rim).max() / noise:.2f} x noise), star ellipticity/FWHM "
              f"{star_shapes(image, xy[in_sky])}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
