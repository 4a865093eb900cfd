"""Streamable HTTP downstreams that answer malformed JSON-RPC instead of dropping it.

The SDK's ``streamable_http_client`` speaks the transport (POST with JSON or SSE
responses, ``Mcp-Session-Id``, ``MCP-Protocol-Version``, the GET stream, resumption,
redirects within the origin, DELETE on close) and parses each body itself. A malformed
server→client message costs a traceback there and is dropped, so the server waits for a
reply that never comes; on a POST's event stream it also fails the request the stream
answers (a tool call dies because the server sent a bad sampling request in it).

:class:`HttpTransport` keeps the SDK's transport and checks every message before the SDK
sees it, through a public seam: the ``httpx2.AsyncClient`` the SDK is given has a response
hook (:class:`MessageCheck`) that puts a checking stream in front of each event-stream or
JSON body. Each message goes through :func:`localsample.messages.read_message`, as a
stdio server's lines do; a well-formed one passes on unchanged, and a malformed one:

- a request is answered as JSON-RPC 2.0 says (the same codes as for stdio, see
  ``transport.py``): the reply goes into the session's write stream, so the SDK POSTs it
  with the session's headers; the event is dropped (its SSE ``id`` is kept, for resumption);
- a response becomes a JSON-RPC error for the request it answers (on a POST's stream or
  JSON body, the request that POST carried), so the caller sees an error, not a hang;
- a notification is dropped.

Each costs one log line naming the server, and the connection stays open. Bytes that are
not UTF-8 are read as the SDK reads them (replaced), so they never reach the check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from typing import Any, Protocol

import anyio
import anyio.abc
import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage
from mcp_types import RequestId

from localsample.messages import read_message, usable_id
from localsample.transport import REPLY_TIMEOUT, GuardedTransport

log = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's own defaults: 30 s to connect and write, 300 s between reads of a held stream."""


class Replies(Protocol):
    """Where error replies go: the session's write stream (the SDK POSTs what it gets)."""

    async def send(self, item: SessionMessage, /) -> None: ...


class MessageCheck:
    """An ``httpx2`` response hook that checks every message in the bodies the SDK reads.

    ``answer`` gets each error reply to send to the server; it must not block.
    """

    def __init__(self, name: str, answer: Callable[[SessionMessage], None]) -> None:
        self.name = name
        self.answer = answer

    async def __call__(self, response: httpx2.Response) -> None:
        if not response.is_success:
            return  # redirects and error statuses: the SDK reads no messages from those bodies
        media_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type not in ("text/event-stream", "application/json"):
            return  # a 202 for a notification or response we sent, or a body the SDK refuses itself
        request = response.request
        pending = request_id(request) if request.method == "POST" else None
        if media_type == "text/event-stream" and (pending is not None or request.method == "GET"):
            source = detach(response, "text/event-stream; charset=utf-8")
            response.stream = Rewritten(self.events(source, pending), source)
        elif media_type == "application/json" and pending is not None:
            source = detach(response, response.headers["content-type"])
            response.stream = Rewritten(self.body(source, pending), source)

    async def events(self, source: httpx2.Response, pending: RequestId | None) -> AsyncGenerator[bytes]:
        """The event stream, each ``message`` event checked (see the module docstring)."""
        last_id = ""
        async for event in httpx2.EventSource(source):
            data: str | None = event.data
            if event.event == "message" and data:
                data = self.check_event(data, pending)
            if data is None:
                if event.id == last_id:
                    continue
                data = ""  # an event without a message still carries its id (the SDK reads it so)
            yield encode_event(event, data, last_id)
            last_id = event.id

    def check_event(self, data: str, pending: RequestId | None) -> str | None:
        """``data`` if it is a well-formed message, else what replaces it (``None``: nothing)."""
        verdict = read_message(data.encode())
        if isinstance(verdict, SessionMessage):
            return data
        if verdict.kind == "response" and pending is not None:
            verdict = replace(verdict, ident=pending)  # it answers the POST's request (the SDK reads it so)
        log.warning(verdict.log_line(self.name))
        if verdict.kind == "request":
            self.answer(verdict.reply())
        elif verdict.kind == "response" and verdict.ident is not None:
            return dump(verdict.failure(self.name))
        return None

    async def body(self, source: httpx2.Response, pending: RequestId) -> AsyncGenerator[bytes]:
        """A JSON body answering request ``pending``: passed on if well-formed, else an error for it."""
        content = await source.aread()
        verdict = read_message(content)
        if isinstance(verdict, SessionMessage):
            yield content
            return
        verdict = replace(verdict, ident=pending, kind="response")
        log.warning(verdict.log_line(self.name))
        yield dump(verdict.failure(self.name)).encode()


