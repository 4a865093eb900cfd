"""The MCP boundary: ``sampling/createMessage`` params ⇄ the library's request pipeline.

``SamplingHandler`` is the one sampling callback every connection uses, in both spec eras:
requests pushed by servers (≤ 2025-11-25) and requests carried in ``InputRequiredResult``
(2026-07-28), which the SDK's ``Client`` hands to the same callback. It validates and maps
the request, hands it to ``Runtime.answer`` (selection, limits, approval, generation,
review, audit), streams progress notifications when the request carries a progress
token, and answers with one text block. Every failure becomes an ``ErrorData`` (-32602
for a request we refuse, -32603 for an engine failure); the caller keeps serving. A
cancelled request raises out of the callback, so the SDK sends no response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mcp import types
from mcp.client.session import ClientRequestContext
from pydantic import ValidationError

from localsample.audit import AuditRecord
from localsample.catalog import SamplingDefaults
from localsample.errors import (
    INTERNAL_ERROR,
    LocalsampleError,
    ModelFileError,
    RequestError,
    UnsupportedContentError,
)
from localsample.generation import ChatMessage, Completion, GenerationRequest
from localsample.policy import Asker
from localsample.runtime import Origin, Runtime
from localsample.selection import Preferences

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.1
"""Seconds between progress notifications for one request (at most ~10 a second)."""

METADATA_SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "seed": int,
    "repeat_penalty": (int, float),
}
"""``metadata`` keys passed on to llama.cpp's sampler (in the catalog's ranges, see
``SamplingDefaults``); other keys are ignored (logged once)."""

MAX_STOP_SEQUENCES = 32
"""Most stop sequences one request may send: each is matched against every new piece of
text, so an unbounded list would slow every request that shares the model."""

MAX_STOP_LENGTH = 256
"""Most characters in one stop sequence."""

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
    stops = _stop_sequences(params.stop_sequences)
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


def _stop_sequences(stops: list[str] | None) -> list[str]:
    stops = stops or []
    if any(not isinstance(s, str) for s in stops):
        raise RequestError("params.stopSequences must be a list of strings", "send stopSequences as strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"params.stopSequences has {len(stops)} entries; at most {MAX_STOP_SEQUENCES} are accepted",
            f"send at most {MAX_STOP_SEQUENCES} stop sequences",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_LENGTH:
        raise RequestError(
            f"params.stopSequences has an entry of {longest} characters; at most {MAX_STOP_LENGTH} are accepted",
            f"send stop sequences of at most {MAX_STOP_LENGTH} characters",
        )
    return stops


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
    try:
        SamplingDefaults(**chosen)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        raise RequestError(
            f"params.metadata.{key} is out of range: {error['msg'].lower()} (got {chosen[key]!r})",
            f"send {key} within its range, or leave it out to use the model's default",
        ) from None
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


def to_result(completion: Completion) -> types.CreateMessageResult:
    """One text block (what 1.x servers validate), the model that ran, the exact stop reason."""
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text=completion.text),
        model=completion.model,
        stop_reason=completion.stop_reason,
    )


class Progress:
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

    ``ask`` is the way to ask a person in this context (the terminal for `call`, the
    host's elicitation for `serve`); the server's settings decide whether it is used.
    ``echo`` receives the generated text as it streams (`call` shows it on a terminal).
    """

    def __init__(
        self, runtime: Runtime, *, server: str = "server", echo: Echo | None = None, ask: Asker | None = None
    ) -> None:
        self.runtime = runtime
        self.server = server
        self.echo = echo
        self.ask = ask

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.ErrorData:
        ctx = context
        origin = Origin(self.server, str(ctx.request_id), getattr(ctx.session, "protocol_version", None))
        try:
            request = to_generation_request(params)
            prefs = preferences_of(params)
        except LocalsampleError as exc:
            refused = AuditRecord(origin.server, origin.request_id, origin.protocol)
            refused.decision, refused.error = "error", exc.one_line()
            self.runtime.record(refused)
            return self._error(ctx.request_id, exc)
        if params.include_context not in (None, "none"):
            log.info("%s: includeContext=%s treated as none", self.server, params.include_context)
        token = ctx.meta.get("progress_token") if ctx.meta else None
        progress = Progress(ctx, token, request.max_tokens) if token is not None else None
        echo = self.echo

        async def on_text(text: str, tokens: int) -> None:
            if echo is not None:
                echo(text)
            if progress is not None:
                await progress(text, tokens)

        wants_text = progress is not None or echo is not None
        try:
            answer = await self.runtime.answer(
                request, origin, prefs=prefs, ask=self.ask, on_text=on_text if wants_text else None
            )
        except LocalsampleError as exc:
            return self._error(ctx.request_id, exc)
        except Exception as exc:
            log.exception("%s: sampling request %s failed", self.server, ctx.request_id)
            return types.ErrorData(code=INTERNAL_ERROR, message=f"localsample failed to generate: {exc}")
        return to_result(answer.completion)

    def _error(self, request_id: object, exc: LocalsampleError) -> types.ErrorData:
        log.warning("%s: sampling request %s refused: %s", self.server, request_id, exc.one_line())
        return types.ErrorData(code=exc.mcp_code, message=for_server(exc))


def for_server(exc: LocalsampleError) -> str:
    """The message a server receives: the error's own, except for a local model file the
    server has no business seeing the path (or contents) of; the full message is logged."""
    if isinstance(exc, ModelFileError):
        return (
            "the local model chosen for this request could not be loaded on this machine "
            "(fix: its user can run `localsample doctor` to see why)"
        )
    return exc.one_line()
