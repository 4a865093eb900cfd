"""The daemon's side of attached clients: `serve`, `call`, `sample` and `run` processes
that hand their requests to `localsample daemon` instead of loading models themselves.

They use the same ``POST /v1/chat/completions`` as any OpenAI client, with a
``localsample`` block in the body for what MCP needs and OpenAI has no field for::

    "localsample": {"server": "blog-tools", "request_id": "7", "protocol": "2025-11-25",
                    "via": null, "hints": ["haiku"], "cost": 0.8, "speed": null,
                    "intelligence": null, "model": null, "choice": null, "ask": true,
                    "text": true}

``server`` names the server whose settings (policy, limits) apply and which the audit
records; ``hints`` and the priorities select the model as an MCP request's
``modelPreferences`` would; ``model`` names one explicitly; ``choice`` is a selection the
client made before (``{"model": id, "reason": why}``: the agent keeps one model per
conversation); ``ask`` says that the client can ask its user; ``text`` whether it wants
the text while it is generated (progress). Such a request is always
streamed, and its events carry the exact library values instead of OpenAI's lossy ones:

    {"localsample": {"text": "Once", "tokens": 1}}          a piece of text (progress)
    {"localsample": {"ask": {"id", "kind", "model", "reason", "max_tokens", "response"}}}
    {"localsample": {"answer": {...Completion...}, "reason": "hint 'haiku' matched"}}
    {"localsample": {"error": {"kind": "BusyError", "problem": "...", "fix": "..."}}}

then ``data: [DONE]``. An ``ask`` event is the daemon asking the client's user (``kind``
``approve``, or ``review`` with the ``response`` text) because the server's settings say
``approve = ask``; the client answers with ``POST /localsample/asks/{id}`` (see
:class:`ClientAsker`). So limits, selection, generation and audit happen here, once for
every host, while the person is asked where they are.

``POST /localsample/attach`` (Unix socket only) registers a client process (pid, command,
server) for `localsample ps` and for the idle exit of a daemon started by ``daemon =
"spawn"``; a client is listed while its process lives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from localsample.catalog import Catalog
from localsample.errors import LocalsampleError, RequestError
from localsample.generation import GenerationRequest
from localsample.openai_map import parse_chat, to_generation_request
from localsample.policy import Decision, Pending
from localsample.reports import alive
from localsample.runtime import Answer, Origin
from localsample.selection import Choice, Preferences

log = logging.getLogger(__name__)

__all__ = [
    "Asks",
    "AttachedClients",
    "ClientAsker",
    "EventStream",
    "Extension",
    "SendEvent",
    "answer_event",
    "choice_of",
    "error_event",
    "event",
]

EXTENSION = "localsample"
SendEvent = Callable[[str], Awaitable[None]]
"""Sends one event on a request's stream."""
Produce = Callable[[Receive, SendEvent], Awaitable[None]]
"""Writes a stream's events (given the ASGI ``receive``, to watch for a disconnect)."""


class ChoiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    reason: str


class Extension(BaseModel):
    """The ``localsample`` block of a chat request (see the module's docstring)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    server: str = Field("server", min_length=1, max_length=200)
    request_id: str = Field("", max_length=200)
    protocol: str | None = None
    via: str | None = None
    hints: list[str] = Field(default_factory=list)
    cost: float | None = Field(None, ge=0, le=1)
    speed: float | None = Field(None, ge=0, le=1)
    intelligence: float | None = Field(None, ge=0, le=1)
    model: str | None = None
    choice: ChoiceIn | None = None
    ask: bool = False
    text: bool = True
    """Whether to send the text as it is generated (a client that shows no progress saves
    the events and the wake-ups per token)."""

    @classmethod
    def parse(cls, value: object) -> Extension:
        try:
            return cls.model_validate(value)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise RequestError(
                f"{EXTENSION}.{where}: {error['msg'].lower()}",
                "send the localsample block as the attached client of the same localsample version does",
            ) from None

    def origin(self) -> Origin:
        return Origin(self.server, self.request_id or f"attached-{uuid.uuid4().hex[:8]}", self.protocol, self.via)

    def preferences(self) -> Preferences:
        return Preferences(tuple(self.hints), self.cost, self.speed, self.intelligence)


def event(**fields: Any) -> str:
    """One event of an attached client's stream: ``{"localsample": {...}}``."""
    return json.dumps({EXTENSION: fields}, ensure_ascii=False)


def error_event(exc: LocalsampleError) -> str:
    return event(error={"kind": type(exc).__name__, "problem": exc.problem, "fix": exc.fix})


def answer_event(answer: Answer) -> str:
    return event(answer=dataclasses.asdict(answer.completion), reason=answer.reason)


# -- asking the client's user --------------------------------------------------------------


