#!/usr/bin/env bash
# Set up (scripts/setup.sh), then answer a prompt with the default local model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/localsample sample "Write a two-sentence product description for a ripe red tomato." --max-tokens 120
