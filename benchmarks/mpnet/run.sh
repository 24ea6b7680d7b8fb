#!/usr/bin/env bash
# issue 16: the whole benchmark on the 12-layer all-mpnet-base-v2 (`--model mpnet`), trec6 then rt-snippets, standard
# setting (stage 1 on the whole train split; ConsistentEE's stages 2/3 on top of it; the same-weights section too).
# Sized for 2 CPU cores (MPNet is about 5x MiniLM per step): rt-snippets stage 1 runs 1 epoch instead of 2, the policies
# roll out on a seeded 640-example subset with K=4, and the wall clock times 128 test examples over 3 rounds. The
# betas are about half of MiniLM's: the depth cost beta * e of a 12-layer model is twice that of a 6-layer one.
# Each run reuses what its --run-dir holds, so a stopped run resumes. Usage: bash benchmarks/mpnet/run.sh [trec6|rt-snippets]...
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
POLICY=(--betas 0.01,0.02,0.03,0.05 --policy-train-examples 640 --rollouts 4 --policy-epochs 2 --joint-epochs 1)
WALL=(--wall-repeats 3 --wall-examples 128 --wall-frontier-points 1)
for dataset in "${@:-trec6 rt-snippets}"; do
  for d in $dataset; do
    case "$d" in
      trec6) epochs=2 ;;
      rt-snippets) epochs=1 ;;
      *) echo "unknown dataset: $d (trec6, rt-snippets)" >&2; exit 2 ;;
    esac
    HF_HUB_OFFLINE=1 "$BIN"/consistentee benchmark --model mpnet --dataset "$d" --run-dir "runs/$d-mpnet" \
      --epochs "$epochs" "${POLICY[@]}" "${WALL[@]}" --threads 2 --device cpu --no-progress \
      --out-dir "benchmarks/results/$d-mpnet"
  done
done
