#!/usr/bin/env bash
# A/B of two builds' training step on one machine: m1c_bench_train from build A and from build B,
# alternating (A B A B ...), each run's tokens/s from the first row of its table (the reference shape of
# its device), then the mean of each with its standard error and the difference of B against A. Alternating keeps slow drifts (a card's
# clocks under its power cap, another job) out of the difference; machines of one card type differ by
# more than most changes, so compare builds on one machine in one call.
#
#   bash bench/ab.sh [-n ROUNDS] BUILD_A BUILD_B [m1c_bench_train arguments]
#   bash bench/ab.sh -n 4 /tmp/base/build-gpu build-gpu --device cuda --precision bf16 --head bf16 --steps 30
#
# Each build is a folder holding m1c_bench_train (a build tree, or an install's bin). ROUNDS: 3 unless
# given (1-100). The arguments after the builds go to every run unchanged (default: --steps 10).
set -u
rounds=3
if [ "${1:-}" = "-n" ]; then
  rounds=${2:-}
  shift 2 || true
fi
case "$rounds" in
  '' | *[!0-9]*) echo "ab.sh: -n takes a whole number of rounds (1-100), not '$rounds'" >&2; exit 2 ;;
esac
if [ "$rounds" -lt 1 ] || [ "$rounds" -gt 100 ]; then
  echo "ab.sh: -n takes a whole number of rounds (1-100), not '$rounds'" >&2
  exit 2
fi
if [ $# -lt 2 ]; then
  echo "usage: bash bench/ab.sh [-n ROUNDS] BUILD_A BUILD_B [m1c_bench_train arguments]" >&2
  exit 2
fi
a=$1 b=$2
shift 2
[ $# -gt 0 ] || set -- --steps 10
for d in "$a" "$b"; do
  if [ ! -x "$d/m1c_bench_train" ]; then
    echo "ab.sh: $d/m1c_bench_train: no such program (build it first)" >&2
    exit 2
  fi
done

# one run: the first table row's tokens/s (the field before GFLOP/s and MFU)
run() {
  "$1/m1c_bench_train" "${@:2}" 2>&1 | awk '/^model / { t = 1; next } t && NF >= 8 { print $(NF-2); exit }'
}

vals_a="" vals_b=""
for ((i = 1; i <= rounds; i++)); do
  for side in A B; do
    d=$a
    [ $side = B ] && d=$b
    v=$(run "$d" "$@")
    if [ -z "$v" ]; then
      echo "ab.sh: round $i, build $side ($d): m1c_bench_train printed no table row (run it alone to see why)" >&2
      exit 1
    fi
    echo "round $i  $side  $v tokens/s"
    if [ $side = A ]; then vals_a="$vals_a $v"; else vals_b="$vals_b $v"; fi
  done
done

# mean, standard error; the difference B - A with its standard error (the runs taken as independent)
awk -v A="$vals_a" -v B="$vals_b" 'function stats(s, out,   n, i, x, m, v) {
    n = split(s, x, " ")
    m = 0
    for (i = 1; i <= n; i++) m += x[i]
    m /= n
    v = 0
    for (i = 1; i <= n; i++) v += (x[i] - m) ^ 2
    out["n"] = n; out["m"] = m; out["se"] = n > 1 ? sqrt(v / (n - 1) / n) : 0
}
BEGIN {
    stats(A, a); stats(B, b)
    d = b["m"] - a["m"]; se = sqrt(a["se"] ^ 2 + b["se"] ^ 2)
    printf "A  %.0f +- %.0f tokens/s (%d runs)\n", a["m"], a["se"], a["n"]
    printf "B  %.0f +- %.0f tokens/s (%d runs)\n", b["m"], b["se"], b["n"]
    note = ", within twice its standard error"
    if (se > 0 && (d > 2 * se || d < -2 * se)) note = ", more than twice its standard error"
    if (a["n"] < 2) note = " (one round: no error estimate)"
    printf "B - A  %+.0f +- %.0f tokens/s (%+.2f%%)%s\n", d, se, 100 * d / a["m"], note
}'
