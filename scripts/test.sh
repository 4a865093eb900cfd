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
# ... and a FastMCP 3.x server, in a venv of its own (FastMCP 3 needs mcp 1.x; localsample
# needs mcp 2.x). Installed again only when tests/servers/fastmcp/requirements.txt changes.
fm=tests/servers/fastmcp
fm_want="$(cat "$fm/requirements.txt")"
if [ "$(cat "$fm/.venv/.localsample-installed" 2>/dev/null)" != "$fm_want" ] ||
    ! "$fm/.venv/bin/python" -c 'import fastmcp' 2>/dev/null; then
    echo "test: installing $(grep -m1 '^fastmcp' "$fm/requirements.txt") into $fm/.venv" >&2
    [ -x "$fm/.venv/bin/python" ] ||
        "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv "$fm/.venv"
    "$fm/.venv/bin/python" -m pip install -r "$fm/requirements.txt" 2>&1 |
        { grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location' >&2 || true; }
    "$fm/.venv/bin/python" -c 'import fastmcp' # fail here, not later, if the install failed
    echo "$fm_want" > "$fm/.venv/.localsample-installed"
fi
# Real chat templates (Qwen, Llama 3, Hermes, Mistral, SmolLM3, Phi, Gemma) for the tool-call
# tests, taken from the llama.cpp vendored in llama-cpp-python's sdist (the installed version).
tpl=tests/.templates
tpl_want="llama-cpp-python $(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
if [ "$(cat "$tpl/.version" 2>/dev/null)" != "$tpl_want" ]; then
    echo "test: fetching chat templates from the $tpl_want sdist (~76 MB, once)" >&2
    sdist_dir="$(mktemp -d)"
    trap 'rm -rf "$sdist_dir"' EXIT
    # pip's own lines: the download, then its metadata step (installs the build requirements).
    .venv/bin/python -m pip download --no-deps --no-binary :all: --dest "$sdist_dir" \
        "llama-cpp-python==${tpl_want#* }" 2>&1 | { grep --line-buffered -v -e '^WARNING: Location' >&2 || true; }
    members=()
    for name in Qwen-Qwen2.5-7B-Instruct Qwen-Qwen3-0.6B meta-llama-Llama-3.1-8B-Instruct \
        meta-llama-Llama-3.2-3B-Instruct NousResearch-Hermes-3-Llama-3.1-8B-tool_use \
        NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use mistralai-Mistral-Nemo-Instruct-2407 \
        Mistral-Small-3.2-24B-Instruct-2506 HuggingFaceTB-SmolLM3-3B microsoft-Phi-3.5-mini-instruct \
        google-gemma-2-2b-it; do
        members+=("*/vendor/llama.cpp/models/templates/$name.jinja")
    done
    rm -rf "$tpl" && mkdir -p "$tpl"
    tar -xzf "$sdist_dir"/*.tar.gz -C "$tpl" --strip-components=5 --wildcards "${members[@]}"
    rm -rf "$sdist_dir"
    trap - EXIT
    echo "$tpl_want" > "$tpl/.version"
fi
.venv/bin/python -m ruff check localsample tests scripts examples
.venv/bin/python -m ruff format --check localsample tests scripts examples
.venv/bin/python -m mypy  # strict, over localsample, tests and scripts (pyproject.toml)
.venv/bin/python -m pytest "$@"
