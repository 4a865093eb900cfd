"""The library wired together: settings, catalog and model pool, shared by the CLI
commands and the MCP sampling handler."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

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
        self.pool = Pool(self.catalog, self.settings)
        self.limits = Limits(self.settings)
        self.publishing = False  # `serve` turns this on: its status is what `ps` shows
        self.started = time.time()
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
        log.debug("model %s: %s", choice.model.id, choice.reason)
        try:
            async with self.pool.use(choice.model) as engine:
                return await engine.generate(request, on_text)
        finally:
            self.publish_status()

    async def preload(self) -> None:
        """Load the preload models (default: the default model) so no request waits for it."""
        names = self.settings.preload if self.settings.preload is not None else [self.settings.default_model]
        for name in names:
            model = self.catalog.get(name)
            if not self.pool.available(model):
                log.warning("not preloading %s: not downloaded (localsample models pull %s)", model.id, model.id)
                continue
            engine = self.pool.engine(model)
            self.pool._make_room(engine)
            await engine.ensure_loaded()
        self.publish_status()

    def reap(self) -> None:
        if self.pool.reap():
            self.publish_status()

    @property
    def status_file(self) -> Path:
        return self.settings.state_dir / "run" / f"{os.getpid()}.json"

    def publish_status(self) -> None:
        """Write what this process has loaded, for `localsample ps` (only daemons publish)."""
        if not self.publishing:
            return
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            payload = {"pid": os.getpid(), "started": self.started, "models": list(self.pool.status())}
            partial = self.status_file.with_suffix(".partial")
            partial.write_text(json.dumps(payload))
            partial.replace(self.status_file)
        except OSError as exc:
            log.debug("status for `ps` not written: %s", exc)

    def close(self) -> None:
        self.pool.close()
        if self.publishing:
            self.status_file.unlink(missing_ok=True)
