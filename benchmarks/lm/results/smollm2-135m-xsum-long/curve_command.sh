# measure each stage-1 snapshot as it appears (agreement on 40 held-out XSum articles' own summaries)
OUT=benchmarks/lm/results/smollm2-135m-xsum-long/agreement_curve.json
for N in 300 600 900 1200 1500; do
  D=runs/lm-xsum-long/exits/stage1-step$N
  [ $N = 1500 ] && D=runs/lm-xsum-long/exits/stage1
  while [ ! -f $D/exits_config.json ]; do sleep 30; done
  DIRS=$(ls -d runs/lm-xsum-long/exits/stage1-step* runs/lm-xsum-long/exits/stage1 2>/dev/null | paste -sd, -)
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm/agreement_curve.py --untrained 6,12,18,24,30 \
    --exits-dirs $DIRS --articles 40 --out $OUT
done
