"""Snakemake adapter: choose the reference frame of a night."""

from nightstack.logs import run_step
from nightstack.steps import reference_step

catalogs = dict(zip(snakemake.params.frames, snakemake.input.catalogs))
run_step(
    reference_step,
    snakemake.wildcards.night,
    catalogs,
    snakemake.output[0],
    snakemake.params.reference,
    log_path=snakemake.log[0],
)
