rule stars:
    input:
        f"{RESULTS}/{{night}}/calibrated/{{frame}}.fits",
    output:
        f"{RESULTS}/{{night}}/stars/{{frame}}.ecsv",
    log:
        f"{RESULTS}/{{night}}/logs/stars/{{frame}}.log",
    group:
        "frame"
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=stars_mem_mb,
        runtime=10,
    params:
        stars=config["stars"],
    script:
        "../scripts/stars.py"
