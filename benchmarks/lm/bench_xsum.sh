# issue 14: measure the XSum-trained exits of runs/lm-xsum/command.sh. Per-exit agreement before/after on the 8
# prompts of lossless_speed.py, then every rule on 100 XSum test articles (one torch thread, the thread's CPU time:
# the run shared the 2 cores with another job). Drafter of the lossless row: static layer 6, k = 2 (best expected
# round cost for the measured agreement).
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
OUT=benchmarks/lm/results/smollm2-135m-xsum
mkdir -p $OUT
.venv/bin/python benchmarks/lm/lossless_speed.py --agreement-only --exits-dir runs/lm-xsum/exits/stage1 \
  --layers 6,12,18,24 --out $OUT/agreement_stage1.json
.venv/bin/consistentee benchmark-lm --run-dir runs/lm-xsum-bench --exits-dir runs/lm-xsum/exits/stage3 --device cpu \
  --exit-every 6 --xsum-examples 100 --max-article-tokens 256 --max-new-tokens 32 --ppl-tokens 4096 \
  --consistentee-knobs 0.3,0.5,0.7 --static-knobs 12,24 --maxprob-knobs 0.8,0.95 --gap-knobs 0.6 \
  --saturation-knobs 0.98 --lossless-rule static --lossless-knob 6 --draft-tokens 2 --draft-vocab 8192 \
  --kv propagate --clock cpu --threads 1 --no-progress
cp runs/lm-xsum-bench/report.md runs/lm-xsum-bench/report.json runs/lm-xsum-bench/*.png $OUT/
