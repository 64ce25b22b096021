#!/usr/bin/env bash
# Installs everything, then runs lint, format check, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# From Debian (needs root and apt, as in CI): real Fashion-MNIST images for the image tests, and
# nginx, the reverse proxy of an authenticated Flower deployment. Elsewhere the tests that need
# them skip and say how to get them.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  [ -f "$FMNIST" ] || missing="$missing dataset-fashion-mnist"
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null
  fi
  export FEDHELLO_REQUIRE_FASHION_MNIST=1 FEDHELLO_REQUIRE_NGINX=1  # here those tests must run, not skip
fi
export HF_HUB_OFFLINE=1
.venv/bin/ruff check fedhello tests benchmarks
.venv/bin/ruff format --check fedhello tests benchmarks
.venv/bin/mypy fedhello
# Two workers (pytest-xdist): the Flower deployments mostly wait on their processes' polling,
# so the rest of the suite runs beside them; each group of Ray simulations or deployments stays on
# one worker (tests/test_flower.py). Arguments after the command go to pytest.
exec .venv/bin/pytest -n 2 --dist loadgroup "$@"
