#!/usr/bin/env bash
# The comparisons at equal device budgets (issue 24): every method under the same per-group
# memory budgets. MiniLM: 11 methods, 3 data settings x 2 client ratios x 5 seeds; then MPNet;
# then SmolLM2 instruction tuning.
# Finished cells are kept in benchmarks/results/equal-budgets-*/cells/ and skipped when this is
# run again, so an interrupted grid is completed by running it again.
set -euo pipefail
cd "$(dirname "$0")/.."
FH=".venv/bin/fedhello"
$FH compare benchmarks/configs/equal-budgets.yaml \
  --variants benchmarks/configs/equal-budgets-variants.yaml \
  --methods fedhello,fed-pilot,flora,fedra,straggler,gd-inverted_triangle,fedit,hetlora,flexlora,exclusive,fedhello-lora-fair \
  --seeds 5 --settings iid,noniid,extreme --rocs 1:1:1,6:3:1 --jobs 2 \
  --out benchmarks/results/equal-budgets-minilm --no-report
# MPNet (12 blocks) at equal budgets: 7 methods, iid and noniid, 1:1:1, 3 seeds.
$FH compare benchmarks/configs/equal-budgets-mpnet.yaml \
  --methods fedhello,fed-pilot,fedra,gd-inverted_triangle,hetlora,flora,fedit \
  --seeds 3 --settings iid,noniid --rocs 1:1:1 --jobs 2 \
  --out benchmarks/results/equal-budgets-mpnet --no-report
# SmolLM2 instruction tuning (30 blocks) at equal budgets: 5 methods, IID, 1:1:1, 2 seeds; exact
# match leads, ROUGE-L is recorded too (lm.primary_metric, fedhello/tasks/causal_lm.py). About an
# hour per cell on one core of the development machine; two cells of about 3 GiB side by side.
$FH compare benchmarks/configs/equal-budgets-smollm2.yaml \
  --methods fedhello,fed-pilot,fedra,gd-inverted_triangle,flora \
  --seeds 2 --settings iid --rocs 1:1:1 --jobs 2 \
  --out benchmarks/results/equal-budgets-smollm2 --no-report
