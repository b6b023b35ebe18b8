#!/usr/bin/env bash
# Set-up + the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
python -m pytest -q tests "$@"