class Rewritten(httpx2.AsyncByteStream):
    """A response body replaced by ``chunks``, made from the original response ``source``."""

    def __init__(self, chunks: AsyncGenerator[bytes], source: httpx2.Response) -> None:
        self.chunks = chunks
        self.source = source

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        await self.chunks.aclose()
        await self.source.aclose()


def detach(response: httpx2.Response, content_type: str) -> httpx2.Response:
    """The response as it came (its body still to read, decoded as it says), while
    ``response`` is left to carry plain bytes of ``content_type``."""
    source = httpx2.Response(
        response.status_code, headers=response.headers.copy(), stream=response.stream, request=response.request
    )
    for header in ("content-encoding", "content-length"):
        response.headers.pop(header, None)
    response.headers["content-type"] = content_type
    return source


def request_id(request: httpx2.Request) -> RequestId | None:
    """The id of the JSON-RPC request a POST carries, if it carries one."""
    try:
        message = json.loads(request.content)
    except (httpx2.RequestNotRead, ValueError):
        return None
    if not isinstance(message, dict) or "method" not in message:
        return None
    ident = message.get("id")
    return ident if usable_id(ident) else None


def encode_event(event: httpx2.ServerSentEvent, data: str, last_id: str) -> bytes:
    """``event`` as SSE text, with ``data``; its id is written when it differs from ``last_id``."""
    lines = [] if event.event == "message" else [f"event: {event.event}"]
    if event.id != last_id:
        lines.append(f"id: {event.id}")
    if event.retry is not None:
        lines.append(f"retry: {event.retry}")
    lines.extend(f"data: {part}" for part in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def dump(message: SessionMessage) -> str:
    return message.message.model_dump_json(by_alias=True, exclude_unset=True)


class HttpTransport(GuardedTransport):
    """The SDK's Streamable HTTP transport to ``url``, every message checked first (see the
    module docstring), with a bounded connect. Used as the ``server`` of an ``mcp.Client``.
    Single use."""

    def __init__(self, url: str, *, name: str, connect_timeout: float | None = None) -> None:
        super().__init__(None, name=name, connect_timeout=connect_timeout)
        self.url = url
        self.replies: tuple[anyio.abc.TaskGroup, Replies] | None = None

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        check = MessageCheck(self.name, self.answer)
        http = httpx2.AsyncClient(timeout=HTTP_TIMEOUT, event_hooks={"response": [check]})
        async with anyio.create_task_group() as group:
            try:
                async with http, streamable_http_client(self.url, http_client=http) as (reads, writes):
                    self.replies = (group, writes)
                    yield reads, writes
            finally:
                self.replies = None
                group.cancel_scope.cancel()

    def answer(self, reply: SessionMessage) -> None:
        """Send ``reply`` to the server in the background (the stream being read must not wait)."""
        if self.replies is None:
            log.warning("server '%s': the connection is closed; dropped our error reply", self.name)
            return
        group, writes = self.replies
        group.start_soon(self.send_reply, writes, reply)

    async def send_reply(self, writes: Replies, reply: SessionMessage) -> None:
        with (
            anyio.move_on_after(REPLY_TIMEOUT) as scope,
            suppress(anyio.ClosedResourceError, anyio.BrokenResourceError),
        ):
            await writes.send(reply)
        if scope.cancelled_caught:
            log.warning("server '%s' did not take our error reply in time; dropped it", self.name)