@dataclass
class Ask:
    """One question to a client, waiting for its reply."""

    answered: anyio.Event = field(default_factory=anyio.Event)
    reply: dict[str, Any] = field(default_factory=dict)


class Asks:
    """Questions sent to clients and not answered yet, by id."""

    def __init__(self) -> None:
        self.waiting: dict[str, Ask] = {}

    async def answer(self, request: Request) -> Response:
        """``POST /localsample/asks/{id}``: the client's reply to one question."""
        ask = self.waiting.get(request.path_params["ask_id"])
        if ask is None:
            return JSONResponse({"error": "no such question (answered already, or timed out)"}, 404)
        try:
            reply = json.loads(await request.body())
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            return JSONResponse({"error": "the reply must be a JSON object"}, 400)
        ask.reply = reply
        ask.answered.set()
        return JSONResponse({"ok": True})


class ClientAsker:
    """An ``Asker`` that asks the attached client's user: it sends an ``ask`` event on the
    request's stream and waits for the reply (the pipeline bounds the wait by the server's
    ``ask_timeout``). Replies: ``{"approved", "by", "reason", "human", "request"}`` (the
    request as the person edited it, a chat body, or null) for ``approve``; ``{"text"}``
    (null: rejected) for ``review``."""

    unavailable = "the attached client cannot ask"

    def __init__(self, asks: Asks, send: SendEvent) -> None:
        self.asks = asks
        self.send = send

    def available(self) -> bool:
        return True

    async def question(self, pending: Pending, kind: str, response: str | None = None) -> dict[str, Any]:
        ask_id = uuid.uuid4().hex
        ask = self.asks.waiting[ask_id] = Ask()
        try:
            question: dict[str, Any] = {"id": ask_id, "kind": kind, "model": pending.model, "reason": pending.reason}
            question["max_tokens"] = pending.request.max_tokens
            if response is not None:
                question["response"] = response
            await self.send(event(ask=question))
            await ask.answered.wait()
            return ask.reply
        finally:
            del self.asks.waiting[ask_id]

    async def approve(self, pending: Pending) -> Decision:
        reply = await self.question(pending, "approve")
        request: GenerationRequest | None = None
        if isinstance(reply.get("request"), dict):
            request = to_generation_request(parse_chat(json.dumps(reply["request"]).encode()))
        return Decision(
            approved=reply.get("approved") is True,
            by=str(reply.get("by") or "the attached client's user"),
            reason=str(reply.get("reason") or ""),
            request=request,
            human=reply.get("human") is True,
        )

    async def review(self, pending: Pending, text: str) -> str | None:
        reply = await self.question(pending, "review", text)
        reviewed = reply.get("text")
        return reviewed if isinstance(reviewed, str) else None


# -- who is attached -------------------------------------------------------------------------


@dataclass
class Attached:
    pid: int
    command: str
    server: str | None
    since: float = field(default_factory=time.time)


class AttachedClients:
    """The client processes attached to this daemon (by pid), while they live."""

    def __init__(self) -> None:
        self.clients: dict[int, Attached] = {}
        self.last_seen = time.monotonic()
        """When a client was last attached (for the idle exit)."""

    def live(self) -> list[Attached]:
        for pid in [pid for pid in self.clients if not alive(pid)]:
            log.info("client %d (%s) detached", pid, self.clients.pop(pid).command)
        if self.clients:
            self.last_seen = time.monotonic()
        return list(self.clients.values())

    def status(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(client) for client in self.live()]

    async def attach(self, request: Request) -> Response:
        """``POST /localsample/attach`` ``{"pid", "command", "server"}``."""
        try:
            body = json.loads(await request.body())
            client = Attached(int(body["pid"]), str(body.get("command") or "?")[:200], body.get("server"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return JSONResponse({"error": 'send {"pid": N, "command": "...", "server": "..."}'}, 400)
        if client.pid not in self.clients:
            log.info("client %d attached (%s)", client.pid, client.command)
        self.clients[client.pid] = client
        self.last_seen = time.monotonic()
        return JSONResponse({"pid": os.getpid()})


class EventStream(Response):
    """An attached client's answer: ``produce`` writes the events, ``[DONE]`` ends them."""

    def __init__(self, produce: Produce) -> None:
        super().__init__(media_type="text/event-stream")
        self.produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        broken = False

        async def one(data: str) -> None:
            nonlocal broken
            if broken:
                return
            try:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            except OSError:  # gone: the disconnect watcher cancels the generation
                broken = True

        await self.produce(receive, one)
        await one("[DONE]")
        if not broken:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def choice_of(extension: Extension, catalog: Catalog) -> Choice | None:
    """The selection the client made before, if any (UnknownModelError if the model is not
    in the daemon's catalog)."""
    if extension.choice is None:
        return None
    return Choice(catalog.get(extension.choice.model), extension.choice.reason)
