#!/usr/bin/env bash
# Installs everything, then runs lint, format check, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Real Fashion-MNIST images for the image tests (Debian's package; needs root and apt, as in CI).
# Elsewhere those tests skip and say how to get the files.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ ! -f "$FMNIST" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  fi
  export FEDHELLO_REQUIRE_FASHION_MNIST=1  # here the real-image tests must run, not skip
fi
export HF_HUB_OFFLINE=1
.venv/bin/ruff check fedhello tests benchmarks
.venv/bin/ruff format --check fedhello tests benchmarks
.venv/bin/mypy fedhello
exec .venv/bin/pytest "$@"
