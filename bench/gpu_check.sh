#!/usr/bin/env bash
# The one prepared script for a GPU machine (no internet; torch, triton, pybind11, cmake, ninja already there):
# build gm._C with CUDA, run the tests on the GPU, print the benchmark table. Logs and results go under $OUT
# (default ./gpu_out). Every stage is bounded by a timeout (build 300 s, tests 300 + 90 s, bench 300 s).
#   bash bench/gpu_check.sh                                   (defaults: gpu tests, full table without compile)
#   TESTS="tests/ops" BENCH_OPS="masked_conv" BENCH_ARGS="--quick" bash bench/gpu_check.sh
# BENCH_ARGS defaults to "--no-compile --profile --graphs" (the torch.compile baselines take minutes to compile); set
# BENCH_ARGS=" " for them.
# STAGES (default "build,warm,tests,bench") splits the work across device calls, which may each run 10 minutes at most;
# the build stays on the warm machine between calls:
#   call 1: STAGES=build,warm,tests bash bench/gpu_check.sh        call 2: STAGES=bench bash bench/gpu_check.sh
# The machine goes back 30 s after a call ends: a second call must follow at once (or rebuild).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
stage() { echo "=== [$(($(date +%s) - T0))s] $*"; }
STAGES="${STAGES:-build,warm,tests,bench}"
want() { [[ ",$STAGES," == *",$1,"* ]]; }
# What the bench stage runs (the warm stage compiles for it): most wanted first (the harness saves case by case, so a
# timeout keeps what finished): the families changed since the last run and still furthest from their targets.
BENCH_OPS="${BENCH_OPS:-diagonal_lstm,iaf,minibatch,row_lstm,masked_conv,models}"
# BENCH_ARGS defaults to "--no-compile --profile --graphs": --graphs adds each row's fwd+bwd replayed from a CUDA
# graph (the kernels' time without the host's launch cost, which dominated the small cases on that machine); the
# profile (torch.profiler: wall vs device-kernel time, top kernels of each gm row and baseline) lands beside the rows
# as <results>_profile.md. "--no-compile --compile-ops iaf,models" keeps those modules' torch.compile baselines.
BENCH_ARGS="${BENCH_ARGS:---no-compile --profile --graphs}"

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

if want build; then
stage "build (GM_CUDA=1, archs ${GM_CUDA_ARCHS:-90})"
if ! GM_CUDA=1 GM_CUDA_ARCHS="${GM_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" timeout "${BUILD_TIMEOUT:-300}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED (full log: build.log)"
fi
fi
"$PY" -m gm info | tee "$OUT/info.txt"

# Warm: the Triton kernels that the benchmark launches, compiled into Triton's cache by WARM_JOBS parallel
# `python -m bench.aot --shard K/N` processes (CPU only: a stand-in driver, the GPU's target), so the bench stage finds
# them compiled instead of compiling one after another.
# The bench stage's autotune mode (BENCH_AUTOTUNE, else the caller's GM_TRITON_AUTOTUNE, else 1) decides what to warm:
# autotuning (1) times every config, so every config is compiled (the models cases left out: thousands of variants);
# 0 runs each kernel's first suitable config and picks (GM_TRITON_AUTOTUNE=picks) the shipped pick of the GPU or the
# first suitable, so only those are compiled (bench.aot --first-config / --picks SLUG), the models cases included.
autotune="${BENCH_AUTOTUNE:-${GM_TRITON_AUTOTUNE:-1}}"
if want warm; then
W="${WARM_JOBS:-14}"
AOT_OPS="$BENCH_OPS"
AOT_MODE=()
if [ "$autotune" = "picks" ]; then
  SLUG="$("$PY" -c 'import torch; from gm._backend import device_slug; print(device_slug(torch.cuda.get_device_name()))' 2>/dev/null)"
  if [ -n "$SLUG" ] && [ -f "kernels/tuned/$SLUG.json" ]; then AOT_MODE=(--picks "$SLUG"); else AOT_MODE=(--first-config); fi
elif [ "$autotune" = "0" ]; then
  AOT_MODE=(--first-config)
else
  AOT_OPS="$(echo "$AOT_OPS" | tr ',' '\n' | grep -v '^models$' | paste -sd,)"
fi
stage "warm: $AOT_OPS ${AOT_MODE[*]} in $W processes"
for k in $(seq 0 $((W - 1))); do
  timeout "${WARM_TIMEOUT:-180}" "$PY" -m bench.aot --ops "$AOT_OPS" "${AOT_MODE[@]}" --shard "$k/$W" >"/tmp/gm_warm_$k.md" 2>&1 &
