# issue 14: the lossless drafter's confidence threshold at layer 6, lower than 0.8 (more drafts, lower acceptance)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
cd /work/main
for K in 0.3 0.5; do
.venv/bin/consistentee benchmark-lm --run-dir runs/lm-xsum-600-lossless-knob$K --exits-dir runs/lm-xsum-600/exits/stage3 --device cpu \
  --exit-every 6 --xsum-examples 30 --max-article-tokens 256 --max-new-tokens 32 --ppl-tokens 256 \
  --consistentee-knobs "" --static-knobs "" --maxprob-knobs "" --gap-knobs "" --saturation-knobs "" \
  --lossless-rule confidence-maxprob --lossless-knob $K --lossless-check-layers 6 --draft-tokens 3 --draft-vocab 8192 \
  --kv propagate --clock cpu --threads 1 --no-progress
done
