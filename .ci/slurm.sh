#!/usr/bin/env bash
# CI check: nightstack runs on a real (single-node) Slurm cluster through Snakemake's Slurm
# executor plugin and gives the same stack as a local run.
#
# For a fresh Debian machine, as root, without systemd. It installs munge + Slurm (apt) and the
# executor plugin (pip), starts munged, slurmctld and slurmd by hand, runs a small demo night
# through `--executor slurm`, reruns the same config locally and compares the two stack.fits.
# The daemons it started are stopped on exit, whatever happens.
#
# Environment: PYTHON (interpreter with snakemake + nightstack, default python3),
#              SKIP_INSTALL=1 (packages already there), KEEP_WORKDIR=1 (keep the temp dir),
#              SLURM_RUN_TIMEOUT_S (default 900).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
RUN_TIMEOUT_S=${SLURM_RUN_TIMEOUT_S:-900}
HOST=$(hostname -s)

T_START=$(date +%s)
T_PHASE=$T_START
phase() { # phase [name]: print how long the previous phase took, then announce the next one
  local now
  now=$(date +%s)
  if [ -n "${PHASE_NAME:-}" ]; then
    echo "=== ${PHASE_NAME}: $((now - T_PHASE)) s"
  fi
  PHASE_NAME=${1:-}
  T_PHASE=$now
  if [ -n "$PHASE_NAME" ]; then echo "=== ${PHASE_NAME} ..."; fi
}
fail() {
  echo "slurm.sh: FAILED: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts munged/slurmctld/slurmd)"

WORK=$(mktemp -d /tmp/nightstack-slurm.XXXXXX)
STATE="$WORK/slurm" # daemon logs and pid files
mkdir -p "$STATE"
SPOOL_CTLD=/var/spool/slurmctld-nightstack
SPOOL_D=/var/spool/slurmd-nightstack
# The standard place: the jobstep plugin drops SLURM_* variables (SLURM_CONF too) before its
# srun inside each batch job, so that srun finds only this one.
SLURM_CONF_FILE=/etc/slurm/slurm.conf
CONF_MARK="# Single-node test cluster written by nightstack/.ci/slurm.sh"
WROTE_CONF=0

MUNGED_PID="" SLURMCTLD_PID="" SLURMD_PID="" SNAKEMAKE_PID=""
run_snakemake() { # run_snakemake <log> <command...>: run under a time limit, stoppable by SIGINT
  # In the background + wait, so that a signal to this script is handled at once (see cleanup).
  timeout -s INT -k 60 "$RUN_TIMEOUT_S" "${@:2}" >"$1" 2>&1 &
  SNAKEMAKE_PID=$!
  local rc=0
  wait "$SNAKEMAKE_PID" || rc=$?
  SNAKEMAKE_PID=""
  return "$rc"
}
cleanup() {
  local rc=$?
  set +e
  if [ -n "$SNAKEMAKE_PID" ] && kill -0 "$SNAKEMAKE_PID" 2>/dev/null; then
    # SIGINT (timeout passes it on) is Snakemake's clean stop: it cancels its Slurm jobs.
    echo "interrupting snakemake (pid $SNAKEMAKE_PID)"
    kill -INT "$SNAKEMAKE_PID"
    for _ in $(seq 120); do kill -0 "$SNAKEMAKE_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  if [ -n "$SLURMCTLD_PID" ] && kill -0 "$SLURMCTLD_PID" 2>/dev/null; then
    # Jobs of this private cluster only: slurmstepd outlives slurmd, so cancel them first.
    jobs_left=$(squeue -h -o %A 2>/dev/null)
    if [ -n "$jobs_left" ]; then
      echo "cancelling leftover Slurm jobs: $jobs_left"
      scancel $jobs_left
      sleep 2
    fi
  fi
  for pid in "$SLURMD_PID" "$SLURMCTLD_PID" "$MUNGED_PID"; do
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null && echo "stopped daemon pid $pid"
  done
  for pid in "$SLURMD_PID" "$SLURMCTLD_PID" "$MUNGED_PID"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
  done
  if [ -n "$SLURMCTLD_PID$SLURMD_PID" ]; then rm -rf "$SPOOL_CTLD" "$SPOOL_D"; fi
  if [ "$rc" != 0 ]; then
    for log in "$STATE"/slurmctld.log "$STATE"/slurmd.log; do
      [ -f "$log" ] && { echo "--- last lines of $log"; tail -n 20 "$log"; }
    done
    echo "slurm.sh: failed (exit $rc); work dir kept: $WORK" >&2
  elif [ "${KEEP_WORKDIR:-0}" = 1 ]; then
    echo "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  [ "$WROTE_CONF" = 1 ] && rm -f "$SLURM_CONF_FILE"
  echo "=== total: $(($(date +%s) - T_START)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
phase "install munge, Slurm and the Snakemake Slurm executor plugin"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || fail "apt-get update"
  apt-get install -y -qq munge slurmctld slurmd slurm-client >"$WORK/apt.log" 2>&1 ||
    { tail -n 20 "$WORK/apt.log"; fail "apt-get install munge slurmctld slurmd slurm-client"; }
  "$PYTHON" -m pip install -q snakemake-executor-plugin-slurm ||
    fail "pip install snakemake-executor-plugin-slurm"
fi
for tool in munged slurmctld slurmd sinfo squeue sbatch scancel; do
  command -v "$tool" >/dev/null || fail "$tool not found after installing"
done
"$PYTHON" -c "import snakemake_executor_plugin_slurm" || fail "the Slurm executor plugin is not importable by $PYTHON"
"$PYTHON" -m snakemake --version
slurmctld -V

# ---------------------------------------------------------------------------------------------
phase "configure and start munged, slurmctld, slurmd"
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
  fail "a slurmctld or slurmd already runs on this machine; this script starts its own cluster"
fi

CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
mkdir -p "$SPOOL_CTLD" "$SPOOL_D"
if [ -e "$SLURM_CONF_FILE" ] && ! head -n 1 "$SLURM_CONF_FILE" | grep -qxF "$CONF_MARK"; then
  fail "$SLURM_CONF_FILE exists and is not ours; not overwriting a real cluster's configuration"
fi
mkdir -p "$(dirname "$SLURM_CONF_FILE")"
WROTE_CONF=1
cat >"$SLURM_CONF_FILE" <<EOF
$CONF_MARK
ClusterName=nightstack-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${SPOOL_CTLD}
SlurmdSpoolDir=${SPOOL_D}
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue (not sacct) reports job states here, so finished jobs must stay visible long enough.
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
echo "slurm.conf: $SLURM_CONF_FILE (node ${HOST}: ${CPUS} CPUs, ${MEM_MB} MB)"

# munge: one key shared by every daemon and client of the cluster (here, all on this host).
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
if id munge >/dev/null 2>&1; then
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key && chmod 0755 /run/munge
  # setpriv execs (no fork), so $! is munged itself.
  setpriv --reuid=munge --regid=munge --init-groups munged --foreground >"$STATE/munged.out" 2>&1 &
else
  chmod 0400 /etc/munge/munge.key
  munged --foreground --force >"$STATE/munged.out" 2>&1 &
fi
MUNGED_PID=$!
for _ in $(seq 50); do
  munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
  kill -0 "$MUNGED_PID" 2>/dev/null || { cat "$STATE/munged.out"; fail "munged exited"; }
  sleep 0.2
done
munge -n </dev/null | unmunge >/dev/null || { cat "$STATE/munged.out"; fail "munge credentials do not round-trip"; }
echo "munged pid $MUNGED_PID"

# -D: stay in the foreground so that $! is the daemon; -c: forget any state of an earlier run.
slurmctld -D -c >"$STATE/slurmctld.out" 2>&1 &
SLURMCTLD_PID=$!
slurmd -D -N "$HOST" >"$STATE/slurmd.out" 2>&1 &
SLURMD_PID=$!
echo "slurmctld pid $SLURMCTLD_PID, slurmd pid $SLURMD_PID"

node_state=""
for _ in $(seq 60); do
  kill -0 "$SLURMCTLD_PID" 2>/dev/null || { cat "$STATE/slurmctld.out"; fail "slurmctld exited"; }
  kill -0 "$SLURMD_PID" 2>/dev/null || { cat "$STATE/slurmd.out"; fail "slurmd exited"; }
  node_state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
  [ "$node_state" = idle ] && break
  sleep 1
done
[ "$node_state" = idle ] || fail "node $HOST not idle after 60 s (sinfo state: '${node_state}')"
sinfo

# ---------------------------------------------------------------------------------------------
phase "prepare a small demo night config"
# A copy of the shipped config in a work dir: a 6-frame, 800x533 demo night keeps this quick.
"$PYTHON" - "$REPO/config.yaml" "$WORK/config.yaml" <<'EOF' || fail "could not write the demo config"
import sys
import yaml

with open(sys.argv[1]) as f:
    config = yaml.safe_load(f)
config["demo"].update(n_lights=6, width_px=800, height_px=533)
config["results"] = "results-slurm"
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
# Same work dir for both runs: the demo night is generated once (on Slurm) and reused locally.
SMK=("$PYTHON" -m snakemake --snakefile "$REPO/Snakefile" --directory "$WORK")

# ---------------------------------------------------------------------------------------------
phase "run the demo night on Slurm"
slurm_cmd=("${SMK[@]}" --workflow-profile "$REPO/profiles/slurm"
  --executor slurm --jobs 4 --cores 2
  --slurm-status-command squeue
  --slurm-init-seconds-before-status-checks 6
  --slurm-no-account
  --latency-wait 10)
echo "+ timeout -s INT $RUN_TIMEOUT_S ${slurm_cmd[*]}"
# SIGINT, not SIGTERM, at the time limit: on SIGINT Snakemake cancels its Slurm jobs.
run_snakemake "$WORK/snakemake-slurm.log" "${slurm_cmd[@]}" ||
  { tail -n 60 "$WORK/snakemake-slurm.log"; fail "snakemake --executor slurm (log: $WORK/snakemake-slurm.log)"; }
grep -E "steps \([0-9]+%\) done|Submitted (group )?job" "$WORK/snakemake-slurm.log" | tail -n 3 || true
n_submitted=$(grep -cE "Job .* has been submitted with SLURM jobid" "$WORK/snakemake-slurm.log" || true)
echo "Slurm jobs submitted: $n_submitted"
[ "$n_submitted" -gt 0 ] || fail "no job went through Slurm (log: $WORK/snakemake-slurm.log)"
[ -s "$WORK/results-slurm/demo/stack.fits" ] || fail "the Slurm run made no results-slurm/demo/stack.fits"

# ---------------------------------------------------------------------------------------------
phase "run the same night locally"
local_cmd=("${SMK[@]}" --workflow-profile none --cores 2 --config results=results-local)
echo "+ ${local_cmd[*]}"
run_snakemake "$WORK/snakemake-local.log" "${local_cmd[@]}" ||
  { tail -n 60 "$WORK/snakemake-local.log"; fail "local snakemake run (log: $WORK/snakemake-local.log)"; }

# ---------------------------------------------------------------------------------------------
phase "compare the two stacks"
"$PYTHON" - "$WORK/results-slurm/demo/stack.fits" "$WORK/results-local/demo/stack.fits" <<'EOF' ||
import sys

import numpy as np
from astropy.io import fits

on_slurm, local = (fits.getdata(path, ext=0).astype(np.float64) for path in sys.argv[1:3])
if on_slurm.shape != local.shape:
    sys.exit(f"stack shapes differ: Slurm {on_slurm.shape}, local {local.shape}")
if not np.isfinite(on_slurm).any():
    sys.exit("the Slurm stack holds no finite pixel")
scale = np.nanmax(np.abs(local))
max_diff = np.nanmax(np.abs(on_slurm - local))
print(f"stack {on_slurm.shape}, max |local| {scale:.6g}, max |Slurm - local| {max_diff:.3g}")
if not np.allclose(on_slurm, local, rtol=1e-6, atol=1e-6 * scale, equal_nan=True):
    sys.exit("the Slurm and local stacks differ")
print("Slurm and local stacks agree")
EOF
  fail "the stacks of the Slurm and the local run differ"

phase
echo "slurm.sh: OK"
