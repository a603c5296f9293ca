#!/usr/bin/env bash
# Trains skd_jax on a Cloud TPU VM slice. Every host of the slice runs the same
# `python -m skd_jax.main --distributed=on` command; JAX's multi-controller runtime
# (jax.distributed.initialize(), which finds its peers in the TPU VM's metadata) joins them into one
# program.
#
#   launch/tpu_vm_pod.sh --config=configs/cityscapes.py --workdir=gs://BUCKET/runs/skd_r18 \
#       --tfds_data_dir=gs://BUCKET/tfds [--config.KEY=VALUE ...] [--dry_run]
#
# What it does, in order:
#   1. `gcloud compute tpus tpu-vm describe` the TPU VM, `create` it when there is none;
#   2. packs this checkout (without .venv, .git, runs/, caches) and copies it to every worker;
#   3. on every worker: a Python >= 3.11 venv in ~/skd_jax/.venv with requirements.txt and
#      jax[tpu] at the jax version that requirements.txt pins (~/skd_jax on each worker);
#   4. runs the training command on all workers at once and streams their (interleaved) output.
#      The run lives as long as this ssh session: start the script inside tmux or screen. A run
#      resumes from the latest checkpoint in its workdir, so running the script again continues.
#
# Settings (a flag, else the environment variable, else the default):
#   --name              TPU_NAME               skd-jax
#   --zone              TPU_ZONE               us-central2-b
#   --accelerator_type  TPU_ACCELERATOR_TYPE   v4-16 (8 chips on 2 hosts)
#   --runtime_version   TPU_RUNTIME_VERSION    tpu-ubuntu2204-base
#   --project           TPU_PROJECT            gcloud's configured project
#   --tfds_data_dir     TFDS_DATA_DIR          required, gs://...: the prepared tfds data (or where
#                                              to prepare it from --config.data.manual_dir)
#   --dry_run           DRY_RUN=1              print every command instead of running it
# The config holds every hyperparameter; --config.KEY=VALUE flags are passed through unchanged.
# All hosts must see the same workdir and data, so both live on GCS. The global batch
# (optim.batch_size, eval.batch_size) must be divisible by the number of chips of the slice.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
readonly REMOTE_DIR='skd_jax'            # on each worker, relative to home (ssh's cwd)
readonly UV_PIN='uv==0.13.8'             # fetches Python 3.11 where the image's python3 is older

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

readonly SCRIPT='tpu_vm_pod.sh'
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

name="${TPU_NAME:-skd-jax}"
zone="${TPU_ZONE:-us-central2-b}"
accelerator_type="${TPU_ACCELERATOR_TYPE:-v4-16}"
runtime_version="${TPU_RUNTIME_VERSION:-tpu-ubuntu2204-base}"
project="${TPU_PROJECT:-}"
tfds_data_dir="${TFDS_DATA_DIR:-}"
dry_run="${DRY_RUN:-0}"
config=''
workdir=''
overrides=()

for arg in "$@"; do
  case "${arg}" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --runtime_version=*) runtime_version="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --tfds_data_dir=*) tfds_data_dir="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --config.*=*) overrides+=("${arg}") ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument '${arg}' (flags take the form --flag=value; see above)" ;;
  esac
done

config="$(config_path "${REPO}" "${config}")"
[[ ${workdir} == gs://* ]] ||
  die "--workdir='${workdir}' must be a gs:// path: every host of the slice writes checkpoints"
[[ ${tfds_data_dir} == gs://* ]] ||
  die "--tfds_data_dir (or TFDS_DATA_DIR)='${tfds_data_dir}' must be a gs:// path all hosts read"
for value in "${name}" "${zone}" "${accelerator_type}" "${runtime_version}"; do
  [[ -n ${value} ]] || die 'empty --name, --zone, --accelerator_type or --runtime_version'
done
jax_version="$(pinned_jax_version "${REPO}")"

where=(--zone="${zone}")
[[ -z ${project} ]] || where+=(--project="${project}")
tpu_vm=(gcloud compute tpus tpu-vm)

# 1. The TPU VM: reuse it if it exists.
if [[ ${dry_run} == 1 ]]; then
  run "${tpu_vm[@]}" describe "${name}" "${where[@]}"
  echo '# only if describe fails (no such TPU VM):'
  run "${tpu_vm[@]}" create "${name}" "${where[@]}" --accelerator-type="${accelerator_type}" \
    --version="${runtime_version}"
elif "${tpu_vm[@]}" describe "${name}" "${where[@]}" >/dev/null 2>&1; then
  echo "Reusing TPU VM ${name} in ${zone}." >&2
else
  run "${tpu_vm[@]}" create "${name}" "${where[@]}" --accelerator-type="${accelerator_type}" \
    --version="${runtime_version}"
fi

# 2. The code, as this checkout has it (uncommitted changes included).
archive="${TMPDIR:-/tmp}/skd_jax-${name}.tar.gz"
run tar -czf "${archive}" -C "${REPO}" --exclude=./.venv --exclude=./.git --exclude=./runs \
  --exclude=__pycache__ .
run "${tpu_vm[@]}" scp "${archive}" "${name}:skd_jax.tar.gz" "${where[@]}" --worker=all

# 3. The environment on every worker.
# A venv of the image's python3 if it is >= 3.11, else of a Python 3.11 that uv fetches.
has_py311="python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
py311_venv="python3 -m venv .venv"
uv_venv="python3 -m pip install --user -q ${UV_PIN} && ~/.local/bin/uv venv --seed -p 3.11 .venv"
setup=(
  "rm -rf ${REMOTE_DIR}/skd_jax ${REMOTE_DIR}/configs"
  "mkdir -p ${REMOTE_DIR}"
  "tar -xzf skd_jax.tar.gz -C ${REMOTE_DIR}"
  "cd ${REMOTE_DIR}"
  "{ test -x .venv/bin/python || if ${has_py311}; then ${py311_venv}; else ${uv_venv}; fi; }"
  "$(join_quoted .venv/bin/pip install -q -r requirements.txt "jax[tpu]==${jax_version}")"
)
setup_command="$(printf '%s && ' "${setup[@]}")"
run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" --worker=all --command="${setup_command% && }"

# 4. The one training command, on all workers.
# --distributed=on: skd_jax would also recognise the slice by itself; saying so leaves nothing to
# guess (and works on a one-host slice too).
train=(.venv/bin/python -m skd_jax.main --distributed=on --config="${config}" --workdir="${workdir}"
       --config.data.tfds_data_dir="${tfds_data_dir}" ${overrides[@]+"${overrides[@]}"})
run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" --worker=all \
  --command="cd ${REMOTE_DIR} && $(join_quoted "${train[@]}")"
