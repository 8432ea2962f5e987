#!/usr/bin/env bash
# The device-machine check, in one call (H200: torch 2.11 + CUDA 13, Triton, nvcc, no network):
# build the extension with its CUDA kernels, run the GPU tests, time the ops and the whole model.
# Everything lands under $OUT (at most 8 files come back): summary.txt, env.txt, build.log,
# tests.log, gpu_ops.json, gpu_ops.log, bench.log, results.tgz.
# Usage there: bash bench/gpu_check.sh   (each stage has its own time limit; a failure does not stop the rest)
set -uo pipefail
OUT=${OUT:-/tmp/dm2s2_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
stage() {  # stage NAME LIMIT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s (log: $(basename "$log"))" | tee -a "$SUMMARY"
  return $rc
}

{ date -u; nvidia-smi; nvcc --version; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
stage build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
stage info 60 "$OUT/build.log" "$PY" -m dm2s2_fast info
tail -12 "$OUT/build.log" >> "$SUMMARY"
stage tests 240 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_triton_ops.py tests/test_cuda_ops.py tests/test_model_backends.py --junitxml="$OUT/junit.xml"
tail -25 "$OUT/tests.log" >> "$SUMMARY"
stage gpu_ops 150 "$OUT/gpu_ops.log" "$PY" bench/gpu_ops.py --out "$OUT/gpu_ops.json"
tail -30 "$OUT/gpu_ops.log" >> "$SUMMARY"
stage bench 240 "$OUT/bench.log" "$PY" bench/report.py --device cuda --out-dir "$OUT/bench"
tail -30 "$OUT/bench.log" >> "$SUMMARY"
tar czf "$OUT/results.tgz" -C "$OUT" junit.xml bench 2>/dev/null
rm -rf "$OUT/bench" "$OUT/junit.xml"
cat "$SUMMARY"
