rule combine:
    input:
        stacks=night_stacks,
        solutions=night_solutions,
    output:
        fits=f"{RESULTS}/combined/stack_linear.fits",
        solution=f"{RESULTS}/combined/solution.json",
    log:
        f"{RESULTS}/combined/logs/combine.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=combine_mem_mb,
        runtime=30,
    params:
        combine=config.get("combine", {}),
        stars=config["stars"],
        registration=config["registration"],
        nights=list(NIGHTS),
    script:
        "../scripts/combine.py"


rule combine_outputs:
    input:
        f"{RESULTS}/combined/stack_linear.fits",
    output:
        fits=f"{RESULTS}/combined/stack.fits",
        tiff=f"{RESULTS}/combined/stack.tif",
        png=report(
            f"{RESULTS}/combined/stack.png",
            caption="../report/stack.rst",
            category="combined",
            subcategory="Stack",
        ),
        model=f"{RESULTS}/combined/background_model.fits",
    log:
        f"{RESULTS}/combined/logs/outputs.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=3000,
        runtime=20,
    params:
        background=config["background"],
        output=config["output"],
    script:
        "../scripts/outputs.py"
