cd /tmp/pclone
echo "START $(date -u '+%F %T')"
HF_HUB_OFFLINE=1 python bench/exp_planner.py --config configs/text-base-planner.yaml --seeds 20 21 22 23 24 \
    --budgets 3e12 8e12 --strategies planner always-acquire never-acquire acquire-first-half \
    --calibration-seed 100 --calibration-tokens 8192 --calibration-pretrain 8192 \
    --set text.tokens_per_iteration=65536 --set iterations=100 \
    --runs runs/bench-planner-base --out out/planner_base_2budgets
echo "EXIT $? $(date -u '+%F %T')"
