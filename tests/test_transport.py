"""The transports to downstream servers: malformed JSON-RPC, connect timeouts, start-up crashes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import types
from mcp.client.session import ClientRequestContext
from mcp.shared.message import SessionMessage
from mcp_types import jsonrpc_message_adapter

from localsample.client import ServerClient, ServerSpec, call_tool, make_client
from localsample.errors import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ServerError
from localsample.messages import Malformed, read_message
from localsample.transport import GuardedTransport, StderrTail, TransportStreams
from tests.servers.malformed_corpus import CASES

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "tests" / "servers"
MALFORMED = f"{sys.executable} {SERVERS / 'malformed_server.py'}"
SILENT = f"{sys.executable} {SERVERS / 'silent_server.py'}"
CRASH = f"{sys.executable} {SERVERS / 'crash_at_start_server.py'}"


async def stub_sampling(
    context: ClientRequestContext, params: types.CreateMessageRequestParams
) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="fine"), model="stub-model"
    )


# -- the checks, line by line -------------------------------------------------------------

GOOD_LINES = [
    '{"jsonrpc":"2.0","id":1,"method":"sampling/createMessage","params":{"maxTokens":5,"messages":[]}}',
    '{"jsonrpc":"2.0","id":"a","method":"ping"}',
    '{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":0.5}}',
    '{"jsonrpc":"2.0","id":7,"result":{"tools":[]}}',
    '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}',
    '{"jsonrpc":"2.0","id":2,"method":"x","params":{"text":"caf\\u00e9 \\ud83d\\ude00 ☕"}}',
]


@pytest.mark.parametrize("line", GOOD_LINES)
def test_well_formed_messages_pass_through_as_the_sdk_reads_them(line: str) -> None:
    message = read_message(line.encode())
    assert not isinstance(message, Malformed)
    assert message.message == jsonrpc_message_adapter.validate_json(line, by_name=False)


BAD_LINES: list[tuple[str, int, Any, str]] = [
    ('{"jsonrpc":"2.0","id":1,"method":"m","params":[1]}', INVALID_REQUEST, 1, '"params" is a JSON array'),
    ('{"jsonrpc":"2.0","id":"s","method":"m","params":"x"}', INVALID_REQUEST, "s", '"params" is a JSON string'),
    ('{"jsonrpc":"2.0","id":3,"method":"m","params":{"t":["\\ud800"]}}', INVALID_PARAMS, 3, "surrogate"),
    ('{"jsonrpc":"2.0","id":3,"method":"m","params":{"\\udc00":1}}', INVALID_PARAMS, 3, "surrogate"),
    ('{"jsonrpc":"2.0","id":"\\ud800","method":"m"}', INVALID_REQUEST, None, "surrogate"),
    (
        '{"jsonrpc":"2.0","id":4,"method":"m","params":{"x":' + "[" * 10_000 + "]" * 10_000 + "}}",
        PARSE_ERROR,
        None,
        "deep",
    ),
    ('{"jsonrpc":"2.0","id":4,"method":"m","params":{"x":' + "[" * 300 + "]" * 300 + "}}", PARSE_ERROR, None, "deep"),
    ('{"jsonrpc":"2.0","id":{"a":1},"method":"m"}', INVALID_REQUEST, None, '"id" is a JSON object'),
    ('{"jsonrpc":"2.0","id":[1],"method":"m"}', INVALID_REQUEST, None, '"id" is a JSON array'),
    ('{"jsonrpc":"2.0","id":true,"method":"m"}', INVALID_REQUEST, None, '"id" is a JSON boolean'),
    ('{"jsonrpc":"2.0","id":1.0,"method":"m"}', INVALID_REQUEST, None, '"id" is a JSON float'),
    ('{"jsonrpc":"2.0","id":null,"method":"m"}', INVALID_REQUEST, None, '"id" is a JSON null'),
    ('{"jsonrpc":"1.0","id":5,"method":"m"}', INVALID_REQUEST, 5, '"jsonrpc" is "1.0"'),
    ('{"id":5,"method":"m"}', INVALID_REQUEST, 5, '"jsonrpc" is missing'),
    ('{"jsonrpc":"2.0","id":6,"method":7}', INVALID_REQUEST, 6, '"method" is a JSON number'),
    ('{"jsonrpc":"2.0","id":6}', INVALID_REQUEST, 6, 'no "method"'),
    ("[1, 2]", INVALID_REQUEST, None, "a JSON array, not an object"),
    ("not json", PARSE_ERROR, None, "not JSON"),
    ('{"jsonrpc":"2.0","id":1,"method":"m"', PARSE_ERROR, None, "not JSON"),
]


@pytest.mark.parametrize(("line", "code", "ident", "reason"), BAD_LINES)
def test_malformed_messages_get_the_json_rpc_error_code(line: str, code: int, ident: Any, reason: str) -> None:
    verdict = read_message(line.encode())
    assert isinstance(verdict, Malformed)
    assert (verdict.code, verdict.ident) == (code, ident)
    assert reason in verdict.reason
    reply = json.loads(verdict.reply().message.model_dump_json(by_alias=True, exclude_unset=True))
    assert reply == {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": reply["error"]["message"]}}


def test_invalid_utf8_is_a_parse_error() -> None:
    verdict = read_message(b'{"jsonrpc":"2.0","id":1,"method":"\xff"}')
    assert isinstance(verdict, Malformed) and verdict.code == PARSE_ERROR


def test_malformed_responses_and_notifications_are_told_apart() -> None:
    response = read_message(b'{"jsonrpc":"2.0","id":9,"result":[1]}')
    assert isinstance(response, Malformed) and (response.kind, response.ident) == ("response", 9)
    surrogate = read_message(b'{"jsonrpc":"2.0","id":9,"result":{"t":"\\ud800"}}')
    assert isinstance(surrogate, Malformed) and (surrogate.kind, surrogate.ident) == ("response", 9)
    notification = read_message(b'{"jsonrpc":"2.0","method":"notifications/progress","params":[1]}')
    assert isinstance(notification, Malformed) and notification.kind == "notification"


def test_the_stderr_tail_keeps_the_last_lines(capfd: pytest.CaptureFixture[str]) -> None:
    tail = StderrTail(lines=3)
    tail.feed(b"one\ntwo\nthr")
    tail.feed(b"ee\nfour\n\xe2\x98")  # a character split across two reads
    tail.feed(b"\x95 five", final=True)
    assert tail.tail() == ["three", "four", "☕ five"]
    assert capfd.readouterr().err == "one\ntwo\nthree\nfour\n☕ five"  # passed through as it came


def test_an_http_server_that_never_answers_times_out(caplog: pytest.LogCaptureFixture) -> None:
    """The Streamable HTTP path, with the SDK's transport replaced by streams nobody answers."""

    @asynccontextmanager
    async def unanswered() -> AsyncIterator[TransportStreams]:
        to_client, reads = anyio.create_memory_object_stream[SessionMessage | Exception](1)
        writes, from_client = anyio.create_memory_object_stream[SessionMessage](10)
        to_client.send_nowait(ValueError("Invalid JSON"))  # what the SDK hands on for a bad body
        async with to_client, from_client:
            yield reads, writes

    spec = ServerSpec.parse("api=http://127.0.0.1:9/mcp")
    client = ServerClient(GuardedTransport(unanswered(), name="api", connect_timeout=0.5), spec=spec, cache=None)

    async def connect() -> None:
        with anyio.fail_after(10):
            async with client:
                pass

    with caplog.at_level(logging.WARNING), pytest.raises(ServerError, match=r"within 0\.5 s"):
        anyio.run(connect)
    assert [r.getMessage() for r in caplog.records if r.name == "localsample.transport"] == [
        "server 'api' sent a message that is not valid JSON-RPC; ignored it"
    ]


