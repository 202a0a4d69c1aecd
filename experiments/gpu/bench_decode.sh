#!/usr/bin/env bash
# Issue 8, item 6, on a lent GPU: the GPU-only tests of the measured path, then prophet-bench's real decode of
# Mixtral-8x7B at 128K (random bf16 weights, routing forced from a trace) with the baselines, written as JSON.
#
#   bash experiments/gpu/bench_decode.sh [TRACE]   # TRACE: a Mixtral trace to force (default: synthetic)
#
# Runs from the repository root without installing: the kernels folder is linked where the package expects it.
# Results go to $OUT (the device tool's folder) or experiments/results/.
set -euo pipefail
ln -sfn "$PWD/kernels" prophet/kernels
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-experiments/results}"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
tests=0  # the benchmark runs even when a test fails; the script's status reports both
python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests/bench tests/test_pinned.py tests/test_wrap.py \
  tests/test_cache.py || tests=$?
trace=()
if [ $# -gt 0 ]; then trace=(--trace "$1"); fi
python3 -m prophet.cli run --model mixtral --ctx 128k --weights random --compare --no-progress "${trace[@]}" \
  --out "$out/prophet_bench_mixtral_128k_${gpu}.json"
exit "$tests"
