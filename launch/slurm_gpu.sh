#!/usr/bin/env bash
#SBATCH --job-name=mpl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
# Runs Meta Pseudo Labels on a multi-node GPU cluster under SLURM: one `python -m meta_pseudo_labels.main` process
# per GPU (default) or per node, started by srun on every node. The processes find each other through SLURM's
# variables (distributed.py: JAX's SLURM detection picks the coordinator, the process count and id, and each
# process's GPU); every process reads only its slice of each global batch and writes its part of each checkpoint.
#
# Usage (sbatch passes the environment on to the job):
#   CONFIG=configs/imagenet_10pct.py WORKDIR=/shared/runs/in10 DATA_DIR=/shared/tensorflow_datasets \
#     sbatch --nodes=4 launch/slurm_gpu.sh [--config.field=value ...]
#   One process per node instead (each sees all GPUs of its node):
#     PROCESS_PER=node CONFIG=... WORKDIR=... sbatch --nodes=4 --ntasks-per-node=1 launch/slurm_gpu.sh
#   The #SBATCH lines above are defaults: sbatch's own options override them (--nodes, --gpus-per-node, --time ...).
#
# Variables:
#   CONFIG        (required) config file, optionally with its argument, e.g. configs/imagenet.py:b0
#   WORKDIR       (required) run directory on a file system every node shares (checkpoints are written by all
#                 processes); resubmitting the same command resumes from it
#   DATA_DIR      (optional) TFDS data_dir, passed as --config.dataset.data_dir
#   PYTHON        (default python3) interpreter of the environment with requirements.txt and jax[cuda12] installed
#   PROCESS_PER   (default gpu) 'gpu': one process per GPU (--ntasks-per-node = GPUs per node); 'node': one process
#                 per node driving all its GPUs (--ntasks-per-node=1)
#   MPL_HEARTBEAT_TIMEOUT_SECONDS, MPL_SHUTDOWN_TIMEOUT_SECONDS, MPL_INITIALIZATION_TIMEOUT_SECONDS (optional)
#                 read by distributed.py: how soon a lost process ends the run (default 100 s), the waits at exit
#                 and at start-up (default 300 s)
#   DRY_RUN       (default 0) 1: print the srun command instead of running it
# Do not bind GPUs per task (--gpus-per-task, --gpu-bind): every task must see all GPUs of its node; JAX gives
# task i the GPU SLURM_LOCALID.
# Preemption and the time limit: SLURM sends SIGTERM 300 s before the end (--signal); the training loop saves at
# the next step and exits 143, and this script requeues the job, which resumes from the checkpoint.
# Exit status: that of srun (0, 2 for a configuration error, 75 when a process lost a peer, 143 when preempted).
set -euo pipefail

: "${CONFIG:?set CONFIG to a config file, e.g. CONFIG=configs/imagenet_10pct.py}"
: "${WORKDIR:?set WORKDIR to a run directory on a shared file system, e.g. WORKDIR=/shared/runs/in10}"
PYTHON="${PYTHON:-python3}"
PROCESS_PER="${PROCESS_PER:-gpu}"
DRY_RUN="${DRY_RUN:-0}"
if [[ "${PROCESS_PER}" != gpu && "${PROCESS_PER}" != node ]]; then
  echo "error: PROCESS_PER=${PROCESS_PER} must be 'gpu' or 'node'" >&2
  exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" && "${DRY_RUN}" != 1 ]]; then
  echo "error: SLURM_JOB_ID is not set: submit this script with sbatch (CONFIG=... WORKDIR=... sbatch" \
    "launch/slurm_gpu.sh), or use launch/local.sh on one machine" >&2
  exit 2
fi

# sbatch runs a copy of the script from the spool directory; the code is where the job was submitted from.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ ! -f meta_pseudo_labels/main.py ]]; then
  echo "error: $(pwd) is not the repository root; run sbatch from the repository root" >&2
  exit 2
fi

main=("${PYTHON}" -m meta_pseudo_labels.main "--config=${CONFIG}" "--workdir=${WORKDIR}")
if [[ -n "${DATA_DIR:-}" ]]; then
  main+=("--config.dataset.data_dir=${DATA_DIR}")
fi
main+=("$@")

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [[ "${PROCESS_PER}" == node ]]; then
  # JAX would otherwise give each task only the GPU numbered SLURM_LOCALID (0): list all of the node's GPUs.
  gpus="${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2> /dev/null | wc -l || echo 0)}"
  gpus="${gpus##*:}"   # SLURM may report 'type:count'
  if ! [[ "${gpus}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: cannot tell how many GPUs a node has (SLURM_GPUS_ON_NODE unset, nvidia-smi found none); submit" \
      "with --gpus-per-node" >&2
    exit 2
  fi
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi

# --kill-on-bad-exit: one failed process ends the step at once (the others would stop within the heartbeat
# timeout anyway); --wait bounds how long srun waits for the others after the first task exits.
launcher=(srun --kill-on-bad-exit=1 --wait=120 --label)
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "+ ${JAX_LOCAL_DEVICE_IDS:+JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS} }${launcher[*]} $(printf '%q ' "${main[@]}")"
  exit 0
fi
status=0
"${launcher[@]}" "${main[@]}" || status=$?
if ((status == 143)) && [[ -n "${SLURM_JOB_ID:-}" ]]; then
  echo "preempted or at the time limit: checkpoint saved in ${WORKDIR}; requeueing job ${SLURM_JOB_ID}" >&2
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
