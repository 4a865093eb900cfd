"""Streamable HTTP downstreams: malformed JSON-RPC answered, as for stdio (test_transport.py).

The check itself (``MessageCheck``) runs here against bodies served by ``httpx2``'s mock
transport; the whole path, against a real misbehaving HTTP server
(``servers/malformed_http_server.py``) that sends the shared corpus in the event stream
answering a tool call and on the GET stream, and against the SDK's own server (in process,
on uvicorn), whose well-formed traffic must pass as before.
"""

from __future__ import annotations

import gzip
import json
import logging
import select
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import types
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import Resolve, Sample
from mcp.server.streamable_http import EventCallback, EventId, EventStore, StreamId
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import SessionMessage
from mcp_types import JSONRPCMessage

from localsample.client import ServerSpec, make_client
from localsample.errors import INVALID_REQUEST
from localsample.transport_http import HttpTransport, MessageCheck
from tests.servers.malformed_corpus import CASES, SAMPLING
from tests.test_transport import stub_sampling

SERVER = Path(__file__).resolve().parent / "servers" / "malformed_http_server.py"
LOGGER = "localsample.transport_http"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "probe"}}
GOOD_REQUEST = json.dumps({"jsonrpc": "2.0", "id": "good", "method": "sampling/createMessage", "params": SAMPLING})
GOOD_RESULT = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {"content": []}})


def as_json(message: SessionMessage) -> Any:
    return json.loads(message.message.model_dump_json(by_alias=True, exclude_unset=True))


async def serve_through_check(
    body: bytes, *, method: str = "POST", content_type: str = "text/event-stream", headers: dict[str, str] | None = None
) -> tuple[list[tuple[str, str]] | bytes, list[Any]]:
    """What the SDK would read of ``body`` (events as ``(id, data)``, or the bytes of a JSON
    body) once checked, and the error replies the check sent to the server."""
    answers: list[SessionMessage] = []
    check = MessageCheck("mock", answers.append)

    def handler(request: httpx2.Request) -> httpx2.Response:
        # A stream, as from the network (``content=`` would be read at once, before any hook).
        return httpx2.Response(
            200, headers={"content-type": content_type, **(headers or {})}, stream=httpx2.ByteStream(body)
        )

    read: list[tuple[str, str]] | bytes
    async with (
        httpx2.AsyncClient(transport=httpx2.MockTransport(handler), event_hooks={"response": [check]}) as http,
        http.stream(method, "http://mock/mcp", json=CALL if method == "POST" else None) as response,
    ):
        if content_type == "text/event-stream":
            read = [(event.id, event.data) async for event in httpx2.EventSource(response)]
        else:
            read = await response.aread()
    return read, [as_json(answer) for answer in answers]


