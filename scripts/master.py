"""Snakemake adapter: combine calibration frames into a master."""

from nightstack.logs import run_step
from nightstack.steps import master_step

run_step(
    master_step,
    snakemake.wildcards.kind,
    list(snakemake.input.frames),
    snakemake.output[0],
    snakemake.params.calibration,
    bias=snakemake.input.get("bias"),
    log_path=snakemake.log[0],
    reuse_memory=True,
)
