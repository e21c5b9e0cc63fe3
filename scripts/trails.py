"""Snakemake adapter: star-trail image of a night (no registration)."""

from nightstack.logs import run_step
from nightstack.steps import trails_step

run_step(
    trails_step,
    snakemake.wildcards.night,
    list(snakemake.input.calibrated),
    snakemake.output.fits,
    snakemake.params.trails,
    sky_mask=snakemake.input.sky_mask,
    log_path=snakemake.log[0],
)
