#!/usr/bin/env bash
# What is left of the papers' experiments for a GPU loan: the circuits knowledge-edit experiment
# (`patchscopes circuits run --profile paper`, float32), in a new directory. The pieces committed from a CPU
# run cannot continue here, because a GPU does not retrain their circuits exactly (the edit step refuses to),
# so this run replaces them as a whole.
# Every step is resumable: run the script again and each continues where it stopped. What to commit lands in
# ${OUT:-fidelity-results}/ (packed run directories, summaries, a log per step).
#   bash bench/fidelity_gpu.sh                  # from the repository root, in a venv with a CUDA build of torch
#   QUICK=1 DEVICE=cpu bash bench/fidelity_gpu.sh   # each step's one-minute profile: checks the script itself
# STEP_TIMEOUT (seconds, default 3000) bounds each step; a step cut short keeps its finished units.
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
  pip install -q -e ".[test]" >"$out/install.log" 2>&1
  patchscopes models install SmolLM2-135M >>"$out/install.log" 2>&1
fi
patchscopes data where | tee "$out/data.txt"
python -c "from patchscopes.datasets import data_dir; import sys; sys.exit(0 if (data_dir() / 'patchscopes').is_dir() else 1)" \
  || patchscopes data download >>"$out/install.log" 2>&1 || { echo "the papers' data is missing and could not be downloaded: set PATCHSCOPES_DATA"; exit 2; }

step() {  # name, then the command; its log and exit status go to $out
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.log"
  local started=$SECONDS
  timeout "$step_timeout" "$@" >>"$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
}

keep() {  # run directory, destination name: pack it, then copy its packed tables, summaries and figures
  patchscopes pack "$1" >>"$out/steps.txt" 2>&1
  mkdir -p "$out/$2"
  find "$1" -maxdepth 1 \( -name '*.jsonl.gz' -o -name '*.csv' -o -name '*.csv.gz' -o -name '*.json' -o -name '*.png' \) \
    -exec cp {} "$out/$2/" \;
}

circuits="$runs/circuits-paper"
if [ -n "${QUICK:-}" ]; then
  step circuits-quick patchscopes circuits run --profile quick --device "$device" --dtype float32 --out "$circuits"
else
  step circuits-paper patchscopes circuits run --profile paper --device "$device" --dtype float32 --out "$circuits"
fi
for seed in "$circuits"/seed-*; do
  [ -d "$seed" ] && keep "$seed" "circuits-paper/$(basename "$seed")"
done
# its tables (CSV, beside the seed directories) and figures, made while the circuit files are still there
patchscopes circuits report --out "$circuits" --figures "$out/circuits-paper/figures" >"$out/circuits-report.log" 2>&1 \
  && find "$circuits" -maxdepth 1 -name '*.csv' -exec cp {} "$out/circuits-paper/" \;
cat "$out/steps.txt"
