#!/usr/bin/env bash
# Set up (scripts/setup.sh), then type-check the package and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k engine -x, or the fast tier
# (no model loaded, no process started): scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python scripts/fetch_model.py gemma3-270m >/dev/null  # the tests' second model
# The protocol tests also run a server built with the TypeScript SDK (needs Node.js >= 18).
if ! command -v npm >/dev/null; then
    echo "test: Node.js and npm are needed for the TypeScript-SDK server tests; install Node.js >= 18" >&2
    exit 1
fi
[ -d tests/servers/ts/node_modules/@modelcontextprotocol/sdk ] ||
    (cd tests/servers/ts && npm ci --no-audit --no-fund --loglevel=error)
.venv/bin/python -m ruff check localsample tests scripts
.venv/bin/python -m ruff format --check localsample tests scripts
.venv/bin/python -m mypy  # strict, over localsample, tests and scripts (pyproject.toml)
.venv/bin/python -m pytest "$@"
