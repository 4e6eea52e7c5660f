#!/usr/bin/env bash
# Create .venv (if missing) and install arcflow with torch pinned to 2.13.0 and every other package
# at the version constraints.txt pins. Idempotent and quiet.
#
# The install is editable, so code changes need no reinstall: setup installs again only when
# pyproject.toml, constraints.txt, this script, the Python or the clone's location changed since the
# last install (their hash is kept in .venv/.arcflow-setup-stamp; delete it to force a reinstall).
# pip runs with -qq: errors only. On machines whose pip config lists extra index locations that
# do not exist, -q would still print one "Location ... is ignored" warning per package looked up,
# and setuptools' build-backend notes about editable installs; neither is actionable here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.arcflow-setup-stamp
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv and installing arcflow (torch 2.13.0); the first time takes a few minutes"
  "$PY" -m venv .venv
fi
want=$( { cat pyproject.toml constraints.txt scripts/setup.sh; pwd; .venv/bin/python -VV; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x .venv/bin/arcflow ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip -qq --disable-pip-version-check "$@"; }
pip install --upgrade pip
# torch pinned to one release. Which build the pin gets depends on the indexes pip sees: from PyPI
# alone on Linux it is the CUDA build (multi-GB with its nvidia-* wheels), on a CPU-only machine too;
# where pip's config lists a local CPU wheel first (find-links, as on this project's CPU machines) it
# is 2.13.0+cpu. A torch 2.13.0 already in .venv satisfies the pin and is kept, so for the CPU build
# elsewhere install it first: .venv/bin/python -m pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu (README.md, Installing torch).
pip install -c constraints.txt "torch==2.13.0"
pip install -c constraints.txt -e ".[dev]"
echo "$want" > "$STAMP"
echo "setup: arcflow installed in .venv"
