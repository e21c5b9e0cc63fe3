"""Snakemake adapter: write stack.fits, stack.tif, stack.png and the light-pollution model."""

from nightstack.logs import run_step
from nightstack.steps import outputs_step

run_step(
    outputs_step,
    snakemake.input[0],  # the linear stack (the first input of outputs and combine_outputs)
    snakemake.output.fits,
    snakemake.output.tiff,
    snakemake.output.png,
    snakemake.params.background,
    snakemake.params.output,
    out_model=snakemake.output.model,
    sky_mask=snakemake.input.get("sky_mask"),
    log_path=snakemake.log[0],
)
