# issue 13: make-demo recipe (hold-out setting), beta 0.05, policies with --policy-input-scaling, on the stage 1 of
# runs/demo-seed$S (copied); compare with benchmarks/results/rt-snippets-demo-seeds/seed-$S (same recipe without it)
cd /work/main
S=${1:-0}
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/consistentee benchmark --run-dir runs/demo-scaled-seed$S --seed $S \
  --out-dir benchmarks/results/policy-input-scaling/demo-seed$S \
  --dataset rt-snippets --max-train-examples 3000 --max-length 64 --policy-holdout 0.2 --epochs 1 \
  --learned-epochs 5 --policy-epochs 3 --joint-epochs 1 --rounds 1 --betas 0.05 --wall-repeats 0 \
  --threads 1 --no-progress --policy-input-scaling
