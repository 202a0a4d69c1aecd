#!/usr/bin/env bash
# Here (with a registry), before a GPU call: what run_all.sh needs and the GPU machine lacks.
# - .whl/: wheels for Python 3.12 of the transformers this checkout is tested with (the machine's is older than
#   the pins allow) and of the dependencies it needs newer than the machine's;
# - .gpu-data/: the shared real Mixtral trace (read from PROPHET_SHARED_TRACES or ../shared/traces; never
#   committed, only carried).
# Both folders are git-ignored; name them in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(python3 -c "import transformers; print(transformers.__version__)")
mkdir -p .whl .gpu-data
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "transformers==$version" "regex>=2025.10.22"
traces=$(python3 -c "from prophet.envs import shared_traces_dir; print(shared_traces_dir())")
if [ -f "$traces/mixtral-8x7b_humaneval_decode.npz" ]; then
  cp "$traces"/mixtral-8x7b_humaneval_decode.* .gpu-data/
else
  echo "prepare: no shared Mixtral trace at $traces; the 128K bench will use a synthetic trace" >&2
fi
ls -la .whl .gpu-data
