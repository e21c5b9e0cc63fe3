"""Snakemake adapter: detect the stars of one calibrated frame (in the sky of its night)."""

from nightstack.logs import run_step
from nightstack.steps import stars_step

run_step(
    stars_step,
    snakemake.input.calibrated,
    snakemake.output[0],
    snakemake.params.stars,
    sky_mask=snakemake.input.sky_mask,
    log_path=snakemake.log[0],
)
