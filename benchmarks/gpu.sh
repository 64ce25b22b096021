#!/usr/bin/env bash
# The GPU figures of docs/budgets.md (issue 14), when a GPU is lent: cost-model calibration and
# prediction error, step time and peak memory per allocation with model FLOP utilisation, and the
# Fisher speed-up, for ViT-B/16- and SmolLM2-shaped models in bf16. Stops itself after 7.5 minutes.
#   bash benchmarks/gpu.sh            # writes benchmarks/results/gpu.json and prints the figures
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 450 "$PY" benchmarks/gpu.py --device cuda --out "${OUT:-benchmarks/results}/gpu.json" "$@"
