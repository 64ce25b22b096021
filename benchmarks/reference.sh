#!/usr/bin/env bash
# The reference comparison of docs/results.md (issue 6). Finished cells are skipped, so an
# interrupted grid is completed by running this again. Measured on a 2-core machine: the
# MiniLM grid (180 cells, two at a time) 96 min, plus the 18 cells of the budgeted Fed-HeLLo variant, the MPNet subset (6 cells) about 25 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
FH=".venv/bin/python -m fedhello"
$FH compare benchmarks/configs/reference.yaml \
  --methods fedhello,fim,rgd-bottleneck,gd-bottleneck,fedra,straggler,exclusive,hetlora,flexlora,fedit,fedhello-budget \
  --variants benchmarks/configs/reference-variants.yaml --seeds 3 --settings iid,noniid,extreme --rocs 1:1:1,6:3:1 --jobs 2 \
  --out benchmarks/results/reference --no-report
$FH compare benchmarks/configs/reference-mpnet.yaml \
  --methods fedhello,fedra,fedit \
  --seeds 1 --settings iid,extreme --rocs 1:1:1 --jobs 2 \
  --out benchmarks/results/reference-mpnet --no-report
# the grids at equal device budgets are run by benchmarks/equal_budgets.sh; reported here with the rest
$FH report benchmarks/results/reference benchmarks/results/reference-mpnet \
  benchmarks/results/equal-budgets-minilm benchmarks/results/equal-budgets-mpnet \
  benchmarks/results/equal-budgets-smollm2 \
  --to docs/results.md --notes docs/results-notes.md \
  --command-line "bash benchmarks/reference.sh"