done
# The torch.compile baselines the bench stage will time (BENCH_ARGS without --no-compile, or with --compile-ops),
# compiled meanwhile by COMPILE_WARM_JOBS `python -m bench --warm-compile` processes on the GPU (each baseline run once,
# forward and forward+backward) into inductor's on-disk caches: the bench stage then compiles each from them in
# seconds (dev CPU, quick models cases: 10.1 -> 1.9 s and 4.0 -> 0.7 s). GM_TRITON_AUTOTUNE=0 there: gm's kernels
# inside gm+compile need no timing to be traced.
rm -f /tmp/gm_warm_compile_*.log
if [[ " $BENCH_ARGS " != *" --no-compile "* || " $BENCH_ARGS " == *" --compile-ops"* ]]; then
  C="${COMPILE_WARM_JOBS:-4}"
  stage "warm: torch.compile baselines of $BENCH_OPS ($BENCH_ARGS) in $C processes"
  for k in $(seq 0 $((C - 1))); do
    GM_TRITON_AUTOTUNE=0 TORCHINDUCTOR_COMPILE_THREADS="${COMPILE_THREADS:-4}" timeout "${WARM_TIMEOUT:-180}" \
      "$PY" -m bench --warm-compile --shard "$k/$C" \
      --ops "$BENCH_OPS" $BENCH_ARGS >"/tmp/gm_warm_compile_$k.log" 2>&1 &
  done
fi
wait
cat /tmp/gm_warm_*.md | grep -c "_kernel |" | sed 's/^/compiled variants: /'
cat /tmp/gm_warm_*.md | grep "_kernel |" | grep -i "error" | head -5
cat /tmp/gm_warm_compile_*.log 2>/dev/null | grep "^warm-compile" | tee "$OUT/warm_compile.txt"
fi

# Tests: the gpu-marked tests (cuda and triton backends, fp32/bf16, written for the GPU) and the masked_conv suite,
# which runs every backend of the device. GM_TRITON_AUTOTUNE=0: one compile per kernel variant, not one per config.
# The whole suite (TESTS=tests) compiles a few hundred Triton variants: several minutes on a cold cache.
if want tests; then
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o filterwarnings= -o addopts= --timeout "${TEST_CASE_TIMEOUT:-120}")
# TEST_WORKERS (default 8) pytest-xdist processes share the GPU: the tests are dominated by Triton compiles (CPU).
if [ "${TEST_WORKERS:-8}" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n "${TEST_WORKERS:-8}"); fi
if [ -n "${TESTS:-}" ]; then
  stage "tests: $TESTS"
  GM_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" "${PYTEST[@]}" $TESTS 2>&1 | tee "$OUT/tests.log" | tail -40
else
  stage "tests: -m gpu tests"
  GM_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-300}" "${PYTEST[@]}" -m gpu tests 2>&1 | tee "$OUT/tests.log" | tail -40
  stage "tests: tests/ops/test_masked_conv.py"
  GM_TRITON_AUTOTUNE=0 timeout "${CONV_TEST_TIMEOUT:-90}" "${PYTEST[@]}" tests/ops/test_masked_conv.py 2>&1 | tee -a "$OUT/tests.log" | tail -15
fi

fi

ops_arg=(--ops "$BENCH_OPS")
# DEADLINE (seconds after the start) bounds the bench by what is left of the call instead of BENCH_TIMEOUT;
# BENCH_AUTOTUNE=0 runs each Triton kernel's first config (one compile per variant instead of one per config);
# BENCH_AUTOTUNE=picks the shipped picks, else the first suitable config, timing nothing. Without BENCH_AUTOTUNE the
# caller's GM_TRITON_AUTOTUNE is kept (default 1: autotune).
if want bench; then
bt="${BENCH_TIMEOUT:-300}"
if [ -n "${DEADLINE:-}" ]; then bt=$((DEADLINE - $(date +%s) + T0)); fi
stage "bench (${bt}s, autotune $autotune): $BENCH_OPS $BENCH_ARGS"
GM_TRITON_AUTOTUNE="$autotune" timeout "$bt" "$PY" -m bench --out "$OUT" "${ops_arg[@]}" $BENCH_ARGS >"$OUT/bench.log" 2>&1
tail -80 "$OUT/bench.log"
fi
stage "done"
