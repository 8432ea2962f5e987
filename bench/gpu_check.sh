#!/usr/bin/env bash
# The device-machine check, in one or two calls (H200: torch 2.11 + CUDA 13, Triton, nvcc, no network):
# build the extension with its CUDA kernels, run the GPU tests, time the ops and the whole model.
# Everything lands under $OUT (few files come back): summary.txt, env.txt, build.log, tests.log,
# gpu_ops.log, bench.log, and results.tgz (junit.xml, bench/, gpu_ops.json, serving.json,
# profile.json, ncu.log and the other logs).
# Usage there: bash bench/gpu_check.sh; STAGES="build tests" picks stages (and their order); each stage has its own
# time limit (LIMIT_<stage> overrides) and a failure does not stop the rest, except a failed build, which
# ends the run (everything after it would time torch/Triton alone); a call without the build stage checks
# that the extension with its CUDA kernels loads and builds it first when not (a fresh machine).
# A stage is not started with less than its MIN_<stage> seconds left: its results are written at its
# end, so a cut stage returns nothing. BENCH_ARGS replaces the model benchmark's size/provider arguments.
# Stage times (H200, session 5 of 2026-11-30, all in one call, 351 s with the since-deleted gpu_linear
# stage's 17): build 40 s, tests 140 (the test files of then; the reorganized test list is not yet
# timed), gpu_ops 33, bench 74, ncu 14, serving 16; profile 12 (run 2, four rows); fastlaunch (new)
# est. 60-90: ~450 s in all. A deadline past 540 s leaves the tail to a second call.
set -uo pipefail
OUT=${OUT:-/tmp/dm2s2_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
PY=${PY:-python3}
# Stages run in this order; the deadline cuts the tail, which a second call (machine still warm, the
# build kept) can run: STAGES="ncu serving profile".
STAGES=${STAGES:-build tests fastlaunch gpu_ops bench ncu serving load profile}
# The model rows the open questions need (reference, torch and nested were measured on 2026-11-30).
BENCH_PROVIDERS=${BENCH_PROVIDERS:-floor,cuda,triton,triton+fastlaunch,auto+graphs,triton+graphs,hf,flex}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# The whole script stops starting stages DEADLINE s in (default 540: inside the device tool's
# 600 s per call, with time left to pack results.tgz); a stage's limit is cut to what is left.
DEADLINE=${DEADLINE:-540}
stage() {  # stage NAME DEFAULT_LIMIT_S LOG COMMAND...
  local name=$1 limit_var="LIMIT_$1" min_var="MIN_$1" log=$3
  local limit=${!limit_var:-$2} min=${!min_var:-15}
  shift 3
  local left=$((DEADLINE - SECONDS))
  if (( left < min )); then
    echo "== $name: not run ($left s left of the script's ${DEADLINE} s deadline; it needs $min)" | tee -a "$SUMMARY"
    return 124
  fi
  (( limit > left )) && limit=$left
  local start=$SECONDS
  # -k: a process that ignores SIGTERM (a hung kernel) is killed 10 s later, so the call still ends
  # with results.tgz packed.
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s (limit $limit s, log $(basename "$log"))" | tee -a "$SUMMARY"
  return $rc
}

{ date -u; nvidia-smi; nvcc --version; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
# Minimum seconds left to start a stage (its usual time: a cut stage writes nothing).
: "${MIN_tests:=120}" "${MIN_gpu_ops:=50}" "${MIN_bench:=90}" "${MIN_ncu:=60}" "${MIN_serving:=50}" "${MIN_load:=60}" "${MIN_profile:=40}" "${MIN_fastlaunch:=60}"
BUILD_FAILED=0
run_build() {
  stage build 240 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  local rc=$?
  grep -E "error|Error|CUDA kernels" "$OUT/build.log" | head -20 >> "$SUMMARY"
  stage info 60 "$OUT/build.log" "$PY" -m dm2s2_fast info
  tail -16 "$OUT/build.log" >> "$SUMMARY"
  if (( rc != 0 )) || ! cuda_kernels_load; then
    echo "== build: the extension with its CUDA kernels does not load; the other stages are not run" | tee -a "$SUMMARY"
    BUILD_FAILED=1
  fi
}
cuda_kernels_load() {
  "$PY" -c "import sys; from dm2s2_fast import _extension as e
sys.exit(0 if e.load() is None and e.has_kernel('set_attention', 'CUDA') else 1)" >> "$OUT/build.log" 2>&1
}
run_tests() {
  # -rfEs: the failures' names (for the summary's grep) as well as the skips' reasons. TESTS replaces
  # the list (paths, pytest's node ids or options).
  # shellcheck disable=SC2086  # TESTS is a word list on purpose
  stage tests 200 "$OUT/tests.log" env DM2S2_FAST_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" ${TESTS:-tests/ops tests/backends tests/model/test_model_backends.py tests/graphs tests/data tests/export/test_compile.py tests/serving/test_ranker.py}
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40 >> "$SUMMARY"
  tail -3 "$OUT/tests.log" >> "$SUMMARY"
}
run_fastlaunch() {  # the Triton tests again, launches through fast_launch.FastLaunch (opt-in until timed):
  # the test conftest runs each test under Tuning(triton_fast_launch=True) when DM2S2_TEST_TRITON_FAST_LAUNCH=1
  stage fastlaunch 150 "$OUT/fastlaunch.log" env DM2S2_TEST_TRITON_FAST_LAUNCH=1 DM2S2_FAST_REQUIRE_CUDA=1 "$PY" -m pytest \
    -q -rfEs -p no:cacheprovider tests/ops tests/model/test_model_backends.py tests/graphs -k "triton"
  grep -E "^(FAILED|ERROR)" "$OUT/fastlaunch.log" | head -20 >> "$SUMMARY"
  tail -1 "$OUT/fastlaunch.log" >> "$SUMMARY"
}
run_gpu_ops() {
  # shellcheck disable=SC2086  # GPU_OPS_ARGS is a word list on purpose
  stage gpu_ops 120 "$OUT/gpu_ops.log" "$PY" bench/gpu_ops.py --out "$OUT/gpu_ops.json" ${GPU_OPS_ARGS:-}
  sed -n '/^ads B=/,$p' "$OUT/gpu_ops.log" | head -90 >> "$SUMMARY"  # the results table, whole
}
run_bench() {
  # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
  stage bench 200 "$OUT/bench.log" "$PY" bench/report.py --device cuda ${BENCH_ARGS:---sizes 256,1,64,16 --deadline 110 --providers $BENCH_PROVIDERS} --out-dir "$OUT/bench"
  sed -n '/^## Median latency/,/^## B = /p' "$OUT/bench.log" | head -30 >> "$SUMMARY"
  tail -2 "$OUT/bench.log" >> "$SUMMARY"
}
run_ncu() {  # Nsight Compute on the kernels that missed their predictions (one launch each)
  NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
  stage ncu 150 "$OUT/ncu.log" "${NCU:-ncu}" --clock-control none --profile-from-start off \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    "$PY" bench/ncu_ops.py
  grep -E "^  [A-Za-z_].*\(|Duration|Achieved Occupancy|Registers Per|Memory Throughput|Compute \(SM\) Thr" \
    "$OUT/ncu.log" | head -80 >> "$SUMMARY"
}
run_serving() {  # per-request latency, eager vs CUDA graphs, a different batch every request
  stage serving 120 "$OUT/serving.log" "$PY" bench/serving.py --device cuda --backends auto,triton \
    --out "$OUT/serving.json"
  tail -20 "$OUT/serving.log" >> "$SUMMARY"
}
run_load() {  # the Ranker under load (issue #18's GPU targets: throughput >= 10x the sequential loop at
  # 64 clients, p99 <= 5 ms for 16-candidate requests), CUDA graphs on, against both baselines
  stage load 150 "$OUT/load.log" "$PY" bench/load.py --device cuda --cuda-graphs --candidates 16-16 \
    --concurrency 1,64 --loads 0.7,1.5 --time-limit 110 --out-dir "$OUT/load"
  sed -n '/^Targets/,/^Integrity/p' "$OUT/load.log" >> "$SUMMARY"
}
case " $STAGES " in
  *" build "*) ;;
  *) cuda_kernels_load || { echo "== preflight: the CUDA extension does not load here; building it first" | tee -a "$SUMMARY"
                            run_build; } ;;
