"""Snakemake adapter: detect the stars of one calibrated frame."""

from nightstack.logs import run_step
from nightstack.steps import stars_step

run_step(stars_step, snakemake.input[0], snakemake.output[0], snakemake.params.stars, log_path=snakemake.log[0])
