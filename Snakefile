# nightstack: a night's folder of sky exposures in, one deep, clean, sharp image out.
# Run:  snakemake --cores 8                       (the shipped config: the demo night)
#       snakemake --cores 8 --config nights=/path/to/night


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/masters.smk"
include: "rules/calibrate.smk"
include: "rules/stars.smk"
include: "rules/register.smk"
include: "rules/stack.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
