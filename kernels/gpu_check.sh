#!/usr/bin/env bash
# The GPU check of the kernels in one call (CI has no GPU): the CUDA tests, then the H200 benchmark.
#   bash kernels/gpu_check.sh [OUT_DIR]
# Needs only torch, triton and pytest (the image of the lent GPU machine has them); the rest of
# memllm is not imported. Writes pytest.log, bench_gpu.log and bench_gpu.json to OUT_DIR.
# Exits non-zero when a test or a benchmark check fails.
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# The interpreter cases run on CPU in CI already; here only what needs the device (and the dispatch rules).
timeout 200 python3 -m pytest tests/kernels -q -p no:cacheprovider -k "not interpreter and not cpu_smoke" -rs \
    2>&1 | tee "$out/pytest.log"
tests_rc=$?
timeout 300 python3 -m memllm_kernels.bench_gpu --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
bench_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
