"""Which models are loaded. For now: one engine per catalog id, loaded on first use and
kept until the pool closes."""

from __future__ import annotations

import threading
from pathlib import Path

from localsample.catalog import Catalog, ModelEntry, resolve_model_path
from localsample.engine import Engine
from localsample.errors import ModelFileError


class Pool:
    def __init__(self, catalog: Catalog, model_dir: Path) -> None:
        self.catalog = catalog
        self.model_dir = model_dir
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def available(self, model: ModelEntry) -> bool:
        """Whether the model's file is on disk (no network, no loading)."""
        try:
            resolve_model_path(model, self.model_dir)
        except ModelFileError:
            return False
        return True

    def engine(self, model: ModelEntry) -> Engine:
        """The engine for ``model``; raises ModelFileError if its file is missing."""
        with self._lock:
            engine = self._engines.get(model.id)
            if engine is None or engine.model != model:
                engine = Engine(model, resolve_model_path(model, self.model_dir))
                self._engines[model.id] = engine
            return engine

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()
