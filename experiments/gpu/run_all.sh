#!/usr/bin/env bash
# Every GPU-only test and measurement of the project, in one call of a few minutes, for the task that is lent a
# GPU (H100/H200 host, 16 cores, 128 GiB, no registry). Each part runs even if an earlier one failed, under its
# own time limit, while the whole stays under BUDGET_S; each writes JSON results. Nothing is installed from a
# registry: what the machine lacks travels as wheels.
#
# Here, before the GPU call (the machine's transformers is older than the pins allow; the trace is not shipped):
#   bash experiments/gpu/prepare.sh            # wheels into .whl/, the shared Mixtral trace into .gpu-data/
# On the GPU (the device tool), with ~3 minutes to spare for a rerun:
#   run(command="bash experiments/gpu/run_all.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
# Back here, the results land under experiments/results/ with:
#   tar xzf <files_at>/results.tgz -C experiments/results
#
# Without CUDA it is a dry run: every part is checked for what it can be without a GPU (imports, argument
# parsing, test collection), and no results are kept. Exit status: the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUDGET_S=${BUDGET_S:-470}
start=$(date +%s)
work=$(mktemp -d)
res="$work/results"
logs="$work/logs"
mkdir -p "$res" "$logs"
summary="$res/run_all_summary.jsonl"
failed=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DRY=0
  gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
else
  DRY=1
  gpu=none
  echo "run_all: no CUDA device: dry run (imports, arguments and test collection only; no results kept)"
fi
trace=".gpu-data/mixtral-8x7b_humaneval_decode"
trace_args=()
[ -f "$trace.npz" ] && trace_args=(--trace "$trace.npz")

# part NAME LIMIT_S GPU-COMMAND... -- DRY-COMMAND...
part() {
  local name=$1 limit=$2
  shift 2
  local gpu_cmd=() dry_cmd=() seen=0
  for a in "$@"; do
    if [ "$a" = "--" ] && [ $seen = 0 ]; then seen=1; continue; fi
    if [ $seen = 0 ]; then gpu_cmd+=("$a"); else dry_cmd+=("$a"); fi
  done
  local cmd=("${gpu_cmd[@]}")
  [ "$DRY" = 1 ] && cmd=("${dry_cmd[@]}")
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  if [ "$DRY" = 0 ] && [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the budget left"
    echo "{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"out of time\"}" >>"$summary"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): ${cmd[*]}"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "${cmd[@]}" >"$logs/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 4 "$logs/$name.log" | sed 's/^/   /'
  echo "   -> rc $rc in ${dt}s"
  [ $rc -ne 0 ] && failed=$((failed + 1))
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"dry\": $DRY}" >>"$summary"
}

# In order of value, so that an overrun loses the least: what has never run on a GPU first (the measured 128K
# decode with copy-only and hybrid rows, the quantized kernels, the step's time), re-measurements last.
part env 30 \
  python3 -c "import json, torch, triton, transformers, platform; print(json.dumps({'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__, 'transformers': transformers.__version__, 'python': platform.python_version()}))" \
  -- python3 -c "import torch, transformers, prophet; print(torch.__version__, transformers.__version__)"
part gpu-tests 150 \
  python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests --junitxml="$res/gpu_tests_${gpu}.xml" \
  -- python3 -m pytest -q -p no:cacheprovider -o addopts=-ra -m gpu tests --collect-only
part bench-mixtral-128k 150 \
  python3 -m prophet.cli run --model mixtral --ctx 128k \
    --weights random --layers 8 --compare --on-miss auto --no-progress "${trace_args[@]}" --out "$res/prophet_bench_mixtral_128k_${gpu}.json" \
  -- python3 -m prophet.cli run --model mixtral-tiny --device cpu --weights random --layers 2 --compare --on-miss auto \
    --steps 4 --warmup 1 --no-progress
part quant-check 90 \
  python3 experiments/gpu/quant_check.py --out "$res" \
  -- python3 experiments/gpu/quant_check.py --help
part step-time 60 \
  python3 experiments/gpu/step_time.py --out "$res" \
  -- python3 experiments/gpu/step_time.py --dry-run
part host-bench 60 \
  python3 experiments/host_experts_bench.py --weights bf16,int8,int4,fp8,mxfp4 --batches 1,16 --threads 1,8,15 --rounds 3 \
    --out "$res/host_experts_bench_${gpu}.json" \
  -- python3 experiments/host_experts_bench.py --help
part offload-check 60 \
  python3 experiments/gpu/offload_check.py --out "$res" \
  -- python3 experiments/gpu/offload_check.py --help
part decode-check 60 \
  python3 experiments/gpu/decode_check.py --out "$res" \
  -- python3 experiments/gpu/decode_check.py --help
part grouped-gemm 100 \
  python3 experiments/gpu/bench_grouped_gemm.py --tokens 1 4 16 64 256 --out "$res" \
  -- python3 experiments/gpu/bench_grouped_gemm.py --help

total=$(( $(date +%s) - start ))
echo "run_all: ${failed} failed part(s), ${total}s in all (budget ${BUDGET_S}s)"
if [ "$DRY" = 0 ] && [ -n "${OUT:-}" ]; then
  cp -r "$logs" "$res/logs_${gpu}"
  tar czf "$OUT/results.tgz" -C "$res" .
fi
rm -rf "$work"
exit "$failed"
