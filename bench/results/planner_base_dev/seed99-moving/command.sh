HF_HUB_OFFLINE=1 python3 bench/exp_planner.py --config configs/text-base-planner.yaml --seeds 99 --budgets 8e12 16e12 \
  --strategies planner planner-fixed-point acquire-first-half --calibration-seed 100 --calibration-tokens 8192 \
  --calibration-pretrain 8192 --calibration-added-tokens 100000 --jobs 2 --threads 1 \
  --set text.tokens_per_iteration=65536 --set iterations=100 --runs /tmp/dev3/runs --out /tmp/dev3/out
