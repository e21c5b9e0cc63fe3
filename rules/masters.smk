rule master:
    input:
        unpack(master_dependencies),
        frames=calibration_files,
    output:
        f"{RESULTS}/{{night}}/masters/{{kind}}.fits",
    log:
        f"{RESULTS}/{{night}}/logs/master_{{kind}}.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=master_mem_mb,
        runtime=30,
    params:
        calibration=config["calibration"],
    script:
        "../scripts/master.py"
