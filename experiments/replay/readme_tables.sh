#!/usr/bin/env bash
# The README's simulated tables, re-measured out of sample (plus one labelled in-sample run for comparison);
# each command writes the results file the README cites. Needs the shared Mixtral trace (see README, "Traces").
#
#   bash experiments/replay/readme_tables.sh        # ~5 minutes on a laptop CPU
set -euo pipefail
traces="${PROPHET_SHARED_TRACES:-../shared/traces}"
T="$traces/mixtral-8x7b_humaneval_decode.npz"
R=experiments/results
prophet-bench replay --trace "$T" --model mixtral --cache-slots 172 --context 131072 --policy lru,lfu,prophet,belady \
  --out $R/readme_replay_mixtral_128k.json
prophet-bench replay --trace "$T" --model mixtral --cache-slots 172 --context 131072 --policy prophet --prefetch all \
  --out $R/readme_replay_mixtral_128k_copy_all.json
prophet-bench --model mixtral --ctx 128k --gpu h100-sxm --simulate --no-progress --out $R/bench_mixtral_128k_synthetic.json
prophet-bench --model mixtral --ctx 128k --gpu h100-sxm --simulate --trace "$T" --no-progress \
  --out $R/bench_mixtral_128k_shared_trace.json
prophet-bench --model mixtral --ctx 128k --gpu h100-sxm --simulate --trace "$T" --in-sample --no-progress \
  --out $R/bench_mixtral_128k_shared_trace_in_sample.json
# the prophet policy with misses on the host (the value policy at its hybrid setting), cold and warm-started
prophet-bench --model mixtral --ctx 128k --gpu h100-sxm --simulate --trace "$T" --on-miss auto --no-progress \
  --out $R/bench_mixtral_128k_shared_trace_hybrid.json
prophet-bench --model mixtral --ctx 128k --gpu h100-sxm --simulate --trace "$T" --on-miss auto --warm prefill \
  --no-progress --out $R/bench_mixtral_128k_shared_trace_hybrid_warm.json
