#!/usr/bin/env bash
# README command two: set up .venv from scratch if needed and run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the long end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONHASHSEED=0
# Tests start Ray workers and CLI subprocesses beside pytest: one torch thread each avoids
# oversubscribing the cores (OpenMP spin-waits made 2-thread runs 10-50x slower under load here).
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
