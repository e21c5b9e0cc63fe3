"""Snakemake adapter: register every night's stack on the reference night's and combine them."""

from nightstack.logs import run_step
from nightstack.steps import combine_step

nights = list(snakemake.params.nights)
run_step(
    combine_step,
    dict(zip(nights, snakemake.input.stacks)),
    dict(zip(nights, snakemake.input.solutions)),
    snakemake.output.fits,
    snakemake.output.solution,
    snakemake.params.combine,
    snakemake.params.stars,
    snakemake.params.registration,
    log_path=snakemake.log[0],
)
