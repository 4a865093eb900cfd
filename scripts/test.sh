#!/usr/bin/env bash
# Set up (scripts/setup.sh), then type-check the package and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check localsample tests scripts
.venv/bin/python -m mypy
.venv/bin/python -m pytest "$@"
