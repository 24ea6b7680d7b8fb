# issue 14: stage-1 LoRA (peft) + LayerSkip (layer dropout, early-exit loss on 32 positions per sequence, KL to the last layer)
# on the XSum training split (BIG-bench sdist, never a test article); then stages 2 and 3 on the full model's tokens.
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 5 .venv/bin/consistentee train-lm --run-dir runs/lm-xsum --device cpu \
  --exit-every 6 --seq-len 128 --batch-size 4 --stage1-steps 300 --head-positions 32 --corpus xsum --lr-heads 1e-3 \
  --lora-rank 8 --lora-alpha 16 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --layer-dropout 0.1 --exit-kl 0.5 --memorize-chunks 16 --stage2-steps 30 --rollouts 4 --beta 0.02 \
  --hardness-floor 0.5 --target full --stage3-steps 20
