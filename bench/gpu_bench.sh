#!/usr/bin/env bash
# GPU comparison benchmarks in one command, so that m1c and its references run on the same machine and
# in the same session: m1c's training step (three LM-head precisions) against transformers'
# MiniMaxForCausalLM, m1c's softmax-attention kernels against torch's SDPA on the same shapes, the
# lightning-attention core alone, m1c's 1M-token prefill, and the MoE's expert products (cuBLAS and topk's
# Hopper kernels).
# Builds nothing: run scripts/gpu-check.sh (or cmake) first.
#
#   bash bench/gpu_bench.sh [BUILD_DIR]          (default build-gpu; logs in ${OUT:-BUILD_DIR}/bench)
#   HF_ARGS="--compile" SDPA_ARGS="--T 2048 8192" BENCH_TIMEOUT=300 bash bench/gpu_bench.sh
# shellcheck disable=SC2016 # the awk programs below are meant to be in single quotes
set -u
cd "$(dirname "$0")/.." || exit 1
build=${1:-build-gpu}
logs=${OUT:-$build}/bench
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 # python's lines reach the log (and tee) as they are printed
limit=${BENCH_TIMEOUT:-300}
failed=""

# run NAME CMD...: runs one benchmark with a time limit, its output shown and kept in $logs/NAME.log;
# a failure is noted and the next benchmark runs anyway.
run() {
  local name=$1
  shift
  echo "=== $name: $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over ${limit} s"))"
    failed="$failed $name"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$logs/gpu.txt"
git log -1 --format="commit %h %s" 2>/dev/null | tee "$logs/commit.txt"

# 1. m1c's training step on the ~220M reference shape (bench_train.c), bf16, per LM-head precision: the
#    mean of 30 timed steps (10 ran ~3% slower on an H100 than 30, and varied more between runs).
for head in fp32 bf16 tf32x3; do
  run "m1c_train_$head" "$build/m1c_bench_train" --device cuda --precision bf16 --head "$head" --steps 30
done
# 2. transformers' MiniMaxForCausalLM on the same shape, bf16, fused AdamW.
# shellcheck disable=SC2086 # HF_ARGS / SDPA_ARGS are word-split on purpose
run hf_train python3 bench/hf_train_reference.py ${HF_ARGS:-}
# 3. torch SDPA (flash) forward + backward on the attention shapes of the issue.
# shellcheck disable=SC2086
run sdpa python3 bench/sdpa_reference.py ${SDPA_ARGS:-}
# 4. m1c's softmax-attention kernels alone on SDPA's shapes (16 x 128, 65,536 tokens per batch).
run m1c_softmax "$build/m1c_bench_softmax" --T 2048,4096,8192
# 5. the lightning-attention core alone: 16 x 128, fwd+bwd at 65,536 tokens per batch, fwd at 256K and 1M.
run m1c_lightning "$build/m1c_bench_lightning"
# 6. m1c's long-context prefill: 1,048,576 tokens of one sequence in chunks of 32,768.
run m1c_prefill "$build/m1c_bench_prefill" --tokens 1048576 --chunk 32768 --segments 8
# 7. the MoE's per-expert products through the core's gemm_ex one at a time and through gemm_group (concurrent).
run m1c_gemm "$build/m1c_bench_gemm"
# 8. topk's Hopper expert products (expert_gemm = "auto" on sm_90a) beside cuBLAS.
run m1c_experts "$build/m1c_bench_experts"

# Summary. m1c's table row for the reference shape ends "... ms/step tokens/s GFLOP/s MFU"; the HF script's
# last line is "hf  <tokens/s> tokens/s  <ms> ms/step  (...)".
field() { [ -f "$1" ] && awk "$2" "$1" | tail -1; }
hf_tok=$(field "$logs/hf_train.log" '$1 == "hf" && $3 == "tokens/s" { print $2 }')
hf_ms=$(field "$logs/hf_train.log" '$1 == "hf" && $3 == "tokens/s" { print $4 }')
echo
echo "=== summary (training step, GPU reference shape: H 768, 8 layers 7:1, 8 experts top-2, V 32000, B 8, T 2048)"
printf "%-26s %10s %12s %8s %8s\n" "run" "ms/step" "tokens/s" "MFU" "vs HF"
for head in fp32 bf16 tf32x3; do
  row=$(field "$logs/m1c_train_$head.log" '/^GPU reference/ { print $(NF-3), $(NF-2), $NF }')
  if [ -z "$row" ]; then
    printf "%-26s %10s\n" "m1c bf16, head $head" "failed"
    continue
  fi
  read -r ms tok mfu <<<"$row"
  ratio=$(awk -v a="$tok" -v b="${hf_tok:-0}" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')
  printf "%-26s %10s %12s %8s %8s\n" "m1c bf16, head $head" "$ms" "$tok" "$mfu" "$ratio"
done
if [ -n "$hf_tok" ]; then
  printf "%-26s %10s %12s %8s %8s\n" "transformers MiniMax" "$hf_ms" "$hf_tok" "" "1.00x"
else
  why=$(grep -m1 "^hf  FAILED" "$logs/hf_train.log" 2>/dev/null | cut -c5-)
  printf "%-26s %s\n" "transformers MiniMax" "${why:-failed}"
fi
echo
echo "=== softmax attention, causal, bf16 (q 16 x 128, 65,536 tokens per batch): torch SDPA, then m1c"
grep "^sdpa " "$logs/sdpa.log" 2>/dev/null || echo "no results"
grep -E "^(fwd|fwd\+bwd) " "$logs/m1c_softmax.log" 2>/dev/null | sed "s/^/m1c  /" || echo "no results"
echo
echo "=== lightning attention core, bf16, 16 x 128 (M tokens/s)"
grep -E "^(pass|fwd|fwd\+bwd) " "$logs/m1c_lightning.log" 2>/dev/null || echo "no results"
echo
echo "=== m1c prefill, 1,048,576 tokens"
grep -E "^prefill of|^total" "$logs/m1c_prefill.log" 2>/dev/null || echo "no results"
echo
echo "=== MoE expert products per layer (m1c_bench_gemm)"
grep -E "^(product|gate_up|down|dWd|dact|dWgu|drows|all six|per step|topk.s calls|check)" "$logs/m1c_gemm.log" 2>/dev/null || echo "no results"
echo
echo "=== topk's Hopper expert products (m1c_bench_experts)"
grep -E "^(launch|gate_up|down|dact|drows) |^gate_up\+swiglu " "$logs/m1c_experts.log" 2>/dev/null || echo "no results"
echo
if [ -n "$failed" ]; then
  echo "failed:$failed (logs in $logs)"
  exit 1
fi
echo "all benchmarks ran (logs in $logs)"
