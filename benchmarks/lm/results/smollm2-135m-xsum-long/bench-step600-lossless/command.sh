# the lossless row of the 600-step exits (full, HF and lossless rows only), after verification stopped running the
# end-of-text token and lossless layer/FLOPs ratios were counted against full depth's work on the same texts
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/consistentee benchmark-lm --run-dir runs/lm-xsum-600-lossless2 --exits-dir runs/lm-xsum-600/exits/stage3 --device cpu \
  --exit-every 6 --xsum-examples 100 --max-article-tokens 256 --max-new-tokens 32 --ppl-tokens 2048 \
  --consistentee-knobs "" --static-knobs "" --maxprob-knobs "" --gap-knobs "" --saturation-knobs "" \
  --lossless-rule confidence-maxprob --lossless-knob 0.8 --lossless-check-layers 6 --draft-tokens 3 --draft-vocab 8192 \
  --kv propagate --clock cpu --threads 1 --no-progress
