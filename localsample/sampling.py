"""The MCP boundary: ``sampling/createMessage`` params ⇄ the engine.

``SamplingHandler`` is the one sampling callback every connection uses, in both spec eras:
requests pushed by servers (≤ 2025-11-25) and requests carried in ``InputRequiredResult``
(2026-07-28), which the SDK's ``Client`` hands to the same callback. It validates the
request, picks the model, streams progress notifications when the request carries a
progress token, and answers with one text block. Every failure becomes an ``ErrorData``
(-32602 for a request we refuse, -32603 for an engine failure); the caller keeps serving.
A cancelled request raises out of the callback, so the SDK sends no response.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from mcp import types
from mcp.client.session import ClientRequestContext

from localsample.approval import HOST, TERMINAL, ElicitationApprover
from localsample.engine import ChatMessage, Completion, GenerationRequest, OnText
from localsample.errors import INTERNAL_ERROR, LocalsampleError, RequestError, UnsupportedContentError
from localsample.policy import Approver, AutoApprover, Decision, DenyApprover, Pending, RejectedError
from localsample.runtime import Runtime
from localsample.selection import Needs, Preferences, estimate_tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_INTERVAL = 0.1
"""Seconds between progress notifications for one request (at most ~10 a second)."""

METADATA_SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "seed": int,
    "repeat_penalty": (int, float),
}
"""``metadata`` keys passed on to llama.cpp's sampler; other keys are ignored (logged once)."""

Echo = Callable[[str], None]
"""Receives generated text as it streams (the `call` command shows it on a terminal)."""


def to_generation_request(params: types.CreateMessageRequestParams) -> GenerationRequest:
    """Validate a sampling request and map it onto the engine; RequestError names the field."""
    if params.tools or params.tool_choice is not None:
        raise UnsupportedContentError(
            "tools in sampling requests (params.tools / params.toolChoice) are not supported yet",
            "call without tools; localsample does not declare the sampling.tools capability",
        )
    if not params.messages:
        raise RequestError("params.messages is empty", "send at least one user message")
    if params.max_tokens <= 0:
        raise RequestError(f"params.maxTokens must be positive (got {params.max_tokens})", "send maxTokens >= 1")
    if params.temperature is not None and not 0.0 <= params.temperature <= 2.0:
        raise RequestError(
            f"params.temperature must be between 0 and 2 (got {params.temperature})", "send a temperature in 0..2"
        )
    messages = [ChatMessage(m.role, _text_of(m, i)) for i, m in enumerate(params.messages)]
    sampling = _metadata_sampling(params.metadata)
    stops = params.stop_sequences or []
    if any(not isinstance(s, str) for s in stops):
        raise RequestError("params.stopSequences must be a list of strings", "send stopSequences as strings")
    return GenerationRequest(
        messages=messages,
        max_tokens=params.max_tokens,
        system=params.system_prompt or None,
        stop=tuple(stops),
        temperature=params.temperature,
        **sampling,
    )


def _text_of(message: types.SamplingMessage, index: int) -> str:
    blocks = message.content if isinstance(message.content, list) else [message.content]
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, types.TextContent):
            texts.append(block.text)
        else:
            kind = getattr(block, "type", type(block).__name__)
            raise UnsupportedContentError(
                f"params.messages[{index}] has {kind} content, which is not supported yet "
                "(localsample serves text-only models for now)",
                "send text content only",
            )
    return "".join(texts)


_warned_metadata: set[str] = set()


def _metadata_sampling(metadata: dict[str, Any] | None) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        expected = METADATA_SAMPLING_KEYS.get(key)
        if expected is None:
            if key not in _warned_metadata:
                _warned_metadata.add(key)
                log.info("ignoring metadata key %r (used: %s)", key, ", ".join(METADATA_SAMPLING_KEYS))
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            raise RequestError(f"params.metadata.{key} must be a number (got {value!r})", f"send a numeric {key}")
        chosen[key] = value
    return chosen


def preferences_of(params: types.CreateMessageRequestParams) -> Preferences:
    prefs = params.model_preferences
    if prefs is None:
        return Preferences()
    return Preferences(
        hints=tuple(h.name for h in prefs.hints or () if h.name),
        cost=prefs.cost_priority,
        speed=prefs.speed_priority,
        intelligence=prefs.intelligence_priority,
    )


