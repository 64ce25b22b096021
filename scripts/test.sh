#!/usr/bin/env bash
# Installs everything, then runs lint, format check, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check fedhello tests benchmarks
.venv/bin/ruff format --check fedhello tests benchmarks
.venv/bin/mypy fedhello
exec .venv/bin/pytest "$@"
