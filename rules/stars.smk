rule stars:
    input:
        calibrated=f"{RESULTS}/{{night}}/calibrated/{{frame}}.fits",
        sky_mask=f"{RESULTS}/{{night}}/sky_mask.fits",
    output:
        f"{RESULTS}/{{night}}/stars/{{frame}}.ecsv",
    log:
        f"{RESULTS}/{{night}}/logs/stars/{{frame}}.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        stars=config["stars"],
    script:
        "../scripts/stars.py"
