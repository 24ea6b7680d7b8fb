# issue 14: stages 2-3 and benchmark-lm on the 600-step stage-1 snapshot of runs/lm-xsum-long (same recipe,
# same stage-2/3 settings as benchmarks/lm/train_xsum.sh), one thread, CPU clock (the cores are shared)
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
S=runs/lm-xsum-long/exits/stage1-step600
while [ ! -f $S/exits_config.json ]; do sleep 20; done
mkdir -p runs/lm-xsum-600/exits
[ -d runs/lm-xsum-600/exits/stage1 ] || cp -r $S runs/lm-xsum-600/exits/stage1
.venv/bin/consistentee train-lm --run-dir runs/lm-xsum-600 --device cpu \
  --exit-every 6 --seq-len 128 --batch-size 4 --stage1-steps 1500 --stage1-windows 1692 --head-positions 32 --corpus xsum --lr-heads 1e-3 \
  --lora-rank 8 --lora-alpha 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --layer-dropout 0.1 --exit-kl 0.5 --memorize-chunks 16 --stage2-steps 30 --rollouts 4 --beta 0.02 \
  --hardness-floor 0.5 --target full --stage3-steps 20 --no-progress
.venv/bin/consistentee benchmark-lm --run-dir runs/lm-xsum-600-bench --exits-dir runs/lm-xsum-600/exits/stage3 --device cpu \
  --exit-every 6 --xsum-examples 100 --max-article-tokens 256 --max-new-tokens 32 --ppl-tokens 2048 \
  --consistentee-knobs 0.5 --static-knobs "" --maxprob-knobs 0.9 --gap-knobs "" --saturation-knobs "" \
  --lossless-rule confidence-maxprob --lossless-knob 0.8 --lossless-check-layers 6 --draft-tokens 3 --draft-vocab 8192 \
  --kv propagate --clock cpu --threads 1 --no-progress
