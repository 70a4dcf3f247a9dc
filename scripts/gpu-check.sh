#!/usr/bin/env bash
# On a GPU machine: builds m1c with CUDA (sm_90 by default) and runs every test there, GPU tests
# included; logs go to ${OUT:-build-gpu}. Usage: bash scripts/gpu-check.sh [ctest -R regex]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build-gpu}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" >"$out/cmake.log" 2>&1 \
  || { tail -30 "$out/cmake.log"; exit 1; }
cmake --build build-gpu -j"$(nproc)" >"$out/build.log" 2>&1 || { grep -E "error" "$out/build.log" | head -40; exit 1; }
ctest --test-dir build-gpu --verbose -j4 ${1:+-R "$1"} >"$out/ctest.log" 2>&1
rc=$?
grep -E "Synthesis|tests passed|tests failed|\(Failed\)|\(SEGFAULT\)|Timeout|\[FAIL\]|\[SKIP\]" "$out/ctest.log" | sed "s/^[0-9]*: //"
exit $rc
