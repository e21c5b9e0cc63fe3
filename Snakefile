# nightstack: a night's folder of sky exposures in, one deep, clean, sharp image out.
# Run:  snakemake --cores 8                       (the shipped config: the demo night)
#       snakemake --cores 8 --config nights=/path/to/night


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/masters.smk"
include: "rules/calibrate.smk"
include: "rules/landscape.smk"
include: "rules/stars.smk"
include: "rules/register.smk"
include: "rules/stack.smk"
include: "rules/report.smk"
include: "rules/combine.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
        report_plots(),
