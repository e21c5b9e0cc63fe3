"""Snakemake adapter: reproject and combine the accepted frames of a night."""

from nightstack.logs import run_step
from nightstack.steps import stack_step

frames = list(snakemake.params.frames)
run_step(
    stack_step,
    snakemake.wildcards.night,
    snakemake.input.solution,
    dict(zip(frames, snakemake.input.calibrated)),
    dict(zip(frames, snakemake.input.catalogs)),
    snakemake.output.fits,
    snakemake.params.stacking,
    sky_mask=snakemake.input.sky_mask,
    landscape_params=snakemake.params.landscape,
    threads=snakemake.threads,
    log_path=snakemake.log[0],
    reuse_memory=True,
    job_threads=snakemake.threads,
)