# -- real servers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_malformed_request_is_answered_and_the_connection_lives_on(caplog: pytest.LogCaptureFixture) -> None:
    spec = ServerSpec.parse(MALFORMED)

    async def probe() -> dict[str, Any]:
        with anyio.fail_after(60):
            async with make_client(spec, stub_sampling) as client:
                result = await client.call_tool("probe", {})
        block = result.content[0]
        assert isinstance(block, types.TextContent)
        report: dict[str, Any] = json.loads(block.text)
        return report

    with caplog.at_level(logging.WARNING):
        report = anyio.run(probe)
    for case, (_, code, ident) in CASES.items():
        reply = report[case]["reply"]
        assert reply is not None, f"{case}: no reply"
        assert (reply["error"]["code"], reply["id"]) == (code, ident), case
        assert report[case]["seconds"] < 1.0, case
    assert report["good"]["reply"]["result"]["model"] == "stub-model"  # the connection still works
    warnings = [r for r in caplog.records if r.name == "localsample.transport"]
    assert len(warnings) == len(CASES)
    assert all("server 'malformed_server'" in r.getMessage() and "\n" not in r.getMessage() for r in warnings)
    assert not [r for r in caplog.records if r.exc_info], "no tracebacks in the log"


@pytest.mark.slow
def test_a_server_that_never_answers_the_handshake_times_out() -> None:
    for protocol in ("auto", "legacy"):
        spec = ServerSpec.parse(SILENT, protocol=protocol)

        async def call(spec: ServerSpec = spec) -> None:
            await call_tool(spec, "x", stub_sampling, connect_timeout=1.0)

        start = time.monotonic()
        with pytest.raises(ServerError) as caught:
            anyio.run(call)
        assert time.monotonic() - start < 10
        message = str(caught.value)
        assert "server 'silent_server' did not answer the MCP handshake" in message
        assert "within 1 s" in message and "connect_timeout" in message and "fix:" in message


