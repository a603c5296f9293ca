#!/usr/bin/env bash
#SBATCH --job-name=skd_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
# Trains skd_jax on N SLURM nodes x 8 NVIDIA GPUs: one process per node drives its 8 GPUs, and
# JAX's multi-controller runtime (jax.distributed.initialize in skd_jax/main.py) joins them.
#
#   launch/gpu_slurm.sh --config=configs/cityscapes.py --workdir=/shared/runs/skd_r18 \
#       [--nodes=N] [--cpus_per_task=C] [--config.KEY=VALUE ...] [--dry_run]
#
# From a login node the script submits itself (`sbatch --nodes=N ... launch/gpu_slurm.sh ...`);
# `sbatch launch/gpu_slurm.sh ...` from the repository root works too. Inside the allocation it
#   1. creates the venv (once: SKD_VENV, default REPO/.venv, on the shared filesystem) with
#      requirements.txt and jax[cuda12] at the jax version that requirements.txt pins, when that
#      venv has no CUDA jax yet (compute nodes need internet access only for that first time);
#   2. takes the coordinator from SLURM: the first host of `scontrol show hostnames
#      $SLURM_JOB_NODELIST`, port COORDINATOR_PORT (default 20000 + SLURM_JOB_ID % 10000);
#   3. `srun`s the one training command on every node with --coordinator_address,
#      --num_processes=$SLURM_NNODES and --process_id=$SLURM_NODEID (expanded on each node), and
#      the allocation's CPUs per task (srun does not inherit sbatch's --cpus-per-task since SLURM
#      22.05: without it the input pipeline of a node would run on one core).
#
# Settings (a flag, else the environment variable, else the default):
#   --nodes     NODES       2 (only when submitting; inside a job SLURM_NNODES counts)
#   --cpus_per_task CPUS_PER_TASK  32, the #SBATCH line above (only when submitting; inside a job
#               SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE): host cores for the tf.data input
#               pipeline of the node's 8 GPUs; give the node's core count on your cluster
#   --dry_run   DRY_RUN=1   print every command (sbatch, python, pip, srun) instead of running it
#   SKD_VENV, PYTHON (python3; >= 3.11 to create the venv), COORDINATOR_PORT, SKD_JAX_DIR (the
#   checkout, found from the script's or the submission's directory otherwise).
# The config holds every hyperparameter; --config.KEY=VALUE flags are passed through unchanged.
# The workdir and data must be on a filesystem that every node sees. The global batch
# (optim.batch_size, eval.batch_size) must be divisible by 8 x the number of nodes.

set -euo pipefail

usage() {
  sed -n '/^# Trains/,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

# The checkout: sbatch runs a copy of this script from its spool directory, so also look at the
# submission directory.
find_repo() {
  local dir script_dir
  script_dir="$(dirname "${BASH_SOURCE[0]}")/.."
  for dir in "${SKD_JAX_DIR:-}" "${script_dir}" "${SLURM_SUBMIT_DIR:-}" "${PWD}"; do
    if [[ -n ${dir} && -f ${dir}/skd_jax/main.py ]]; then
      (cd "${dir}" && pwd)
      return
    fi
  done
  echo 'gpu_slurm.sh: error: cannot find the skd_jax checkout: set SKD_JAX_DIR=/path/to/checkout' >&2
  exit 2
}

repo="$(find_repo)"
readonly SCRIPT='gpu_slurm.sh'
# shellcheck source=launch/common.sh
source "${repo}/launch/common.sh"

dry_run="${DRY_RUN:-0}"
nodes="${NODES:-2}"
cpus_per_task="${CPUS_PER_TASK:-}"
config=''
workdir=''
overrides=()
for arg in "$@"; do
  case "${arg}" in
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --config.*=*) overrides+=("${arg}") ;;
    --nodes=*) nodes="${arg#*=}" ;;
    --cpus_per_task=*) cpus_per_task="${arg#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die "unknown argument '${arg}' (flags take the form --flag=value; see above)" ;;
  esac
done

config="$(config_path "${repo}" "${config}")"
[[ -n ${workdir} ]] || die '--workdir is required: a directory on a filesystem every node sees'
[[ ${nodes} =~ ^[1-9][0-9]*$ ]] || die "--nodes (or NODES)='${nodes}' must be a positive integer"
[[ -z ${cpus_per_task} || ${cpus_per_task} =~ ^[1-9][0-9]*$ ]] ||
  die "--cpus_per_task (or CPUS_PER_TASK)='${cpus_per_task}' must be a positive integer"

# On a login node: submit this script, which then runs the steps below inside the allocation.
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  args=(--config="${config}" --workdir="${workdir}" ${overrides[@]+"${overrides[@]}"})
  cpus=(${cpus_per_task:+"--cpus-per-task=${cpus_per_task}"})
  run sbatch --nodes="${nodes}" ${cpus[@]+"${cpus[@]}"} --chdir="${repo}" "${repo}/launch/gpu_slurm.sh" \
    "${args[@]}"
  exit 0
fi
: "${SLURM_JOB_NODELIST:?is unset: run inside a SLURM allocation (sbatch or salloc)}"
: "${SLURM_NNODES:?is unset: run inside a SLURM allocation (sbatch or salloc)}"

# 1. The environment (shared by all nodes).
venv="${SKD_VENV:-${repo}/.venv}"
python="${PYTHON:-python3}"
jax_version="$(pinned_jax_version "${repo}")"
if ! [[ -x ${venv}/bin/python ]] || ! "${venv}/bin/python" -m pip show -q jax-cuda12-plugin \
    >/dev/null 2>&1; then
  if [[ ${dry_run} != 1 ]] &&
      ! "${python}" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "PYTHON=${python} is older than 3.11: set PYTHON to a python3.11 (or newer) executable"
  fi
  [[ -x ${venv}/bin/python ]] || run "${python}" -m venv "${venv}"
  run "${venv}/bin/pip" install -q -r "${repo}/requirements.txt" "jax[cuda12]==${jax_version}"
fi

# 2. The coordinator: process 0 on the first node of the allocation.
first_host="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
[[ -n ${first_host} ]] || die "scontrol found no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST}'"
port="${COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"

# 3. The one training command on every node; each node's shell expands its own $SLURM_NODEID.
train=("${venv}/bin/python" -m skd_jax.main --config="${config}" --workdir="${workdir}"
       ${overrides[@]+"${overrides[@]}"} --coordinator_address="${first_host}:${port}"
       --num_processes="${SLURM_NNODES}")
# shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
per_node='--process_id=$SLURM_NODEID'
node_cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}"
srun_cpus=(${node_cpus:+"--cpus-per-task=${node_cpus}"})
run srun --nodes="${SLURM_NNODES}" --ntasks-per-node=1 ${srun_cpus[@]+"${srun_cpus[@]}"} \
  --kill-on-bad-exit=1 --chdir="${repo}" \
  bash -c "exec $(join_quoted "${train[@]}") ${per_node}"
