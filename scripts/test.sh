#!/usr/bin/env bash
# README command two: set up .venv from scratch if needed and run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the long end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONHASHSEED=0
exec .venv/bin/python -m pytest "$@"
