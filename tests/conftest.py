"""Shared fixtures. Tests run against the real default model, fetched by
`scripts/fetch_model.py` (scripts/test.sh does that first); a missing model is an error,
never a skip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from localsample.catalog import LoadSettings, ModelEntry, load_catalog
from localsample.engine import Engine
from localsample.settings import _default_model_dir

DEFAULT_ID = "smollm2-135m-instruct"
TEST_N_CTX = 2048


def real_model_dir() -> Path:
    """Where fetch_model.py put the model (LOCALSAMPLE_TEST_MODEL_DIR overrides)."""
    import os

    return Path(os.environ.get("LOCALSAMPLE_TEST_MODEL_DIR") or _default_model_dir())


@pytest.fixture(scope="session")
def model_dir() -> Path:
    entry = load_catalog(None).get(DEFAULT_ID)
    path = real_model_dir() / entry.source
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run `python scripts/fetch_model.py` (scripts/test.sh does)")
    return real_model_dir()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads the developer's own config or catalog, or touches the network."""
    monkeypatch.setenv("LOCALSAMPLE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("LOCALSAMPLE_CATALOG_PATH", str(tmp_path / "models.toml"))
    monkeypatch.setenv("LOCALSAMPLE_MODEL_DIR", str(real_model_dir()))
    monkeypatch.setenv("LOCALSAMPLE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("LOCALSAMPLE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def small_entry(**load: object) -> ModelEntry:
    """The default model's entry with a small context, to keep tests quick."""
    entry = load_catalog(None).get(DEFAULT_ID)
    settings = entry.load.model_dump() | {"n_ctx": TEST_N_CTX} | load
    return entry.model_copy(update={"load": LoadSettings(**settings)})


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> Iterator[Engine]:
    entry = small_entry()
    eng = Engine(entry, model_dir / entry.source)
    eng.load()
    yield eng
    eng.close()