esac
run_profile() {  # where a forward's time goes: host per forward, kernel time, launches, top kernels
  stage profile 120 "$OUT/profile.log" "$PY" bench/profile_model.py --device cuda \
    --backends "${PROFILE_BACKENDS:-triton,triton+fastlaunch,cuda,auto+graphs,triton+graphs}" --sizes 1,256 --out "$OUT/profile.json"
  grep -E "^## backend" "$OUT/profile.log" >> "$SUMMARY"
}
run_fuzz() {  # not in the default list: the randomized config sweep on the GPU backends (each new head dim
  # is a Triton compile: minutes); for a session with device time to spare
  stage fuzz 300 "$OUT/fuzz.log" env DM2S2_FAST_REQUIRE_CUDA=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    tests/model/test_fuzz_configs.py -k cuda
  grep -E "^(FAILED|ERROR)" "$OUT/fuzz.log" | head -20 >> "$SUMMARY"
  tail -1 "$OUT/fuzz.log" >> "$SUMMARY"
}
for name in $STAGES; do
  if ! declare -F "run_$name" > /dev/null; then
    echo "== $name: unknown stage (known: build tests fastlaunch gpu_ops bench ncu serving load profile fuzz)" | tee -a "$SUMMARY"
    continue
  fi
  (( BUILD_FAILED )) && { echo "== $name: not run (no working build)" | tee -a "$SUMMARY"; continue; }
  "run_$name"
done
KEEP="junit.xml bench gpu_ops.json serving.json serving.log load load.log ncu.log profile.json profile.log fastlaunch.log fuzz.log"
# shellcheck disable=SC2046,SC2086  # word lists on purpose
tar czf "$OUT/results.tgz" -C "$OUT" $(cd "$OUT" && ls -d $KEEP 2>/dev/null) 2>/dev/null
# shellcheck disable=SC2086
(cd "$OUT" && rm -rf $KEEP)
cat "$SUMMARY"
