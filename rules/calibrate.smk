rule calibrate:
    input:
        unpack(light_masters),
        light=light_input,
        landscape_mask=landscape_mask_input,
    output:
        f"{RESULTS}/{{night}}/calibrated/{{frame}}.fits",
    log:
        f"{RESULTS}/{{night}}/logs/calibrate/{{frame}}.log",
    group:
        "calibrate"
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=calibrate_mem_mb,
        runtime=10,
    params:
        light=light_file,
        calibration=config["calibration"],
        background=config["background"],
        frame_format=config["output"].get("calibrated_frames", "compressed"),
        landscape=landscape_params(),
    script:
        "../scripts/calibrate.py"
