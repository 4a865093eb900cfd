"""A local OpenAI-compatible HTTP API over a ``Runtime`` (a Starlette ASGI app).

``GET /v1/models`` lists the catalog; ``POST /v1/chat/completions`` answers, streamed
(server-sent events, ``data: [DONE]`` last) or not. Requests and responses have OpenAI's
shapes (openai_map.py maps them, with the ``openai`` package's own response types); every
request goes through ``Runtime.answer``, so selection, limits, approval and the audit
trail are the same as for MCP sampling. The requester is a "server" in the settings'
sense: ``[servers.NAME]`` with NAME from the ``X-Localsample-Client`` header, else
``openai``. Nobody can be asked over HTTP: ``approve = ask`` falls back to ``ask_fallback``.

``model`` is a catalog id or alias, else a hint matched as an MCP server's would be (so
``gpt-4o-mini`` in unchanged client code reaches the local model its alias maps to); a
name that matches no catalog entry is 404 ``model_not_found``. A response's ``model`` is
the local id that answered.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the
message names the fix: a bad body or field is 400, an unknown model 404, a rejection 403,
a rate limit 429, a busy model 503 (capacity, not the client's quota: retry), anything
else 500, never with a traceback or a local path. A client that disconnects cancels its
generation. ``localsample daemon`` serves this app (daemon.py); ``OpenAIServer.stop``
cancels what is in flight when it stops.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import anyio
from openai.types import Model
from openai.types.shared import ErrorObject
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from localsample.attach_api import (
    Asks,
    ClientAsker,
    EventStream,
    Extension,
    SendEvent,
    answer_event,
    choice_of,
    error_event,
    event,
)
from localsample.audit import AuditRecord
from localsample.catalog import ModelEntry
from localsample.daemon_socket import ASK_PATH
from localsample.errors import (
    BusyError,
    ContextOverflowError,
    LocalsampleError,
    RateLimitError,
    RejectedError,
    RequestError,
    UnknownModelError,
)
from localsample.generation import GenerationRequest
from localsample.openai_content import InvalidField
from localsample.openai_map import (
    DEFAULT_MAX_TOKENS,
    ChatRequest,
    Chunks,
    chat_completion,
    parse_chat,
    to_generation_request,
)
from localsample.runtime import Answer, Origin, Runtime, decision_of, needs_of
from localsample.sampling import for_server
from localsample.selection import Choice, Preferences, hint_matches

log = logging.getLogger(__name__)

__all__ = ["CLIENT_HEADER", "DEFAULT_CLIENT", "MAX_BODY_BYTES", "OpenAIServer", "openai_app"]

CLIENT_HEADER = "X-Localsample-Client"
"""Names the requester (its ``[servers.NAME]`` settings, its audit records): 1 to 64 of
``A-Z a-z 0-9 . _ -``."""
DEFAULT_CLIENT = "openai"
CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_BODY_BYTES = 8 << 20
"""Largest request body read (a conversation of a few hundred pages)."""
VIA = "openai"
"""The audit records' ``origin`` for requests over this API."""
JSON = "application/json"
Outcome = Answer | LocalsampleError | None
"""What a generation came to: an answer, an error, or None when the client went away."""


def status_of(exc: LocalsampleError) -> tuple[int, str, str | None]:
    """The HTTP status, OpenAI error ``type`` and ``code`` for an error."""
    if isinstance(exc, UnknownModelError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, ContextOverflowError):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, RequestError):
        return 400, "invalid_request_error", None
    if isinstance(exc, RateLimitError):
        return 429, "rate_limit_error", "rate_limit_exceeded"
    if isinstance(exc, RejectedError):
        return 403, "permission_error", "rejected"
    if isinstance(exc, BusyError):
        return 503, "server_error", "server_busy"
    return 500, "server_error", None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> str:
    error = ErrorObject(message=message, type=kind, param=param, code=code)
    return '{"error": ' + error.model_dump_json(exclude_unset=True) + "}"


def error_response(exc: LocalsampleError) -> Response:
    status, kind, code = status_of(exc)
    param = exc.param if isinstance(exc, InvalidField) else None
    headers = {"Retry-After": "1"} if status == 503 else None
    return Response(error_body(for_server(exc), kind, param, code), status, headers, JSON)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    message = f"{request.method} {request.url.path}: {detail}"
    return Response(error_body(message, "invalid_request_error"), status, None, JSON)


def client_of(headers: Headers) -> str:
    """The requester's name: the X-Localsample-Client header, else ``openai``."""
    value = headers.get(CLIENT_HEADER)
    if value is None:
        return DEFAULT_CLIENT
    if not CLIENT_NAME.fullmatch(value):
        raise InvalidField(
            CLIENT_HEADER,
            f"header {CLIENT_HEADER} must be 1 to 64 letters, digits, '.', '_' or '-' (got {value[:80]!r})",
            f"send a short name such as 'my-app', or leave {CLIENT_HEADER} out",
        )
    return value


