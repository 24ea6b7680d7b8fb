# issue 14: the XSum recipe of benchmarks/lm/train_xsum.sh, stage 1 run 5x longer (1500 steps: 3.5 epochs over the 1,692 XSum training windows left beside the 16 of stages 2-3), one thread;
# checkpoints every 50 steps; exits saved at steps 300/600/900/1200 too (exits/stage1-step<N>)
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/consistentee train-lm --run-dir runs/lm-xsum-long --device cpu \
  --exit-every 6 --seq-len 128 --batch-size 4 --stage1-steps 1500 --stage1-windows 1692 --head-positions 32 --corpus xsum --stage1-snapshots 300,600,900,1200 --lr-heads 1e-3 \
  --lora-rank 8 --lora-alpha 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --layer-dropout 0.1 --exit-kl 0.5 --memorize-chunks 16 --stage2-steps 30 --rollouts 4 --beta 0.02 \
  --hardness-floor 0.5 --target full --stage3-steps 20
