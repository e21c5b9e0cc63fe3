rule sky_mask:
    input:
        calibrated=calibrated_of,
        mask=landscape_mask_input,
    output:
        f"{RESULTS}/{{night}}/sky_mask.fits",
    log:
        f"{RESULTS}/{{night}}/logs/sky_mask.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=sky_mask_mem_mb,
        runtime=10,
    params:
        landscape=landscape_params(),
    script:
        "../scripts/sky_mask.py"
