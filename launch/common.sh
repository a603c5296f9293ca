# shellcheck shell=bash
# What the launch scripts share; sourced by tpu_vm_pod.sh and gpu_slurm.sh, never run.
# They set SCRIPT (their name, for messages) before sourcing, and dry_run (1 or 0) before `run`.

die() {
  echo "${SCRIPT}: error: $*" >&2
  exit 2
}

# Prints one argument so that a shell reads it back unchanged: bare when safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line as one string of quoted arguments.
join_quoted() {
  local out='' arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "${arg}")"
  done
  printf '%s' "${out}"
}

# Runs a command, or with --dry_run prints it (quoted so that it can be pasted into a shell).
run() {
  if [[ ${dry_run:-0} == 1 ]]; then
    join_quoted "$@"
    echo
  else
    "$@"
  fi
}

# config_path REPO CONFIG: the config file, relative to REPO (a bare name means configs/NAME.py).
config_path() {
  local repo="$1" config="$2"
  [[ -n ${config} ]] || die '--config is required, e.g. --config=configs/cityscapes.py'
  [[ ${config} == */* || ${config} == *.py ]] || config="configs/${config}.py"
  [[ -f ${repo}/${config} ]] || die "--config=${config}: no such file in ${repo}"
  printf '%s' "${config}"
}

# pinned_jax_version REPO: the jax version that REPO/requirements.txt pins.
pinned_jax_version() {
  local version
  version="$(sed -n 's/^jax==//p' "$1/requirements.txt")"
  [[ -n ${version} ]] || die "$1/requirements.txt pins no jax==VERSION"
  printf '%s' "${version}"
}
