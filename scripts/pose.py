"""Snakemake adapter: register one frame on the reference."""

from nightstack.logs import run_step
from nightstack.steps import pose_step

run_step(
    pose_step,
    snakemake.wildcards.frame,
    snakemake.input.catalog,
    snakemake.input.reference,
    snakemake.output[0],
    snakemake.params.registration,
    log_path=snakemake.log[0],
)
