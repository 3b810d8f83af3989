#!/usr/bin/env bash
# The model on one CUDA GPU, in a few minutes, with a summary at the end:
#   1. the reference's compiled deformable-aggregation op, built from $SPARSE4D_REFERENCE when nvcc is there
#      (its source includes <THC/THCAtomics.cuh>, gone since torch 1.11: the copy built here includes
#      <ATen/cuda/Atomic.cuh> instead, nothing else changes);
#   2. the CUDA tests (`pytest -m cuda`): model parity with the reference on the GPU, our aggregation backends
#      and the compiled op against the kernel oracle, and fed a frame's features flattened once;
#   3. the full seed model's training step, fp16 (the reference's mixed precision) against fp32;
#   4. the deformable aggregation benchmark on the GPU.
# Run from the repository root in the project's environment (the scripts run as `python -m`, so the
# checkout's own code is imported): bash benchmarks/device_check.sh [log folder]
set -uo pipefail
out=${1:-device_check}
mkdir -p "$out"
summary=()

run_step() {  # name, command...: log to $out/name.log, keep the tail, remember the outcome
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name (exit $rc, $(($(date +%s) - start)) s)"
  tail -n 12 "$out/$name.log"
  summary+=("$name: exit $rc, $(($(date +%s) - start)) s")
}

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

ref=${SPARSE4D_REFERENCE:-$PWD/../shared/reference/Sparse4D}
if [ -d "$ref/projects/mmdet3d_plugin/ops/src" ] && command -v nvcc >/dev/null; then
  build=$(mktemp -d)
  cp -r "$ref/projects/mmdet3d_plugin/ops/." "$build/"
  sed -i 's#<THC/THCAtomics.cuh>#<ATen/cuda/Atomic.cuh>#' "$build/src/deformable_aggregation_cuda.cu"
  run_step build_op bash -c "cd '$build' && FORCE_CUDA=1 MAX_JOBS=8 python setup.py build_ext --inplace"
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$build
fi

run_step cuda_tests python -m pytest -m cuda -q -p no:cacheprovider tests/test_deformable_aggregation.py tests/test_flatten_once.py tests/test_parity_model.py
run_step train_step python -m benchmarks.device_check --device cuda
run_step aggregation python -m benchmarks.deformable_aggregation_speed --device cuda --repeats 5

echo "== summary"
printf '%s\n' "${summary[@]}"
grep -h -E "passed|failed|fp16 step|^fp32:|^fp16:|forward\+backward:" "$out"/*.log
