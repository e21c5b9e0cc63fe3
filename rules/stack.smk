rule stack:
    input:
        calibrated=calibrated_of,
        catalogs=catalogs_of,
        solution=f"{RESULTS}/{{night}}/solution.json",
        sky_mask=f"{RESULTS}/{{night}}/sky_mask.fits",
    output:
        fits=f"{RESULTS}/{{night}}/stack_linear.fits",
        info=f"{RESULTS}/{{night}}/stack_linear.json",
    log:
        f"{RESULTS}/{{night}}/logs/stack.log",
    conda:
        "../envs/nightstack.yaml"
    threads: 2
    resources:
        mem_mb=stack_mem_mb,
        runtime=stack_runtime_min,
    params:
        stacking=config["stacking"],
        landscape=landscape_params(),
        frames=frame_list,
    script:
        "../scripts/stack.py"


rule trails:
    input:
        calibrated=calibrated_of,
        sky_mask=f"{RESULTS}/{{night}}/sky_mask.fits",
    output:
        fits=f"{RESULTS}/{{night}}/stack_trails.fits",
        info=f"{RESULTS}/{{night}}/stack_trails.json",
    log:
        f"{RESULTS}/{{night}}/logs/trails.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=3000,
        runtime=120,
    params:
        trails=config["trails"],
    script:
        "../scripts/trails.py"


rule outputs:
    input:
        stack=final_stack,
        sky_mask=f"{RESULTS}/{{night}}/sky_mask.fits",
    output:
        fits=f"{RESULTS}/{{night}}/stack.fits",
        tiff=f"{RESULTS}/{{night}}/stack.tif",
        png=report(
            f"{RESULTS}/{{night}}/stack.png",
            caption="../report/stack.rst",
            category="{night}",
            subcategory="Stack",
        ),
        model=f"{RESULTS}/{{night}}/background_model.fits",
    log:
        f"{RESULTS}/{{night}}/logs/outputs.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=outputs_mem_mb,
        runtime=20,
    params:
        background=config["background"],
        output=config["output"],
    script:
        "../scripts/outputs.py"