@pytest.mark.slow
def test_a_server_that_closes_its_stdout_does_not_hang_us() -> None:
    spec = ServerSpec.parse(f"{SILENT} --close-stdout")
    start = time.monotonic()
    with pytest.raises(ServerError, match="closed the connection during start-up"):
        anyio.run(lambda: call_tool(spec, "x", stub_sampling, connect_timeout=30.0))
    assert time.monotonic() - start < 15  # it ignores SIGTERM: stdin close, grace, SIGTERM, SIGKILL


@pytest.mark.slow
def test_a_server_that_dies_at_start_up_shows_its_last_stderr_lines(capfd: pytest.CaptureFixture[str]) -> None:
    spec = ServerSpec.parse(CRASH)
    with pytest.raises(ServerError) as caught:
        anyio.run(lambda: call_tool(spec, "x", stub_sampling))
    error = caught.value
    assert "closed the connection during start-up" in error.problem and "exit status 1" in error.problem
    assert "ModuleNotFoundError: No module named 'mcp'" in error.problem
    assert "starting, step 29" in error.problem and "starting, step 3\n" not in error.problem  # the last lines only
    assert error.fix is not None and "install the missing module" in error.fix
    assert "starting, step 0\n" in capfd.readouterr().err  # still passed through live, all of it


@pytest.mark.slow
def test_call_and_serve_show_why_a_server_did_not_start() -> None:
    for command in (["call", "--server", CRASH, "x"], ["serve", "--server", CRASH]):
        proc = subprocess.run(
            [sys.executable, "-m", "localsample", *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 1, proc.stderr
        assert "closed the connection during start-up" in proc.stderr, proc.stderr
        # once passed through as the server wrote it, once in the error
        assert proc.stderr.count("ModuleNotFoundError: No module named 'mcp'") == 2, proc.stderr
