"""Snakemake adapter: generate the demo night beside its truth.json."""

from pathlib import Path

from nightstack.logs import run_step
from nightstack.steps import demo_step

folder = Path(snakemake.output.truth).parent
run_step(demo_step, folder, snakemake.params.demo, log_path=snakemake.log[0])
