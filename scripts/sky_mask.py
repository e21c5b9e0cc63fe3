"""Snakemake adapter: the night's sky mask (1 = sky), from config ``landscape``."""

from nightstack.logs import run_step
from nightstack.steps import sky_mask_step

run_step(
    sky_mask_step,
    snakemake.wildcards.night,
    list(snakemake.input.calibrated),
    snakemake.output[0],
    snakemake.params.landscape,
    log_path=snakemake.log[0],
)