async def read_body(request: Request) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise InvalidField(None, f"the request body is over {MAX_BODY_BYTES} bytes", "send a shorter conversation")
        parts.append(part)
    return b"".join(parts)


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` when the client goes away (the request body was read before)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class OpenAIServer:
    """The API's endpoints over one runtime; :meth:`app` builds an ASGI app of them (one per
    listener, sharing the requests in flight)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.asks = Asks()
        self.in_flight: set[anyio.CancelScope] = set()
        self.stopping = False
        self.open_requests = 0  # HTTP requests whose response is not fully sent yet

    def app(self, routes: Sequence[BaseRoute] = ()) -> ASGIApp:
        """The API, plus ``routes`` of the caller's (the daemon's own, on its Unix socket)."""
        api = Starlette(
            routes=[
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{name:path}", self.get_model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route(ASK_PATH, self.asks.answer, methods=["POST"]),
                *routes,
            ],
            exception_handlers={HTTPException: http_error},
        )

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            self.open_requests += scope["type"] == "http"
            try:
                await api(scope, receive, send)
            finally:
                self.open_requests -= scope["type"] == "http"

        return counted

    async def drained(self) -> None:
        """Return once every response has been sent whole (after :meth:`stop`, the cancelled
        ones end with their error event); the caller bounds the wait."""
        while self.open_requests:
            await anyio.sleep(0.02)

    def stop(self) -> None:
        """Refuse new requests (503) and cancel those in flight (they get 503 too)."""
        self.stopping = True
        for scope in list(self.in_flight):
            scope.cancel()

    # -- models ------------------------------------------------------------------------

    def model_object(self, entry: ModelEntry) -> Model:
        return Model(
            id=entry.id,
            object="model",
            created=int(self.runtime.started),
            owned_by="localsample",
            aliases=list(entry.aliases),
            downloaded=self.runtime.pool.available(entry),
        )

    async def list_models(self, request: Request) -> Response:
        data = ",".join(self.model_object(m).model_dump_json(exclude_unset=True) for m in self.runtime.catalog)
        return Response('{"object": "list", "data": [' + data + "]}", media_type=JSON)

    async def get_model(self, request: Request) -> Response:
        try:
            entry = self.runtime.catalog.get(request.path_params["name"])
        except UnknownModelError as exc:
            return error_response(exc)
        return Response(self.model_object(entry).model_dump_json(exclude_unset=True), media_type=JSON)

    def choose(self, name: str, request: GenerationRequest, client: str) -> Choice:
        """The model for ``name``: a catalog id or alias, else a hint (as MCP servers send),
        selected as for the client's own settings; UnknownModelError if nothing matches."""
        catalog, runtime = self.runtime.catalog, self.runtime
        try:
            entry = catalog.get(name)
        except UnknownModelError:
            if not any(hint_matches(name, m) for m in catalog):
                raise UnknownModelError(
                    f"no local model matches '{name}' (known: {', '.join(catalog.ids())})",
                    "use a model id that GET /v1/models lists, or add a catalog entry or alias for this name",
                ) from None
            return runtime.select(needs=needs_of(request), prefs=Preferences(hints=(name,)), server=client)
        if not runtime.pool.available(entry):
            raise UnknownModelError(
                f"model '{entry.id}' is in the catalog but not downloaded (downloaded: "
                f"{', '.join(m.id for m in catalog if runtime.pool.available(m)) or 'none'})",
                f"run `localsample models pull {entry.id}` where localsample runs, or use a downloaded model",
            )
        policy = runtime.settings.server(client)
        if policy.model is not None or policy.allow_models:
            # The client's pin and allow-list bind it: the name is then a wish, as a hint is.
            return runtime.select(needs=needs_of(request), prefs=Preferences(hints=(entry.id,)), server=client)
        return runtime.select(model=name, server=client)

    # -- chat completions --------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        client = DEFAULT_CLIENT
        try:
            client = client_of(request.headers)
            if self.stopping:
                raise BusyError("localsample is stopping", "retry once it runs again")
            chat = parse_chat(await read_body(request))
            if chat.localsample is not None:
                return self.attached(chat)
            cap = self.runtime.settings.server(client).max_tokens
            generation = to_generation_request(chat, default_max_tokens=cap or DEFAULT_MAX_TOKENS)
            choice = self.choose(chat.model, generation, client)
        except LocalsampleError as exc:
            self.refused(client, request_id, exc)
            return error_response(exc)
        origin = Origin(server=client, request_id=request_id, via=VIA)
        if chat.stream:
            return ChatStream(
                self, generation, origin, choice, Chunks(request_id, int(time.time()), chat.include_usage)
            )
        outcome = await self.generate(
            request.receive, origin, lambda: self.runtime.answer(generation, origin, choice=choice)
        )
        if isinstance(outcome, Answer):
            body = chat_completion(request_id, int(time.time()), outcome.completion)
            return Response(body.model_dump_json(exclude_unset=True), media_type=JSON)
        return error_response(outcome or RequestError("the client disconnected"))

    def refused(self, client: str, request_id: str, exc: LocalsampleError) -> None:
        """Audit a request refused before it reached the pipeline (which audits the rest)."""
        log.warning("%s: request %s refused: %s", client, request_id, exc.one_line())
        record = AuditRecord(client, request_id, None, origin=VIA)
        record.decision, record.error = decision_of(exc), exc.one_line()
        self.runtime.record(record)

    def attached(self, chat: ChatRequest) -> Response:
        """A request of an attached client (its ``localsample`` block: attach_api.py)."""
        try:
            extension = Extension.parse(chat.localsample)
        except LocalsampleError as exc:
            failed = exc

            async def refuse(_receive: Receive, send: SendEvent) -> None:
                await send(error_event(failed))

            return EventStream(refuse)
        origin = extension.origin()

        async def produce(receive: Receive, send: SendEvent) -> None:
            try:
                cap = self.runtime.settings.server(origin.server).max_tokens
                generation = to_generation_request(chat, default_max_tokens=cap or DEFAULT_MAX_TOKENS)
                choice = choice_of(extension, self.runtime.catalog)
            except LocalsampleError as exc:
                self.refused(origin.server, origin.request_id, exc)
                await send(error_event(exc))
                return

            async def on_text(text: str, tokens: int) -> None:
                await send(event(text=text, tokens=tokens))

            ask = ClientAsker(self.asks, send) if extension.ask else None
            outcome = await self.generate(
                receive,
                origin,
                lambda: self.runtime.answer(
                    generation,
                    origin,
                    prefs=extension.preferences(),
                    model=extension.model,
                    choice=choice,
                    ask=ask,
                    on_text=on_text if extension.text else None,
                ),
            )
            if isinstance(outcome, Answer):
                await send(answer_event(outcome))
            elif outcome is not None:
                await send(error_event(outcome))

        return EventStream(produce)

    async def generate(self, receive: Receive, origin: Origin, answer: Callable[[], Awaitable[Answer]]) -> Outcome:
        """Run the pipeline (``answer``) until it answers, fails (:meth:`stop` too is an error:
        busy), or the client disconnects (None)."""
        outcome: Outcome = None
        async with anyio.create_task_group() as group:
            self.in_flight.add(group.cancel_scope)
            try:
                if self.stopping:
                    group.cancel_scope.cancel()
                group.start_soon(cancel_on_disconnect, receive, group.cancel_scope)
                try:
                    outcome = await answer()
                except LocalsampleError as exc:
                    outcome = exc
                except Exception:
                    log.exception("%s: request %s failed", origin.server, origin.request_id)
                    outcome = LocalsampleError("localsample failed to generate", "its log has the details")
                group.cancel_scope.cancel()
            finally:
                self.in_flight.discard(group.cancel_scope)
        if outcome is None and self.stopping:
            return BusyError("localsample stopped while generating this answer", "retry once it runs again")
        return outcome


class EventSender:
    """Server-sent events on an ASGI ``send``, the response started by the first event."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.broken = False

    async def event(self, data: str) -> None:
        if self.broken:
            return
        try:
            if not self.started:
                self.started = True
                headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
                await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self.send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
        except OSError:  # the client is gone: the disconnect watcher cancels the generation
            self.broken = True

    async def end(self) -> None:
        if self.started and not self.broken:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class ChatStream(Response):
    """A streamed answer: a chunk per piece of text (tool calls, whole, at the end), the
    finish chunk, usage if asked for, ``[DONE]``. An error before the first chunk is an
    ordinary error response with its status; one after it, an ``error`` event."""

    def __init__(
        self, server: OpenAIServer, request: GenerationRequest, origin: Origin, choice: Choice, chunks: Chunks
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self.server = server
        self.request = request
        self.origin = origin
        self.choice = choice
        self.chunks = chunks
        chunks.model = choice.model.id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = EventSender(send)
        chunks = self.chunks

        async def on_text(text: str, _tokens: int) -> None:
            if not events.started:
                await events.event(chunks.role())
            await events.event(chunks.text(text))

        # With tools offered, the text may hold a call's raw form: it is sent, parsed, at the end.
        streamed = None if self.request.offers_tools else on_text
        server, request, origin, choice = self.server, self.request, self.origin, self.choice
        outcome = await server.generate(
            receive, origin, lambda: server.runtime.answer(request, origin, choice=choice, on_text=streamed)
        )
        if outcome is None:  # the client went away: nobody to tell
            return
        if isinstance(outcome, LocalsampleError):
            if not events.started:
                await error_response(outcome)(scope, receive, send)
                return
            _status, kind, code = status_of(outcome)
            await events.event(error_body(for_server(outcome), kind, None, code))
        else:
            completion = outcome.completion
            if not events.started:
                await events.event(chunks.role())
            if streamed is None and completion.text:
                await events.event(chunks.text(completion.text))
            if completion.tool_calls:
                await events.event(chunks.tool_calls(completion))
            await events.event(chunks.finish(completion))
            if chunks.include_usage:
                await events.event(chunks.usage(completion))
        await events.event("[DONE]")
        await events.end()


def openai_app(runtime: Runtime) -> ASGIApp:
    """The API over ``runtime`` as one ASGI app (for a caller that never stops it early)."""
    return OpenAIServer(runtime).app()
