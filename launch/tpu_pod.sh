#!/usr/bin/env bash
# Runs Meta Pseudo Labels on a Cloud TPU VM slice: creates the TPU (directly or as a queued resource), copies this
# checkout to every worker, installs requirements.txt and jax[tpu] there, runs the same `main` command on all
# workers at once (--worker=all; the workers find each other through the TPU metadata, distributed.py), streams
# their output to this terminal (and LOG_FILE), and deletes the TPU on exit when DELETE_ON_EXIT=1.
#
# Usage:
#   TPU_NAME=mpl-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base \
#   CONFIG=configs/imagenet_10pct.py WORKDIR=gs://BUCKET/mpl/in10 DATA_DIR=gs://BUCKET/tensorflow_datasets \
#     launch/tpu_pod.sh [--config.field=value ...]
#   Check first that the step fits the slice (no TPU needed):
#     python -m meta_pseudo_labels.compile_check --config=configs/imagenet_10pct.py --topology=v4-32
#
# Variables:
#   TPU_NAME          (required) name of the TPU VM (created unless it exists)
#   ZONE              (required) e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)
#   ACCELERATOR_TYPE  (required) e.g. v4-32, v5p-128, v5litepod-64, v6e-256
#   RUNTIME_VERSION   (required) TPU VM image: tpu-ubuntu2204-base (v4, v5p), v2-alpha-tpuv5-lite (v5e),
#                     v2-alpha-tpuv6e (v6e)
#   CONFIG            (required) config file, optionally with its argument, e.g. configs/imagenet.py:b0
#   WORKDIR           (required) gs:// directory: every worker writes its part of each checkpoint there; rerunning
#                     the same command resumes from it
#   PROJECT           (default: gcloud's configured project)
#   DATA_DIR          (optional) TFDS data_dir on GCS, passed as --config.dataset.data_dir
#   QUEUED            (default 0) 1: create through a queued resource (waits for capacity) instead of tpu-vm create
#   SPOT              (default 0) 1: spot capacity (preemptible; rerun the script to resume)
#   DELETE_ON_EXIT    (default 0) 1: delete the TPU (and its queued resource) when this script exits, however it ends
#   JAX_VERSION       (default: the jax pin of requirements.txt) version of jax[tpu] installed on the workers
#   REMOTE_DIR        (default mpl) directory of the code in each worker's home
#   LOG_FILE          (default ./tpu_pod_<TPU_NAME>.log) copy of the streamed output
#   MPL_HEARTBEAT_TIMEOUT_SECONDS, MPL_SHUTDOWN_TIMEOUT_SECONDS (optional) passed to the workers (distributed.py)
#   DRY_RUN           (default 0) 1: print the gcloud commands instead of running them
# Arguments are passed to `python -m meta_pseudo_labels.main` (config overrides, e.g. --config.mesh.fsdp=16).
# Exit status: 0 when every worker finished; else gcloud's (non-zero when any worker failed: see the log for 2, a
# configuration error, 75, a lost worker, or 143, preempted after saving).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name, e.g. TPU_NAME=mpl-v4-32}"
: "${ZONE:?set ZONE to the TPU zone, e.g. ZONE=us-central2-b}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE to the slice, e.g. ACCELERATOR_TYPE=v4-32}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION to the TPU VM image, e.g. RUNTIME_VERSION=tpu-ubuntu2204-base}"
: "${CONFIG:?set CONFIG to a config file, e.g. CONFIG=configs/imagenet_10pct.py}"
: "${WORKDIR:?set WORKDIR to a gs:// directory every worker can write, e.g. WORKDIR=gs://BUCKET/mpl/in10}"
if [[ "${WORKDIR}" != gs://* ]]; then
  echo "error: WORKDIR=${WORKDIR} is not a gs:// path; every worker writes its part of each checkpoint into" \
    "WORKDIR, so it must be storage they share (gs://BUCKET/...)" >&2
  exit 2
fi
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
DELETE_ON_EXIT="${DELETE_ON_EXIT:-0}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR="${REMOTE_DIR:-mpl}"
LOG_FILE="${LOG_FILE:-./tpu_pod_${TPU_NAME}.log}"
for name in QUEUED SPOT DELETE_ON_EXIT DRY_RUN; do
  if [[ "${!name}" != 0 && "${!name}" != 1 ]]; then
    echo "error: ${name}=${!name} must be 0 or 1" >&2
    exit 2
  fi
done

cd "$(dirname "$0")/.."
if [[ -z "${JAX_VERSION:-}" ]]; then
  JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
  if [[ -z "${JAX_VERSION}" ]]; then
    echo "error: no jax==VERSION line in requirements.txt; set JAX_VERSION" >&2
    exit 2
  fi
fi
if ((DRY_RUN == 0)) && ! command -v gcloud > /dev/null; then
  echo "error: gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run" \
    "gcloud auth login" >&2
  exit 2
fi

gcloud_args=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=(--project="${PROJECT}")
fi
queued_name="${TPU_NAME}-qr"

run() {  # prints the command; runs it unless DRY_RUN=1
  echo "+ $*" >&2
  if ((DRY_RUN == 0)); then
    "$@"
  fi
}

tpu_exists() {
  ((DRY_RUN == 0)) && gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${gcloud_args[@]}" > /dev/null 2>&1
}

# shellcheck disable=SC2329  # invoked by the EXIT trap below
delete_tpu() {
  echo "deleting ${TPU_NAME} (DELETE_ON_EXIT=1)" >&2
  if ((QUEUED == 1)); then
    run gcloud compute tpus queued-resources delete "${queued_name}" "${gcloud_args[@]}" --force --quiet || true
  else
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${gcloud_args[@]}" --quiet || true
  fi
}
if ((DELETE_ON_EXIT == 1)); then
  trap delete_tpu EXIT
fi

# 1. The TPU.
if tpu_exists; then
  echo "using the existing TPU ${TPU_NAME}" >&2
else
  spot=()
  if ((SPOT == 1)); then
    spot=(--spot)
  fi
  if ((QUEUED == 1)); then
    run gcloud compute tpus queued-resources create "${queued_name}" "${gcloud_args[@]}" --node-id="${TPU_NAME}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" "${spot[@]}"
    echo "waiting for the queued resource ${queued_name} to become ACTIVE" >&2
    while ((DRY_RUN == 0)); do
      state="$(gcloud compute tpus queued-resources describe "${queued_name}" "${gcloud_args[@]}" \
        --format='value(state.state)')"
      case "${state}" in
        ACTIVE) break ;;
        FAILED | SUSPENDED)
          echo "error: queued resource ${queued_name} is ${state}" >&2
          exit 1
          ;;
      esac
      sleep 60
    done
  else
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${gcloud_args[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${spot[@]}"
  fi
fi

# 2. The code and its environment, on every worker.
archive="$(mktemp -t mpl_code.XXXXXX.tar.gz)"
git ls-files -z | tar --null -czf "${archive}" -T -
run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:mpl_code.tar.gz" "${gcloud_args[@]}" --worker=all
rm -f "${archive}"
setup="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf mpl_code.tar.gz -C ${REMOTE_DIR}"
setup+=" && python3 -m pip install --quiet -r ${REMOTE_DIR}/requirements.txt 'jax[tpu]==${JAX_VERSION}'"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_args[@]}" --worker=all --command="${setup}"

# 3. The same command on every worker; output streamed here (each line prefixed by gcloud with its worker).
main=(python3 -m meta_pseudo_labels.main "--config=${CONFIG}" "--workdir=${WORKDIR}")
if [[ -n "${DATA_DIR:-}" ]]; then
  main+=("--config.dataset.data_dir=${DATA_DIR}")
fi
main+=("$@")
environment="PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2"
for name in MPL_HEARTBEAT_TIMEOUT_SECONDS MPL_SHUTDOWN_TIMEOUT_SECONDS MPL_INITIALIZATION_TIMEOUT_SECONDS; do
  if [[ -n "${!name:-}" ]]; then
    environment+=" ${name}=${!name}"
  fi
done
command="cd ${REMOTE_DIR} && ${environment} $(printf '%q ' "${main[@]}")"
status=0
if ((DRY_RUN == 1)); then
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_args[@]}" --worker=all --command="${command}"
else
  echo "+ gcloud compute tpus tpu-vm ssh ${TPU_NAME} --worker=all --command=\"${command}\" (log: ${LOG_FILE})" >&2
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_args[@]}" --worker=all --command="${command}" 2>&1 \
    | tee -a "${LOG_FILE}" || status="${PIPESTATUS[0]}"
fi
if ((status == 143)); then
  echo "preempted: a checkpoint was saved in ${WORKDIR}; rerun the same command to resume" >&2
fi
exit "${status}"
