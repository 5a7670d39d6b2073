# BENCHMARKS.md 7d, pre-registered at 67d7fcb (seeds 25-29, n = 5); START and EXIT lines give the wall time
echo "START $(date -u '+%F %T')"
HF_HUB_OFFLINE=1 python bench/exp_planner.py --config configs/text-base-planner.yaml --seeds 25 26 27 28 29 \
    --budgets 8e12 16e12 --strategies planner planner-fixed-point acquire-first-half never-acquire \
    --calibration-seed 100 --calibration-tokens 8192 --calibration-pretrain 8192 \
    --calibration-added-tokens 100000 \
    --set text.tokens_per_iteration=65536 --set iterations=100 \
    --runs runs/bench-planner-moving --out bench/results/planner_moving
echo "EXIT $? $(date -u '+%F %T')"
