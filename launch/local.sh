#!/usr/bin/env bash
# Runs Meta Pseudo Labels on this machine's CPU: one process, or several local processes that find each other
# through JAX's distributed runtime (gloo collectives), exactly as the hosts of a TPU pod or a GPU cluster do.
# Several processes are how to try a multi-host run (per-host input slices, global arrays, checkpoints written by
# every process) without a cluster; each process gets DEVICES_PER_PROCESS CPU devices.
#
# Usage:
#   CONFIG=configs/two_moons.py WORKDIR=/tmp/mpl launch/local.sh [--config.field=value ...]
#   CONFIG=configs/cifar10_4k.py:cpu WORKDIR=/tmp/c10 NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local.sh
#
# Variables:
#   CONFIG               (required) config file, optionally with its argument: configs/cifar10_4k.py:cpu
#   WORKDIR              (required) checkpoints, TensorBoard events and results.json; rerun to resume
#   NUM_PROCESSES        (default 1) local JAX processes
#   DEVICES_PER_PROCESS  (default 1) CPU devices per process (the mesh spans NUM_PROCESSES x this many)
#   PORT                 (default 12355) port of the coordinator (process 0) on 127.0.0.1
#   PYTHON               (default python3) the interpreter of the environment with requirements.txt installed
#   LOG_DIR              (default $WORKDIR/logs) where processes 1..N-1 write process_<i>.log; process 0
#                        prints to this terminal (only it writes TensorBoard events and results.json)
#   MPL_HEARTBEAT_TIMEOUT_SECONDS (optional) seconds after which a silent process counts as dead and the others
#                        stop (default 100)
# Arguments after the variables are passed to `python -m meta_pseudo_labels.main` (config overrides).
# Exit status: that of the first process that fails, else 0. When one process fails the others are stopped.
set -euo pipefail

: "${CONFIG:?set CONFIG to a config file, e.g. CONFIG=configs/two_moons.py}"
: "${WORKDIR:?set WORKDIR to the run directory, e.g. WORKDIR=/tmp/mpl_two_moons}"
NUM_PROCESSES="${NUM_PROCESSES:-1}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PORT="${PORT:-12355}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-${WORKDIR}/logs}"

for name in NUM_PROCESSES DEVICES_PER_PROCESS PORT; do
  if ! [[ "${!name}" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ${name}=${!name} is not a positive integer" >&2
    exit 2
  fi
done
if ! command -v "${PYTHON}" > /dev/null; then
  echo "error: PYTHON=${PYTHON} not found; set PYTHON to the interpreter with requirements.txt installed" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
main=("${PYTHON}" -m meta_pseudo_labels.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")

if ((NUM_PROCESSES == 1)); then
  exec "${main[@]}"
fi

mkdir -p "${LOG_DIR}"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "${pid}" 2> /dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  export MPL_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" MPL_NUM_PROCESSES="${NUM_PROCESSES}" MPL_PROCESS_ID="${i}"
  if ((i == 0)); then
    "${main[@]}" &
  else
    "${main[@]}" > "${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  code=0
  wait -n || code=$?
  if ((code != 0 && status == 0)); then
    status="${code}"
    echo "error: a process exited with status ${code}; stopping the others (logs: ${LOG_DIR})" >&2
    stop_all
  fi
done
exit "${status}"
