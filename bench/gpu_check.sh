#!/usr/bin/env bash
# The one prepared script for a GPU machine (no internet; torch, triton, pybind11, cmake, ninja already there):
# build gm._C with CUDA, run the tests on the GPU, print the benchmark table. Logs and results go under $OUT
# (default ./gpu_out). Everything is bounded by timeouts so the whole run stays inside ~8 minutes.
#   TESTS="tests/ops" BENCH_OPS="masked_conv" BENCH_ARGS="--quick" bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
stage() { echo "=== [$(($(date +%s) - T0))s] $*"; }

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

stage "build (GM_CUDA=1, archs ${GM_CUDA_ARCHS:-90})"
if ! GM_CUDA=1 GM_CUDA_ARCHS="${GM_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" timeout "${BUILD_TIMEOUT:-300}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED (full log: build.log)"
fi
"$PY" -m gm info | tee "$OUT/info.txt"

stage "tests: ${TESTS:-tests}"
GM_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -o filterwarnings= -o addopts= \
  --timeout "${TEST_CASE_TIMEOUT:-120}" ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40

stage "bench: ${BENCH_OPS:-all} ${BENCH_ARGS:-}"
ops_arg=()
[ -n "${BENCH_OPS:-}" ] && ops_arg=(--ops "$BENCH_OPS")
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m bench --out "$OUT" "${ops_arg[@]}" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
tail -80 "$OUT/bench.log"
stage "done"
