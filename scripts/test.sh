#!/usr/bin/env bash
# Installs what the tests need, builds m1c (Release, then ASan+UBSan) and runs every test with ctest.
# CUDA code is compiled when nvcc is found; GPU tests report themselves skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
jobs=$(nproc)
cuda_flag=()
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || cuda_flag=(-DM1C_CUDA=OFF)
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

# ctest, printing each Criterion suite's synthesis line; the whole log where something failed.
run_ctest() {
  local dir=$1 log=$1/ctest.log rc=0
  shift
  ctest --test-dir "$dir" --verbose -j"$jobs" "$@" >"$log" 2>&1 || rc=$?
  grep -E "Synthesis:|SKIP|tests passed|tests failed|Total Test time" "$log" | sed 's/^[0-9]*: //'
  if [ "$rc" -ne 0 ]; then
    echo "== ctest failed in $dir; its log:"
    cat "$log"
  fi
  return "$rc"
}

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" >/dev/null
cmake --build build -j"$jobs"
run_ctest build

echo "== ASan + UBSan build and tests (CPU code)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DM1C_SANITIZE=ON -DM1C_CUDA=OFF >/dev/null
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  run_ctest build-asan