def needs_of(request: GenerationRequest) -> Needs:
    chars = sum(len(m.content) for m in request.messages) + len(request.system or "")
    return Needs(prompt_tokens=estimate_tokens(chars, len(request.messages)), max_tokens=request.max_tokens)


def to_result(completion: Completion) -> types.CreateMessageResult:
    """One text block (what 1.x servers validate), the model that ran, the exact stop reason."""
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text=completion.text),
        model=completion.model,
        stop_reason=completion.stop_reason,
    )


class _Progress:
    """Sends progress notifications for one request: tokens so far, maxTokens, the text."""

    def __init__(self, ctx: ClientRequestContext, token: str | int, total: int) -> None:
        self.ctx = ctx
        self.token = token
        self.total = total
        self.text = ""
        self.last = 0.0
        self.broken = False

    async def __call__(self, text: str, tokens: int) -> None:
        self.text += text
        now = time.monotonic()
        if self.broken or now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        try:
            await self.ctx.session.send_progress_notification(self.token, tokens, self.total, self.text)
        except Exception as exc:  # a closed stream must not fail the generation itself
            self.broken = True
            log.debug("progress for %s not sent: %s", self.token, exc)


class SamplingHandler:
    """The sampling callback: ``await handler(ctx, params)`` → result or ``ErrorData``.

    ``ask`` is the way to ask a human in this context (the terminal for `call`, the host's
    elicitation for `serve`); the server's settings decide whether it is used.
    """

    def __init__(
        self, runtime: Runtime, *, server: str = "server", echo: Echo | None = None, ask: Approver | None = None
    ) -> None:
        self.runtime = runtime
        self.server = server
        self.echo = echo
        self.ask = ask

    def approver(self) -> Approver:
        policy = self.runtime.settings.server(self.server)
        key = f"servers.{self.server}" if self.server in self.runtime.settings.servers else 'servers."*"'
        if policy.approve == "auto":
            return AutoApprover()
        if policy.approve == "deny":
            return DenyApprover(f"approve = deny for server '{self.server}' ({key}.approve)")
        if self.ask is not None and self.ask.available():
            return self.ask
        where = "the host does not support elicitation" if isinstance(self.ask, ElicitationApprover) else (
            "there is no terminal"
        )
        log.warning("%s: approve = ask, but %s: %s.ask_fallback = %s", self.server, where, key, policy.ask_fallback)
        if policy.ask_fallback == "auto":
            return AutoApprover()
        return DenyApprover(f"approve = ask, but {where} to ask on ({key}.ask_fallback = deny)")

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.ErrorData:
        ctx = context
        protocol = getattr(ctx.session, "protocol_version", None)
        try:
            request = to_generation_request(params)
            prefs = preferences_of(params)
        except LocalsampleError as exc:
            record = {"server": self.server, "request_id": str(ctx.request_id), "protocol": protocol}
            self._audit(record | {"decision": "error", "error": exc.one_line()})
            return self._error(ctx.request_id, exc)
        if params.include_context not in (None, "none"):
            log.info("%s: includeContext=%s treated as none", self.server, params.include_context)
        token = ctx.meta.get("progress_token") if ctx.meta else None
        progress = _Progress(ctx, token, request.max_tokens) if token is not None else None
        try:
            completion, _ = await self.run(
                request, prefs, request_id=str(ctx.request_id), protocol=protocol, on_text=progress
            )
        except LocalsampleError as exc:
            return self._error(ctx.request_id, exc)
        except Exception as exc:
            log.exception("%s: sampling request %s failed", self.server, ctx.request_id)
            return types.ErrorData(code=INTERNAL_ERROR, message=f"localsample failed to generate: {exc}")
        return to_result(completion)

    def _error(self, request_id: object, exc: LocalsampleError) -> types.ErrorData:
        log.warning("%s: sampling request %s refused: %s", self.server, request_id, exc.one_line())
        return types.ErrorData(code=exc.mcp_code, message=exc.one_line())

    async def run(
        self,
        request: GenerationRequest,
        prefs: Preferences,
        *,
        request_id: str,
        protocol: str | None = None,
        on_text: OnText | None = None,
        model: str | None = None,
    ) -> tuple[Completion, str]:
        """Select, check limits, ask approval, generate, review; one audit line whatever happens.
        Returns the completion and why its model was chosen."""
        record: dict[str, Any] = {"server": self.server, "request_id": request_id, "protocol": protocol}
        try:
            completion = await self._answer(request, prefs, record, on_text, model)
            record["decision"] = record.get("decision") or "approved"
            return completion, str(record["reason"])
        except LocalsampleError as exc:
            record.setdefault("decision", "rejected" if exc.mcp_code == -1 else "error")
            record["error"] = exc.one_line()
            raise
        except anyio.get_cancelled_exc_class():
            record["decision"] = "cancelled"
            raise
        except Exception as exc:
            record["decision"], record["error"] = "error", str(exc)
            raise
        finally:
            self._audit(record)

    async def _answer(
        self,
        request: GenerationRequest,
        prefs: Preferences,
        record: dict[str, Any],
        on_progress: OnText | None,
        model: str | None,
    ) -> Completion:
        started = time.perf_counter()
        choice = self.runtime.select(model=model, needs=needs_of(request), prefs=prefs, server=self.server)
        record |= {"model": choice.model.id, "reason": choice.reason}
        request = self.runtime.limits.check(self.server, request)
        pending = Pending(self.server, choice.model.id, choice.reason, request)
        decision = await self._decide(pending)
        record |= {"decision": "approved" if decision.approved else "rejected", "by": decision.by}
        if not decision.approved:
            raise RejectedError(
                f"sampling request rejected by the {decision.by}: {decision.reason}",
                "ask the user, or change the server's approve setting",
            )
        request = decision.request or request
        if self.runtime.audit is not None and self.runtime.audit.include_text:
            record |= {"system": request.system, "messages": [[m.role, m.content] for m in request.messages]}
        echo = self.echo

        async def on_text(text: str, tokens: int) -> None:
            if echo is not None:
                echo(text)
            if on_progress is not None:
                await on_progress(text, tokens)

        wants_text = on_progress is not None or echo is not None
        completion = await self.runtime.complete(choice, request, on_text if wants_text else None)
        self.runtime.limits.record_tokens(self.server, completion.completion_tokens)
        record |= {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "time_to_first_token": round(completion.time_to_first_token, 4),
            "duration": round(completion.duration, 4),
            "stop_reason": completion.stop_reason,
        }
        if self.runtime.settings.server(self.server).review_response and decision.by in (TERMINAL, HOST):
            reviewed = await self._timed(self.approver().review(pending, completion.text))
            if reviewed is None:
                record["by"] = f"{decision.by} (response rejected)"
                raise RejectedError(f"the {decision.by} rejected the response", "ask the user")
            completion = dataclasses.replace(completion, text=reviewed)
        if self.runtime.audit is not None and self.runtime.audit.include_text:
            record["response"] = completion.text
        log.info(
            "%s: request %s answered by %s (%s): %d+%d tokens, %s, %.2fs",
            self.server, record["request_id"], completion.model, choice.reason, completion.prompt_tokens,
            completion.completion_tokens, completion.stop_reason, time.perf_counter() - started,
        )
        return completion

    async def _decide(self, pending: Pending) -> Decision:
        approver = self.approver()
        decision = await self._timed(approver.approve(pending))
        if decision is None:
            timeout = self.runtime.settings.server(self.server).ask_timeout
            return Decision(False, "timeout", f"no answer within {timeout:g} s (ask_timeout)")
        return decision

    async def _timed(self, pending: Awaitable[T]) -> T | None:
        timeout = self.runtime.settings.server(self.server).ask_timeout
        with anyio.move_on_after(timeout):
            return await pending
        return None

    def _audit(self, record: dict[str, Any]) -> None:
        if self.runtime.audit is None:
            return
        try:
            self.runtime.audit.write(record)
        except OSError as exc:  # the trail must not take the daemon down
            log.error("audit trail not written (%s): %s", self.runtime.audit.path, exc)
