#!/usr/bin/env bash
# Installs everything, then runs the default experiment (offline MiniLM, Wikipedia vital articles).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/fedhello run "$@"
