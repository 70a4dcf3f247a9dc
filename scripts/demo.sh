#!/usr/bin/env bash
# The main demo: installs what m1c needs (Debian 12, as root), builds it, pre-trains the tiny hybrid
# lightning/softmax MoE model of configs/tiny.cfg on the embedded default corpus (Debian's English
# fortunes), then samples from the final checkpoint. Extra arguments go to `m1c train`
# (e.g. -s run.stages.[0].steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cuda_flag=()
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || cuda_flag=(-DM1C_CUDA=OFF)
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" >/dev/null
cmake --build build -j"$(nproc)"

./build/m1c plan configs/tiny.cfg
./build/m1c train configs/tiny.cfg "$@"
ckpt=$(ls -d runs/tiny/pretrain/step-* | sort | tail -n 1)
echo "== sampling from $ckpt"
./build/m1c generate --checkpoint "$ckpt" --prompt "Q: 12+7*3=?" --max-new 120 --temperature 0.7 --top-p 0.95
