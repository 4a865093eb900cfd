"""The library wired together: settings, catalog and model pool, shared by the CLI
commands and the MCP sampling handler."""

from __future__ import annotations

import logging

from localsample.audit import AuditLog
from localsample.catalog import Catalog, load_catalog
from localsample.engine import Completion, GenerationRequest, OnText
from localsample.errors import ConfigError, UnknownModelError
from localsample.policy import Limits
from localsample.pool import Pool
from localsample.selection import Choice, Needs, Preferences, ServerPolicy, select
from localsample.settings import Settings, load_settings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings | None = None, catalog: Catalog | None = None) -> None:
        self.settings = settings or load_settings()
        self.catalog = catalog or load_catalog(self.settings.catalog_path)
        self.pool = Pool(self.catalog, self.settings.model_dir)
        self.limits = Limits(self.settings)
        self.audit = AuditLog.from_settings(self.settings) if self.settings.audit else None
        self._check_settings()

    def _check_settings(self) -> None:
        """Model names in the settings must exist in the catalog."""
        names = [("default_model", self.settings.default_model)]
        for server, policy in self.settings.servers.items():
            if policy.model:
                names.append((f"servers.{server}.model", policy.model))
            names += [(f"servers.{server}.allow_models", name) for name in policy.allow_models]
        for key, name in names:
            try:
                self.catalog.get(name)
            except UnknownModelError as exc:
                raise ConfigError(
                    f"setting {key} names '{name}', which is not in the catalog", exc.fix
                ) from exc

    def select(
        self,
        *,
        model: str | None = None,
        needs: Needs | None = None,
        prefs: Preferences | None = None,
        server: str = "server",
    ) -> Choice:
        """An explicit model id/alias wins; else the selection rules (selection.py)."""
        if model is not None:
            return Choice(self.catalog.get(model), f"named explicitly ('{model}')")
        policy = self.settings.server(server)
        return select(
            self.catalog,
            needs or Needs(),
            prefs or Preferences(),
            default=self.settings.default_model,
            available=self.pool.available,
            policy=ServerPolicy(pin=policy.model, allow=tuple(policy.allow_models)),
            server=server,
        )

    async def complete(self, choice: Choice, request: GenerationRequest, on_text: OnText | None = None) -> Completion:
        engine = self.pool.engine(choice.model)
        log.debug("model %s: %s", choice.model.id, choice.reason)
        return await engine.generate(request, on_text)

    def close(self) -> None:
        self.pool.close()
