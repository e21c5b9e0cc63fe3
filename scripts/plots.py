"""Snakemake adapter: the diagnostic plots of a night for the report."""

from nightstack.logs import run_step
from nightstack.plots import write_night_plots

frames = list(snakemake.params.frames)
run_step(
    write_night_plots,
    snakemake.input.solution,
    dict(zip(frames, snakemake.input.catalogs)),
    dict(zip(frames, snakemake.input.poses)),
    {k: snakemake.output[k] for k in ("quality", "matches", "residuals", "noise", "pollution")},
    float(snakemake.params.registration.get("min_snr", 0.0)),
    stack_info_json=snakemake.input.info,
    stack_png=snakemake.input.png,
    background_model=snakemake.input.model,
    calibrated=dict(zip(frames, snakemake.input.calibrated)),
    log_path=snakemake.log[0],
)
