#!/usr/bin/env bash
# The first run on an accelerator, in one command (about 5 minutes on one GPU):
#
#   bench/device_check.sh [--tiny]          # PYTHON=python3 by default
#
# prints the hardware, then bench/throughput.py's table for the SKD step and the student-alone
# step at 512x512, global batch 8 (configs/cityscapes.py: PSPNet-R101 teacher, randomly
# initialised, -> PSPNet-R18 student + D) in float32 and in bfloat16: images/s, compile time,
# XLA's FLOPs and peak memory per device, and the MFU against the device's peak dense TFLOP/s
# (the table below, by device kind; float32 against the TF32 tensor-core peak on NVIDIA GPUs,
# where XLA computes float32 matrix products in TF32 by default). Where torch with CUDA is
# installed in the same interpreter (or SKD_TORCH_PYTHON), bench/compare.py then prints the same
# step against PyTorch AMP bf16, alternating.
#
# --tiny runs the same commands at configs/test.py's size (64x64 crops, tiny widths), so the
# script is known to work on a CPU (tests/test_device_check.py runs it without TensorFlow).
# Only jax, flax, optax, orbax, numpy, absl-py and ml-collections are needed
# (bench/requirements-device.txt): no TensorFlow, tfds or clu.

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
tiny=0
for arg in "$@"; do
  case "${arg}" in
    --tiny) tiny=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "device_check.sh: error: unknown argument '${arg}' (only --tiny)" >&2; exit 2 ;;
  esac
done

# Peak dense TFLOP/s per device: "bfloat16 float32" (float32 = TF32 tensor cores on NVIDIA; on
# TPUs float32 matrix products run as bfloat16 passes, so their peak is given for both).
# Sources: NVIDIA's H200, H100, A100, L4 datasheets (SXM, without sparsity); Google Cloud's TPU
# system-architecture pages. Unknown devices (CPUs included) get no MFU column.
peak_of() {
  case "$1" in
    *H200* | *'H100 80GB HBM3'* | *H100*SXM*) echo '989.4 494.7' ;;
    *H100*) echo '756.0 378.0' ;;   # H100 PCIe
    *A100*) echo '312.0 156.0' ;;
    *L4*) echo '121.0 60.0' ;;
    'TPU v4'*) echo '275.0 275.0' ;;
    'TPU v5 lite'* | 'TPU v5e'*) echo '197.0 197.0' ;;
    'TPU v5'*) echo '459.0 459.0' ;;
    'TPU v6'*) echo '918.0 918.0' ;;
    *) echo '0 0' ;;
  esac
}

kind="$("${python}" -c 'import jax; print(jax.devices()[0].device_kind)')"
read -r peak_bf16 peak_f32 <<< "$(peak_of "${kind}")"
echo "device: ${kind} (peak dense TFLOP/s: bfloat16 ${peak_bf16}, float32 ${peak_f32}; 0 = not in the table)"

if [[ ${tiny} == 1 ]]; then
  shape=(--config="${repo}/configs/test.py" --crop=64,64 --batch=8 --steps=2 --warmup=1)
else
  shape=(--config="${repo}/configs/cityscapes.py" --crop=512,512 --batch=8 --steps=5 --warmup=2)
fi

for dtype in float32 bfloat16; do
  peak="${peak_f32}"
  [[ ${dtype} == bfloat16 ]] && peak="${peak_bf16}"
  echo
  echo "== ${dtype}"
  "${python}" "${repo}/bench/throughput.py" "${shape[@]}" --config.dtype="${dtype}" \
    --peak_tflops="${peak}"
done

torch_python="${SKD_TORCH_PYTHON:-${python}}"
if "${torch_python}" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo
  echo "== against PyTorch AMP bf16 (${torch_python})"
  "${python}" "${repo}/bench/compare.py" "${shape[@]}" --config.dtype=bfloat16 \
    --torch_python="${torch_python}" --torch_device=cuda --rounds=3
else
  echo
  echo "(no torch with CUDA in ${torch_python}: the PyTorch comparison is skipped)"
fi