def sse(*events: str) -> bytes:
    return "".join(events).encode()


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_each_malformed_request_in_an_event_stream_is_answered_and_dropped(
    case: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = sse(f"id: 1\ndata: {case.line}\n\n", f"id: 2\ndata: {GOOD_REQUEST}\n\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        events, answers = anyio.run(lambda: serve_through_check(body, method="GET"))
    assert answers == [
        {"jsonrpc": "2.0", "id": case.ident, "error": {"code": case.code, "message": answers[0]["error"]["message"]}}
    ]
    assert events == [("1", ""), ("2", GOOD_REQUEST)]  # the bad event's id survives, for resumption
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage().startswith("server 'mock' sent a malformed request (")


def test_a_post_stream_keeps_its_request_alive_and_fails_it_only_on_a_bad_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = sse(
        ": a comment\n\n",
        "id: a\nretry: 1500\ndata:\n\n",  # a priming event
        'data: {"jsonrpc":"2.0","id":"x","method":"m","params":[1]}\n\n',
        'data: {"jsonrpc":"2.0","method":"notifications/progress","params":"half"}\n\n',
        "event: other\ndata: not for the SDK\n\n",
        f"data: {GOOD_REQUEST}\n\n",
        'id: b\ndata: {"jsonrpc":"2.0","id":7,"result":[1]}\n\n',
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        events, answers = anyio.run(lambda: serve_through_check(body))
    assert [a["id"] for a in answers] == ["x"] and answers[0]["error"]["code"] == INVALID_REQUEST
    assert isinstance(events, list)
    assert events[:3] == [("a", ""), ("a", "not for the SDK"), ("a", GOOD_REQUEST)]
    [(last_id, data)] = events[3:]
    failed = json.loads(data)
    assert last_id == "b" and failed["id"] == 7 and failed["error"]["code"] == INVALID_REQUEST
    assert "server 'mock' sent a malformed response" in failed["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 3 and all(line.startswith("server 'mock' sent a malformed ") for line in lines)
    assert "notification" in lines[1] and "ignored it" in lines[1] and "to request 7" in lines[2]


def test_well_formed_streams_pass_unchanged_even_compressed() -> None:
    body = sse("id: 1\nretry: 10\ndata: " + GOOD_REQUEST + "\n\n", "id: 2\ndata: " + GOOD_RESULT + "\n\n")
    headers = {"content-encoding": "gzip"}
    events, answers = anyio.run(lambda: serve_through_check(gzip.compress(body), headers=headers))
    assert events == [("1", GOOD_REQUEST), ("2", GOOD_RESULT)] and answers == []


def test_a_get_stream_fails_a_bad_response_by_its_own_id_and_drops_one_without() -> None:
    body = sse('data: {"jsonrpc":"2.0","id":3,"result":[1]}\n\n', 'data: {"jsonrpc":"2.0","id":[3],"result":{}}\n\n')
    events, answers = anyio.run(lambda: serve_through_check(body, method="GET"))
    assert isinstance(events, list) and len(events) == 1 and answers == []
    assert json.loads(events[0][1])["id"] == 3


def test_a_json_body_is_checked_and_a_bad_one_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    good = GOOD_RESULT.encode()
    assert anyio.run(lambda: serve_through_check(good, content_type="application/json")) == (good, [])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        body, answers = anyio.run(lambda: serve_through_check(b'{"result": 1', content_type="application/json"))
    assert isinstance(body, bytes) and answers == []
    failed = json.loads(body)
    assert failed["id"] == 7 and failed["error"]["code"] == -32700
    assert [r.getMessage()[:46] for r in caplog.records if r.name == LOGGER] == [
        "server 'mock' sent a malformed response to req"
    ]


def test_http_specs_get_the_checking_transport() -> None:
    client = make_client(ServerSpec.parse("api=http://127.0.0.1:9/mcp"), stub_sampling)
    assert isinstance(client.transport, HttpTransport) and client.transport.name == "api"


# -- real servers -------------------------------------------------------------------------


@pytest.fixture
def misbehaving_server() -> Iterator[str]:
    with subprocess.Popen([sys.executable, str(SERVER)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready, "the server did not start"
            yield f"misbehaving=http://127.0.0.1:{int(proc.stdout.readline())}/mcp"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_every_malformed_request_over_http_is_answered_and_the_connection_lives_on(
    misbehaving_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ServerSpec.parse(misbehaving_server)

    async def probe() -> tuple[dict[str, Any], str]:
        reports: dict[str, Any] = {}
        with anyio.fail_after(120):
            async with make_client(spec, stub_sampling) as client:
                for via in ("post", "get"):
                    result = await client.call_tool("probe", {"via": via})
                    assert not result.is_error, result
                    block = result.content[0]
                    assert isinstance(block, types.TextContent)
                    reports[via] = json.loads(block.text)
                echo = (await client.call_tool("echo", {"text": "still here"})).content[0]
        assert isinstance(echo, types.TextContent)
        return reports, echo.text

    with caplog.at_level(logging.WARNING):
        reports, echoed = anyio.run(probe)
    for via, report in reports.items():
        for name, case in CASES.items():
            reply = report[name]["reply"]
            assert reply is not None, f"{via} {name}: no reply"
            assert (reply["error"]["code"], reply["id"]) == (case.code, case.ident), f"{via} {name}"
            assert report[name]["seconds"] < 1.0, f"{via} {name}"
        assert report["good"]["reply"]["result"]["model"] == "stub-model", via
    assert echoed == "still here"
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 2 * len(CASES)
    assert all(w.startswith("server 'misbehaving' sent a malformed request") and "\n" not in w for w in warnings)
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks in the log"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name != LOGGER]


class Numbered(EventStore):
    """Numbers events (so the server writes SSE ids and priming events); replays nothing."""

    def __init__(self) -> None:
        self.count = 0

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        self.count += 1
        return str(self.count)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        return None


def ask(topic: str) -> Sample:
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=topic))
    return Sample([message], max_tokens=8)


async def write(topic: str, result: Annotated[types.CreateMessageResult, Resolve(ask)] = None) -> str:  # type: ignore[assignment]
    """Samples on both protocol eras."""
    return str(result.model)


async def classic(ctx: Context, text: str = "Say hi.") -> str:
    """Pushes a sampling request (≤ 2025-11-25)."""
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=text))
    return str((await ctx.session.create_message([message], max_tokens=8)).model)


async def count(ctx: Context, n: int = 3) -> str:
    """Reports progress."""
    for i in range(n):
        await ctx.report_progress(i + 1, n, f"step {i + 1}")
    return f"counted {n}"


def echo(text: str, times: int = 1) -> str:
    return text * times


def sdk_app(**options: Any) -> Any:
    """An MCP server built with the SDK, as a Streamable HTTP app (``options`` for the app)."""
    server = MCPServer("sdk-http-test")
    for tool in (write, classic, count, echo):
        server.tool()(tool)
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return server.streamable_http_app(transport_security=security, **options)


@asynccontextmanager
async def sdk_server(**options: Any) -> AsyncIterator[str]:
    """:func:`sdk_app` on uvicorn on a free loopback port; yields a ``--server`` value."""
    config = uvicorn.Config(
        sdk_app(**options), log_level="warning", log_config=None, lifespan="on", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:
                    await anyio.sleep(0.01)
            yield f"sdk=http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            server.should_exit = True


@pytest.mark.parametrize(
    ("protocol", "options"),
    [
        ("auto", {}),
        ("auto", {"json_response": True}),
        ("legacy", {"event_store": Numbered(), "retry_interval": 500}),
    ],
    ids=["2026-07-28", "2026-07-28-json", "2025-11-25-resumable-sse"],
)
def test_a_well_formed_sdk_server_over_http_works_as_before(
    protocol: str, options: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = [("write", {"topic": "owls"}), ("echo", {"text": "hi", "times": 2})]
    if protocol == "legacy":
        calls += [("classic", {}), ("count", {})]  # a pushed request; progress notifications

    async def session() -> list[str]:
        seen = []
        with anyio.fail_after(60):
            async with (
                sdk_server(**options) as target,
                make_client(ServerSpec.parse(target, protocol=protocol), stub_sampling) as client,
            ):
                for tool, arguments in calls:
                    result = await client.call_tool(tool, arguments)
                    assert not result.is_error, result
                    block = result.content[0]
                    assert isinstance(block, types.TextContent)
                    seen.append(block.text)
        return seen

    with caplog.at_level(logging.WARNING):
        seen = anyio.run(session)
    expected = ["stub-model", "hihi"] + (["stub-model", "counted 3"] if protocol == "legacy" else [])
    assert seen == expected
    assert not [r for r in caplog.records if r.name == LOGGER or r.exc_info]
