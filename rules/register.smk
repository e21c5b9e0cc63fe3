rule reference:
    input:
        catalogs=catalogs_of,
    output:
        f"{RESULTS}/{{night}}/reference.json",
    log:
        f"{RESULTS}/{{night}}/logs/reference.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        reference=config["reference"],
        frames=frame_list,
    script:
        "../scripts/reference.py"


rule pose:
    input:
        catalog=f"{RESULTS}/{{night}}/stars/{{frame}}.ecsv",
        reference=f"{RESULTS}/{{night}}/reference.json",
    output:
        f"{RESULTS}/{{night}}/poses/{{frame}}.json",
    log:
        f"{RESULTS}/{{night}}/logs/pose/{{frame}}.log",
    group:
        "pose"
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=500,
        runtime=5,
    params:
        registration=config["registration"],
    script:
        "../scripts/pose.py"


rule solve:
    input:
        poses=poses_of,
        catalogs=catalogs_of,
        reference=f"{RESULTS}/{{night}}/reference.json",
    output:
        f"{RESULTS}/{{night}}/solution.json",
    log:
        f"{RESULTS}/{{night}}/logs/solve.log",
    conda:
        "../envs/nightstack.yaml"
    resources:
        mem_mb=solve_mem_mb,
        runtime=30,
    params:
        registration=config["registration"],
        quality=config["quality"],
        frames=frame_list,
    script:
        "../scripts/solve.py"
