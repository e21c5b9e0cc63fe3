rule demo_night:
    output:
        frames=demo_frames(),
        truth=f"{DEMO_FOLDER}/truth.json",
        truth_files=demo_truth_files(),
    log:
        f"{RESULTS}/logs/demo_night.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        demo=demo_params(),
    script:
        "../scripts/demo_night.py"
