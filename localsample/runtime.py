"""The library wired together, and the one request pipeline every front end uses.

``Runtime`` holds the settings, catalog, model pool, limits and audit trail. Its
``answer`` runs a request through select → limits → approve → generate → review →
audit; the MCP sampling handler, `localsample sample` and (to come) the agent and the
HTTP API all call it, so policy and audit are the same whoever asks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio

from localsample.audit import AuditDecision, AuditLog, AuditRecord
from localsample.catalog import Catalog, load_catalog
from localsample.errors import (
    BusyError,
    ConfigError,
    LocalsampleError,
    ModelFileError,
    RejectedError,
    UnknownModelError,
)
from localsample.generation import Completion, GenerationRequest, OnText
from localsample.policy import Asker, Decision, Limits, Pending, call_line, choose_approver, shown_response
from localsample.pool import GeneratorFactory, Pool, llama_generator
from localsample.selection import Choice, Needs, Preferences, ServerPolicy, estimate_tokens, select
from localsample.settings import Settings, load_settings, private_dir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Who asks: the server name (its settings decide policy), the request's id, the
    protocol version it came over, and the front end it came through when that is not
    `serve` or `call` (``run``): all for the audit trail."""

    server: str
    request_id: str
    protocol: str | None = None
    via: str | None = None


@dataclass(frozen=True)
class Answer:
    """A generated answer and why its model was chosen."""

    completion: Completion
    reason: str


def decision_of(error: LocalsampleError) -> AuditDecision:
    """The audit decision a request that failed with ``error`` gets."""
    if isinstance(error, BusyError):
        return "busy"
    if isinstance(error, RejectedError):
        return "rejected"
    if isinstance(error, ModelFileError):
        return "load_failed"
    return "error"


def needs_of(request: GenerationRequest) -> Needs:
    """What a request needs of a model: ``vision`` for images, ``audio`` for audio clips,
    an estimate of its prompt's tokens (text only: an image's tokens depend on the model's
    projector), maxTokens, and the ``tools`` capability it prefers when it offers tools."""
    chars = sum(len(m.content) for m in request.messages) + len(request.system or "")
    chars += sum(len(json.dumps(dict(c.arguments))) for m in request.messages for c in m.tool_calls)
    if request.offers_tools:
        chars += sum(len(t.name) + len(t.description) + len(json.dumps(dict(t.input_schema))) for t in request.tools)
    capabilities = {medium.kind.replace("image", "vision") for medium in request.media}
    if request.offers_tools:
        capabilities.add("tools")
    return Needs(
        capabilities=frozenset(capabilities),
        prompt_tokens=estimate_tokens(chars, len(request.messages)),
        max_tokens=request.max_tokens,
    )


def model_names(settings: Settings) -> Iterator[tuple[str, str]]:
    """Every model name the settings use, with the setting that names it."""
    yield "default_model", settings.default_model
    for name in settings.preload or []:
        yield "preload", name
    for server, policy in settings.servers.items():
        if policy.model:
            yield f"servers.{server}.model", policy.model
        for name in policy.allow_models:
            yield f"servers.{server}.allow_models", name


def unknown_model_names(settings: Settings, catalog: Catalog) -> list[ConfigError]:
    """One ConfigError per model name in the settings that the catalog does not know."""
    problems = []
    for key, name in model_names(settings):
        try:
            catalog.get(name)
        except UnknownModelError:
            problems.append(
                ConfigError(
                    f"setting {key} names '{name}', which is not in the catalog",
                    f"use a catalog id or alias ({', '.join(catalog.ids()) or 'none'}), or add a [[models]] "
                    f"entry for '{name}' to your catalog ({settings.catalog_path})",
                )
            )
    return problems


