#!/usr/bin/env bash
# Set up (scripts/setup.sh), then answer a prompt with the default local model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
# An MCP server whose tool samples; localsample answers the sampling with the local model.
localsample call --server "python examples/product_server.py" create_product \
    --arg name=tomato --arg keywords="red, fresh"
