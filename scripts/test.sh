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

echo "== Release build and tests"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== ASan + UBSan build and tests (CPU code)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DM1C_SANITIZE=ON -DM1C_CUDA=OFF >/dev/null
cmake --build build-asan -j"$jobs"
# Leak checking stays on; dlclose'd plugins keep their symbols for the report.
ASAN_OPTIONS=detect_leaks=1:fast_unwind_on_malloc=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan --output-on-failure -j"$jobs"
