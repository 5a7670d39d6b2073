cd /work/main
export HF_HUB_OFFLINE=1
echo "START $(date -u +%FT%TZ)"
python bench/exp_text_value.py --config configs/text-base.yaml --seeds 20 21 22 23 24 --tokens 15000 60000 \
    --jobs 1 --threads 2 --runs runs/bench-text-value-base --out bench/results/text_value_base
echo "VALUE_EXIT $? $(date -u +%FT%TZ)"
python bench/exp_text_acquisition.py --config configs/text-base.yaml --seeds 20 21 22 23 24 --jobs 1 --threads 2 \
    --conditions target-only random gp oracle random-ranked gp-ranked random-dsir-ranked random-classifier-ranked \
    gp-dsir-ranked gp-classifier-ranked --runs runs/bench-text-base --out bench/results/text_acquisition_base
echo "ACQ_EXIT $? $(date -u +%FT%TZ)"
