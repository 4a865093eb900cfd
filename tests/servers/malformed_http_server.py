"""A stub Streamable HTTP MCP server that sends malformed JSON-RPC requests to its client, on purpose.

No SDK: a Starlette app on uvicorn that writes the messages itself. It listens on a free
loopback port, prints the port on stdout, and serves ``/mcp``:

- ``POST``: the handshake (``server/discover`` gets "method not found"; ``initialize``
  gets a result and an ``Mcp-Session-Id``), ``tools/list``, ``tools/call``; the client's
  responses (202). Anything after ``initialize`` without the session id gets a 400.
- ``GET``: the stream for server-initiated messages. ``DELETE``: ends the session.

Tools: ``echo`` returns its ``text``. ``probe`` sends each case of
``malformed_corpus.CASES`` as a server→client request, waits up to ``REPLY_WAIT`` seconds
for the client's reply (POSTed back), then sends one well-formed
``sampling/createMessage``; its result is a JSON report of every reply (or its absence)
and of the sampling answer. With ``{"via": "post"}`` (the default) the requests travel in
the event stream answering the ``tools/call`` (with SSE ids, as a resumable server writes
them); with ``{"via": "get"}`` on the GET stream, and the result comes as plain JSON.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find the tests package
from tests.servers.malformed_corpus import CASES, SAMPLING

REPLY_WAIT = 5.0
GET_STREAM_WAIT = 10.0
SESSION_ID = uuid.uuid4().hex
TOOLS = [
    {"name": "probe", "description": "send malformed requests", "inputSchema": {"type": "object"}},
    {"name": "echo", "description": "say it back", "inputSchema": {"type": "object"}},
]

replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
"""The client's responses, as they are POSTed."""
outbox: asyncio.Queue[str] = asyncio.Queue()
"""Messages for the GET stream."""
get_stream_open = asyncio.Event()


def result(ident: Any, value: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": ident, "result": value})


def error(ident: Any, code: int, message: str, status: int = 200) -> JSONResponse:
    body = {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status)


def text_result(value: Any) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": json.dumps(value) if not isinstance(value, str) else value}]}


async def next_reply(timeout: float) -> tuple[dict[str, Any] | None, float]:
    start = time.monotonic()
    try:
        reply = await asyncio.wait_for(replies.get(), timeout)
    except TimeoutError:
        reply = None
    return reply, time.monotonic() - start


async def probe(send: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, case in CASES.items():
        await send(case.line)
        reply, took = await next_reply(REPLY_WAIT)
        report[name] = {"reply": reply, "seconds": took}
    await send(json.dumps({"jsonrpc": "2.0", "id": "good", "method": "sampling/createMessage", "params": SAMPLING}))
    reply, took = await next_reply(REPLY_WAIT)
    report["good"] = {"reply": reply, "seconds": took}
    return report


async def probe_events(ident: Any) -> AsyncIterator[str]:
    """The event stream answering ``tools/call probe``: the cases, then the call's result."""
    events: asyncio.Queue[str | None] = asyncio.Queue()
    task = asyncio.create_task(probe(events.put))
    task.add_done_callback(lambda _: events.put_nowait(None))
    count = 0
    while (line := await events.get()) is not None:
        count += 1
        yield f"id: {count}\ndata: {line}\n\n"
    answer = {"jsonrpc": "2.0", "id": ident, "result": text_result(task.result())}
    yield f"id: {count + 1}\ndata: {json.dumps(answer)}\n\n"


async def call_tool(ident: Any, params: dict[str, Any]) -> Response:
    name, arguments = params.get("name"), params.get("arguments") or {}
    if name == "echo":
        return result(ident, text_result(str(arguments.get("text", ""))))
    if name != "probe":
        return error(ident, -32602, f"no tool {name}")
    if arguments.get("via", "post") == "post":
        return StreamingResponse(probe_events(ident), media_type="text/event-stream")
    try:
        await asyncio.wait_for(get_stream_open.wait(), GET_STREAM_WAIT)
    except TimeoutError:
        return error(ident, -32603, "the client opened no GET stream")
    return result(ident, text_result(await probe(outbox.put)))


async def post(request: Request) -> Response:
    message = json.loads(await request.body())
    method, ident = message.get("method"), message.get("id")
    if method not in ("initialize", "server/discover") and request.headers.get("mcp-session-id") != SESSION_ID:
        return error(ident, -32600, "no or wrong Mcp-Session-Id", status=400)
    if method is None:  # the client's response to one of our requests
        await replies.put(message)
        return Response(status_code=202)
    if "id" not in message:  # a notification
        return Response(status_code=202)
    if method == "initialize":
        info = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "malformed-http-server", "version": "0.1"},
        }
        response = result(ident, info)
        response.headers["mcp-session-id"] = SESSION_ID
        return response
    if method == "tools/list":
        return result(ident, {"tools": TOOLS})
    if method == "tools/call":
        return await call_tool(ident, message.get("params") or {})
    return error(ident, -32601, f"no method {method}")


async def get(request: Request) -> Response:
    if request.headers.get("mcp-session-id") != SESSION_ID:
        return Response(status_code=400)

    async def stream() -> AsyncIterator[str]:
        get_stream_open.set()
        while True:
            yield f"data: {await outbox.get()}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def delete(request: Request) -> Response:
    return Response(status_code=200)


app = Starlette(
    routes=[
        Route("/mcp", post, methods=["POST"]),
        Route("/mcp", get, methods=["GET"]),
        Route("/mcp", delete, methods=["DELETE"]),
    ]
)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
