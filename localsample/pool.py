"""Which models are loaded: preload, keep-alive, eviction, a memory budget, a queue bound.

Each engine loads and generates on its own thread, so loading one model never blocks
requests to another. Before a model loads, the pool makes room: while more than
``max_loaded_models`` would be loaded, or their files would take more than the memory
budget, the least recently used idle model is unloaded (a model serving requests is
never unloaded). An idle model is unloaded after its keep-alive (minutes; 0 = right after
use, -1 = never). A model with ``queue_limit`` requests in flight answers "busy".
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from localsample.catalog import Catalog, ModelEntry, resolve_model_path
from localsample.engine import Engine
from localsample.errors import BusyError, ModelFileError
from localsample.settings import Settings

log = logging.getLogger(__name__)


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Pool:
    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self.model_dir = settings.model_dir
        self.budget = (settings.memory_budget_mb << 20) if settings.memory_budget_mb else machine_memory() * 3 // 4
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
        """The engine for ``model`` (not loaded yet); ModelFileError if its file is missing."""
        with self._lock:
            engine = self._engines.get(model.id)
            if engine is None or engine.model != model:
                engine = Engine(model, resolve_model_path(model, self.model_dir), slots=self.settings.parallel)
                self._engines[model.id] = engine
            return engine

    def loaded(self) -> list[Engine]:
        return [e for e in self._engines.values() if e.loaded]

    def keep_alive(self, engine: Engine) -> float:
        value = engine.model.keep_alive
        return self.settings.keep_alive if value is None else value

    @asynccontextmanager
    async def use(self, model: ModelEntry) -> AsyncIterator[Engine]:
        """The loaded engine for one request: counted in flight, room made, marked used."""
        engine = self.engine(model)
        if engine.in_flight >= self.settings.queue_limit:
            raise BusyError(
                f"busy: {engine.in_flight} requests are already waiting for model '{model.id}'",
                "retry later, or raise the queue_limit setting",
            )
        engine.in_flight += 1
        try:
            if not engine.loaded:
                self._make_room(engine)
                await engine.ensure_loaded()
            yield engine
        finally:
            engine.in_flight -= 1
            engine.last_used = time.monotonic()
            if self.keep_alive(engine) == 0 and engine.in_flight == 0:
                log.info("unloading %s (keep_alive = 0)", model.id)
                engine.close()

    def _make_room(self, incoming: Engine) -> None:
        while True:
            others = [e for e in self.loaded() if e is not incoming]
            used = sum(e.size for e in others) + incoming.size
            if len(others) < self.settings.max_loaded_models and used <= self.budget:
                return
            idle = sorted((e for e in others if e.in_flight == 0), key=lambda e: e.last_used)
            if not idle:
                log.warning("cannot make room for %s: every loaded model is busy", incoming.model.id)
                return
            why = "max_loaded_models" if len(others) >= self.settings.max_loaded_models else "memory_budget_mb"
            log.info("unloading %s to make room for %s (%s)", idle[0].model.id, incoming.model.id, why)
            idle[0].close()

    def reap(self, now: float | None = None) -> list[str]:
        """Unload idle models whose keep-alive has run out; the ids unloaded."""
        now = time.monotonic() if now is None else now
        gone = []
        for engine in self.loaded():
            minutes = self.keep_alive(engine)
            if minutes >= 0 and engine.in_flight == 0 and now >= engine.last_used + minutes * 60:
                engine.close()
                gone.append(engine.model.id)
        return gone

    def status(self) -> Iterator[dict[str, Any]]:
        """What `localsample ps` shows for each loaded model."""
        for engine in self.loaded():
            minutes = self.keep_alive(engine)
            until = None if minutes < 0 else time.time() + minutes * 60 - (time.monotonic() - engine.last_used)
            load = engine.model.load
            yield {
                "id": engine.model.id,
                "size": engine.size,
                "gpu_layers": load.n_gpu_layers,
                "processor": "CPU" if load.n_gpu_layers == 0 else "GPU" if load.n_gpu_layers < 0 else "CPU/GPU",
                "n_ctx": load.n_ctx,
                "in_flight": engine.in_flight,
                "until": None if engine.in_flight else until,
            }

    def close(self) -> None:
        with self._lock:
            for engine in self._engines.values():
                engine.close()
            self._engines.clear()


def files_size(path: Path) -> int:
    from localsample.gguf_file import split_parts

    return sum(p.stat().st_size for p in split_parts(path) if p.exists())
