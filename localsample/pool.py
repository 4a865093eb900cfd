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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localsample.catalog import Catalog, ModelEntry, resolve_model_path, with_projector_path
from localsample.errors import BusyError, ModelFileError
from localsample.generation import Generator
from localsample.settings import Settings

if TYPE_CHECKING:
    from localsample.remote import RemoteGenerator

log = logging.getLogger(__name__)

GeneratorFactory = Callable[[ModelEntry, Path, int], Generator]
"""Makes the generator of a catalog model: (entry, its file, parallel slots)."""


def llama_generator(model: ModelEntry, path: Path, slots: int) -> Generator:
    """The in-process llama.cpp engine (imported here, so that importing the pool does not
    load llama.cpp)."""
    from localsample.engine import Engine

    return Engine(model, path, slots=slots)


def remote_of(generator: Generator) -> RemoteGenerator:
    """A remote entry's generator, as its own type (health and replicas)."""
    from localsample.remote import RemoteGenerator

    assert isinstance(generator, RemoteGenerator)
    return generator


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass
class Resident:
    """A model's generator and what the pool keeps about it (on the event loop)."""

    model: ModelEntry
    generator: Generator
    in_flight: int = 0
    """Requests queued or running on it."""
    last_used: float = field(default_factory=time.monotonic)


class Pool:
    def __init__(self, catalog: Catalog, settings: Settings, factory: GeneratorFactory = llama_generator) -> None:
        self.catalog = catalog
        self.settings = settings
        self.factory = factory
        self.model_dir = settings.model_dir
        self.budget = (settings.memory_budget_mb << 20) if settings.memory_budget_mb else machine_memory() * 3 // 4
        self._residents: dict[str, Resident] = {}
        self._lock = threading.Lock()

    def available(self, model: ModelEntry) -> bool:
        """Whether the model's file is on disk (no network, no loading); for a remote model,
        whether an endpoint answers (cached health, remote.py)."""
        if model.remote:
            return remote_of(self.resident(model).generator).available()
        try:
            resolve_model_path(model, self.model_dir)
        except ModelFileError:
            return False
        return True

    def why_unavailable(self, model: ModelEntry) -> str:
        """Why :meth:`available` said no: not downloaded, or (remote) offline or no answer."""
        if model.remote:
            return remote_of(self.resident(model).generator).why_unavailable()
        return f"not downloaded: localsample models pull {model.id}"

    def resident(self, model: ModelEntry) -> Resident:
        """The pool's record for ``model`` (not loaded yet); ModelFileError if its file is missing."""
        with self._lock:
            found = self._residents.get(model.id)
            if found is None or found.model != model:
                if model.remote:
                    from localsample.remote import RemoteGenerator  # imports the openai client: only when used

                    found = Resident(model, RemoteGenerator(model, self.settings))
                else:
                    path = resolve_model_path(model, self.model_dir)
                    engine_model = with_projector_path(model, self.model_dir)
                    found = Resident(model, self.factory(engine_model, path, self.settings.parallel))
                self._residents[model.id] = found
            return found

    def generator(self, model: ModelEntry) -> Generator:
        """The generator for ``model`` (not loaded yet); ModelFileError if its file is missing."""
        return self.resident(model).generator

    def loaded(self) -> list[Resident]:
        return [r for r in self._residents.values() if r.generator.loaded]

    def keep_alive(self, resident: Resident) -> float:
        value = resident.model.keep_alive
        return self.settings.keep_alive if value is None else value

    async def load(self, model: ModelEntry) -> Generator:
        """Load ``model`` now, making room first (preload)."""
        resident = self.resident(model)
        if not resident.generator.loaded:
            self._make_room(resident)
            await resident.generator.ensure_loaded()
        return resident.generator

    @asynccontextmanager
    async def use(self, model: ModelEntry) -> AsyncIterator[Generator]:
        """The loaded generator for one request: counted in flight, room made, marked used."""
        resident = self.resident(model)
        if resident.in_flight >= self.settings.queue_limit:
            running = min(resident.generator.running, resident.in_flight)
            raise BusyError(
                f"busy: model '{model.id}' has {running} requests running and {resident.in_flight - running} "
                f"waiting (queue_limit = {self.settings.queue_limit})",
                "retry later, or raise the queue_limit setting",
            )
        resident.in_flight += 1
        try:
            yield await self.load(model)
        finally:
            resident.in_flight -= 1
            resident.last_used = time.monotonic()
            if self.keep_alive(resident) == 0 and resident.in_flight == 0 and not model.remote:
                log.info("unloading %s (keep_alive = 0)", model.id)
                resident.generator.close()

    def local(self) -> list[Resident]:
        """The loaded models this process runs: a remote one is always ready and holds no
        memory here, so it takes no room and is never unloaded (closing it frees nothing,
        and it would still count as loaded: making room would never end)."""
        return [r for r in self.loaded() if not r.model.remote]

    def _make_room(self, incoming: Resident) -> None:
        while True:
            others = [r for r in self.local() if r is not incoming]
            used = sum(r.generator.size for r in others) + incoming.generator.size
            if len(others) < self.settings.max_loaded_models and used <= self.budget:
                return
            idle = sorted((r for r in others if r.in_flight == 0), key=lambda r: r.last_used)
            if not idle:
                log.warning("cannot make room for %s: every loaded model is busy", incoming.model.id)
                return
            why = "max_loaded_models" if len(others) >= self.settings.max_loaded_models else "memory_budget_mb"
            log.info("unloading %s to make room for %s (%s)", idle[0].model.id, incoming.model.id, why)
            idle[0].generator.close()

    def reap(self, now: float | None = None) -> list[str]:
        """Unload idle models whose keep-alive has run out; the ids unloaded."""
        now = time.monotonic() if now is None else now
        gone = []
        for resident in self.local():
            minutes = self.keep_alive(resident)
            if minutes >= 0 and resident.in_flight == 0 and now >= resident.last_used + minutes * 60:
                resident.generator.close()
                gone.append(resident.model.id)
        return gone

    def status(self) -> Iterator[dict[str, Any]]:
        """What `localsample ps` shows for each loaded model."""
        for resident in self.loaded():
            minutes = self.keep_alive(resident)
            until = None if minutes < 0 else time.time() + minutes * 60 - (time.monotonic() - resident.last_used)
            load = resident.model.load
            processor = "CPU" if load.n_gpu_layers == 0 else "GPU" if load.n_gpu_layers < 0 else "CPU/GPU"
            yield {
                "id": resident.model.id,
                "size": resident.generator.size,
                "gpu_layers": load.n_gpu_layers,
                "processor": "remote" if resident.model.remote else processor,
                **({"endpoints": remote_of(resident.generator).status()} if resident.model.remote else {}),
                "n_ctx": load.n_ctx,
                "in_flight": resident.in_flight,
                "until": None if resident.in_flight else until,
            }

    async def aclose(self) -> None:
        """:meth:`close`, from the event loop: remote models' connections are closed too."""
        from localsample.remote import RemoteGenerator  # only where remote models were used

        for resident in list(self._residents.values()):
            if isinstance(resident.generator, RemoteGenerator):
                await resident.generator.aclose()
        self.close()

    def close(self) -> None:
        with self._lock:
            for resident in self._residents.values():
                resident.generator.close()
            self._residents.clear()
