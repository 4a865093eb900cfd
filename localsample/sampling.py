"""The MCP boundary: ``sampling/createMessage`` params ⇄ the library's request pipeline.

``SamplingHandler`` is the one sampling callback every connection uses, in both spec eras:
requests pushed by servers (≤ 2025-11-25) and requests carried in ``InputRequiredResult``
(2026-07-28), which the SDK's ``Client`` hands to the same callback. It validates and maps
the request, hands it to ``Runtime.answer`` (selection, limits, approval, generation,
review, audit), streams progress notifications when the request carries a progress
token, and answers with one text block, or a list holding the model's tool calls
(sampling_map.py). Every failure becomes an ``ErrorData`` (-32602 for a request we
refuse, -32603 for an engine failure); the caller keeps serving. A cancelled request
raises out of the callback, so the SDK sends no response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mcp import types
from mcp.client.session import ClientRequestContext

from localsample.audit import AuditRecord
from localsample.errors import (
    INTERNAL_ERROR,
    LocalsampleError,
    ModelFileError,
)
from localsample.policy import Asker
from localsample.runtime import Origin, Runtime
from localsample.sampling_map import preferences_of, to_generation_request, to_result

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.1
"""Seconds between progress notifications for one request (at most ~10 a second)."""

Echo = Callable[[str], None]
"""Receives generated text as it streams (the `call` command shows it on a terminal)."""


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
        self,
        runtime: Runtime,
        *,
        server: str = "server",
        echo: Echo | None = None,
        ask: Asker | None = None,
        via: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.server = server
        self.echo = echo
        self.ask = ask
        self.via = via

    async def __call__(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        ctx = context
        origin = Origin(self.server, str(ctx.request_id), getattr(ctx.session, "protocol_version", None), self.via)
        try:
            request = to_generation_request(params)
            prefs = preferences_of(params)
        except LocalsampleError as exc:
            refused = AuditRecord(origin.server, origin.request_id, origin.protocol, origin=origin.via)
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
