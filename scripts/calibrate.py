"""Snakemake adapter: calibrate one light frame."""

from nightstack.logs import run_step
from nightstack.steps import calibrate_step

masters = {k: snakemake.input.get(k) for k in ("bias", "dark", "flat")}
run_step(
    calibrate_step,
    snakemake.params.light,
    snakemake.output[0],
    masters,
    snakemake.params.calibration,
    snakemake.params.background,
    snakemake.params.landscape,
    snakemake.params.frame_format,
    log_path=snakemake.log[0],
    reuse_memory=True,
)
