#!/usr/bin/env bash
# The question behind the MPNet reports: do the policies decide by layer because run.sh sizes their training down?
# Reruns ConsistentEE for beta 0.02 with the full recipe (stage 2 and 3 on all 4,952 trec6 examples, K = 8, 3 policy
# epochs) on the stage-1 model of `bash benchmarks/mpnet/run.sh trec6` (linked, not retrained); every rule on the same
# tables, no wall clock and no resampling study (about 45 minutes on 2 cores). Report: benchmarks/results/trec6-mpnet-fullpolicy.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
src=runs/trec6-mpnet run=runs/trec6-mpnet-policyfull
[ -d "$src/stage1" ] || { echo "run 'bash benchmarks/mpnet/run.sh trec6' first ($src/stage1 is missing)" >&2; exit 2; }
mkdir -p "$run"
for f in labels.json learned_heads memorized_layers.json memorized_layers.png stage1; do ln -sfn "../$(basename "$src")/$f" "$run/$f"; done
cp "$src/run.json" "$run/run.json"
HF_HUB_OFFLINE=1 "$BIN"/consistentee benchmark --model mpnet --dataset trec6 --run-dir "$run" --epochs 2 --betas 0.02 \
  --rollouts 8 --policy-epochs 3 --joint-epochs 1 --wall-repeats 0 --resplits 0 --threads 2 --device cpu --no-progress \
  --out-dir benchmarks/results/trec6-mpnet-fullpolicy
