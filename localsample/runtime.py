"""The library wired together: settings, catalog and model pool, shared by the CLI
commands and the MCP sampling handler."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from localsample.catalog import Catalog, load_catalog
from localsample.engine import Completion, GenerationRequest, OnText
from localsample.pool import Pool
from localsample.selection import Choice, choose
from localsample.settings import Settings, load_settings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings | None = None, catalog: Catalog | None = None) -> None:
        self.settings = settings or load_settings()
        self.catalog = catalog or load_catalog(self.settings.catalog_path)
        self.pool = Pool(self.catalog, self.settings.model_dir)

    def select(self, *, model: str | None = None, hints: Sequence[str] = ()) -> Choice:
        """An explicit model id/alias wins; else hints; else the default model."""
        if model is not None:
            return Choice(self.catalog.get(model), f"named explicitly ('{model}')")
        return choose(self.catalog, hints, self.settings.default_model, self.pool.available)

    async def complete(self, choice: Choice, request: GenerationRequest, on_text: OnText | None = None) -> Completion:
        engine = self.pool.engine(choice.model)
        log.debug("model %s: %s", choice.model.id, choice.reason)
        return await engine.generate(request, on_text)

    def close(self) -> None:
        self.pool.close()
