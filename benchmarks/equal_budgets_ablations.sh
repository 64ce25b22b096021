#!/usr/bin/env bash
# Ablations of Fed-HeLLo at equal device budgets (issue 24): importance levels among each
# client's feasible blocks, a slower refresh cadence, and layer sets held between refreshes
# (benchmarks/configs/equal-budgets-variants.yaml), next to the reference grid's cells in the same
# folder (uniform sampling within the allowed blocks is `fedra` there). Resumable like the grid.
set -euo pipefail
cd "$(dirname "$0")/.."
FH=".venv/bin/fedhello"
$FH compare benchmarks/configs/equal-budgets.yaml \
  --variants benchmarks/configs/equal-budgets-variants.yaml \
  --methods fedhello-feasible,fedhello-refresh-half,fedhello-persist \
  --seeds 5 --settings iid,noniid --rocs 1:1:1 --jobs 2 \
  --out benchmarks/results/equal-budgets-minilm --no-report
