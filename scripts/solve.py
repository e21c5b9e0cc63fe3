"""Snakemake adapter: global bundle adjustment of a night."""

from nightstack.logs import run_step
from nightstack.steps import solve_step

frames = list(snakemake.params.frames)
run_step(
    solve_step,
    snakemake.wildcards.night,
    frames,
    dict(zip(frames, snakemake.input.catalogs)),
    dict(zip(frames, snakemake.input.poses)),
    snakemake.input.reference,
    snakemake.output[0],
    snakemake.params.registration,
    snakemake.params.quality,
    log_path=snakemake.log[0],
)