class Runtime:
    def __init__(
        self,
        settings: Settings | None = None,
        catalog: Catalog | None = None,
        *,
        factory: GeneratorFactory = llama_generator,
    ) -> None:
        self.settings = settings or load_settings()
        self.catalog = catalog or load_catalog(self.settings.catalog_path)
        self.pool = Pool(self.catalog, self.settings, factory)
        self.limits = Limits(self.settings)
        self.publishing = False  # `serve` turns this on: its status is what `ps` shows
        self.status_served = False
        """A daemon serves its status live (`ps` asks it), so its status file is rewritten
        only when models load or unload, not after every request (~1 ms each)."""
        self.started = time.time()
        self.audit = AuditLog.from_settings(self.settings) if self.settings.audit else None
        self._check_settings()

    def _check_settings(self) -> None:
        """Model names in the settings must exist in the catalog (the first one that does not
        is raised; `localsample doctor` lists them all)."""
        problems = unknown_model_names(self.settings, self.catalog)
        if problems:
            raise problems[0]

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
            why_unavailable=self.pool.why_unavailable,
            policy=ServerPolicy(pin=policy.model, allow=tuple(policy.allow_models)),
            server=server,
        )

    async def complete(self, choice: Choice, request: GenerationRequest, on_text: OnText | None = None) -> Completion:
        """Generate with the chosen model, no policy applied (``answer`` applies it)."""
        log.debug("model %s: %s", choice.model.id, choice.reason)
        try:
            async with self.pool.use(choice.model) as generator:
                return await generator.generate(request, on_text, queue_timeout=self.settings.queue_timeout)
        finally:
            if not self.status_served:
                self.publish_status()

    # -- the request pipeline ------------------------------------------------------------

    async def answer(
        self,
        request: GenerationRequest,
        origin: Origin,
        *,
        prefs: Preferences | None = None,
        model: str | None = None,
        ask: Asker | None = None,
        on_text: OnText | None = None,
        choice: Choice | None = None,
    ) -> Answer:
        """Select, check limits, ask approval, generate, review; one audit record whatever
        happens. ``model`` names a catalog id or alias explicitly, ``choice`` a selection
        made before (the agent keeps one model for a conversation); ``ask`` is the way to
        ask a person in the caller's context (used when the server's settings say so)."""
        record = AuditRecord(origin.server, origin.request_id, origin.protocol, origin=origin.via)
        record.media = [f"{medium.kind} {medium.describe()}" for medium in request.media] or None
        try:
            chosen = choice or self.select(model=model, needs=needs_of(request), prefs=prefs, server=origin.server)
            answer = await self._answer(request, origin, chosen, ask, on_text, record)
            record.decision = record.decision or "approved"
            return answer
        except LocalsampleError as exc:
            record.decision, record.error = decision_of(exc), exc.one_line()
            raise
        except anyio.get_cancelled_exc_class():
            record.decision = "cancelled"
            raise
        except Exception as exc:
            record.decision, record.error = "error", str(exc)
            raise
        finally:
            self.record(record)

    async def _answer(
        self,
        request: GenerationRequest,
        origin: Origin,
        choice: Choice,
        ask: Asker | None,
        on_text: OnText | None,
        record: AuditRecord,
    ) -> Answer:
        started = time.perf_counter()
        server = origin.server
        record.model, record.reason = choice.model.id, choice.reason
        request = self.limits.check(server, request)
        pending = Pending(server, choice.model.id, choice.reason, request)
        approver = choose_approver(self.settings, server, ask)
        decision = await self._timed(server, approver.approve(pending))
        if decision is None:
            timeout = self.settings.server(server).ask_timeout
            decision = Decision(False, "timeout", f"no answer within {timeout:g} s (ask_timeout)")
        record.by = decision.by
        if not decision.approved:
            raise RejectedError(
                f"sampling request rejected by the {decision.by}: {decision.reason}",
                "ask the user, or change the server's approve setting",
            )
        record.decision = "approved"
        request = decision.request or request
        include_text = self.audit is not None and self.audit.include_text
        if include_text:
            record.system = request.system
            record.messages = [
                [m.role, "\n".join([m.shown(), *map(call_line, m.tool_calls)])] for m in request.messages
            ]
        completion = await self.complete(choice, request, on_text)
        self.limits.record_tokens(server, completion.completion_tokens)
        record.prompt_tokens = completion.prompt_tokens
        record.completion_tokens = completion.completion_tokens
        record.time_to_first_token = round(completion.time_to_first_token, 4)
        record.duration = round(completion.duration, 4)
        record.stop_reason = completion.stop_reason
        record.endpoint = completion.engine
        if self.settings.server(server).review_response and decision.human:
            reviewed = await self._timed(server, approver.review(pending, shown_response(completion)))
            if reviewed is None:
                record.by = f"{decision.by} (response rejected)"
                record.decision = None
                raise RejectedError(f"the {decision.by} rejected the response", "ask the user")
            if not completion.tool_calls:
                completion = dataclasses.replace(completion, text=reviewed)
        record.tools_called = [c.name for c in completion.tool_calls] or None
        if include_text:
            record.response = shown_response(completion)
        log.info(
            "%s: request %s answered by %s (%s): %d+%d tokens, %s, %.2fs",
            server,
            origin.request_id,
            completion.model,
            choice.reason,
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.stop_reason,
            time.perf_counter() - started,
        )
        return Answer(completion, choice.reason)

    async def _timed(self, server: str, pending: Awaitable[T]) -> T | None:
        """``pending``'s result, or None after the server's ask_timeout."""
        with anyio.move_on_after(self.settings.server(server).ask_timeout):
            return await pending
        return None

    def record(self, record: AuditRecord) -> None:
        """Append to the audit trail (when on); a failure to write is logged, never fatal."""
        if self.audit is None:
            return
        try:
            self.audit.write(record)
        except OSError as exc:  # the trail must not take the daemon down
            log.error("audit trail not written (%s): %s", self.audit.path, exc)

    async def preload(self) -> None:
        """Load the preload models (default: the default model) so no request waits for it."""
        names = self.settings.preload if self.settings.preload is not None else [self.settings.default_model]
        for name in names:
            model = self.catalog.get(name)
            if not self.pool.available(model):
                log.warning("not preloading %s: not downloaded (localsample models pull %s)", model.id, model.id)
                continue
            await self.pool.load(model)
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
            private_dir(self.status_file.parent)
            payload = {"pid": os.getpid(), "started": self.started, "models": list(self.pool.status())}
            partial = self.status_file.with_suffix(".partial")
            partial.write_text(json.dumps(payload))
            partial.replace(self.status_file)
        except OSError as exc:
            log.debug("status for `ps` not written: %s", exc)

    async def aclose(self) -> None:
        """:meth:`close`, from the event loop: remote engines' connections (and an attached
        runtime's) are closed too."""
        await self.pool.aclose()
        self.close()

    def close(self) -> None:
        self.pool.close()
        if self.publishing:
            self.status_file.unlink(missing_ok=True)
