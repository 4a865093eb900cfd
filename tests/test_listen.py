"""The HTTP listener's defences: bind refusal, bearer token, Host and Origin checks.

The header checks run in-process against :class:`Guard` (through httpx's ASGI transport);
the listener itself runs on real uvicorn on a free loopback port, once with a trivial app
and once with the SDK's Streamable HTTP app and a real MCP client.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from localsample.errors import INVALID_REQUEST, ServerSpecError
from localsample.listen import Guard, allowed_hosts, check_bind, is_loopback, listen_url, make_token, serve_app

pytestmark = pytest.mark.anyio

PORT = 8765
TOKEN = "s3cret-token-for-tests"
START_TIMEOUT_S = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def trivial_app() -> tuple[Starlette, list[str]]:
    """A Starlette app answering /mcp, and the list of requests that reached it."""
    reached: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        reached.append(request.method)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/mcp", endpoint, methods=["GET", "POST"])]), reached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the bind -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.2", "::", "192.168.1.10", "example.com"])
def test_a_bind_beyond_loopback_needs_allow_remote(host: str) -> None:
    with pytest.raises(ServerSpecError) as caught:
        check_bind(host, allow_remote=False)
    assert "--allow-remote" in (caught.value.fix or "")
    assert "--token" in (caught.value.fix or "")
    check_bind(host, allow_remote=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "::1", "[::1]", "0:0:0:0:0:0:0:1"])
def test_loopback_binds_need_nothing(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, allow_remote=False)


async def test_serve_app_refuses_a_wildcard_bind_before_listening() -> None:
    app, _ = trivial_app()
    with anyio.fail_after(START_TIMEOUT_S), pytest.raises(ServerSpecError, match=r"--listen 0\.0\.0\.0"):
        await serve_app(app, "0.0.0.0", free_port(), token=None, allow_remote=False)


async def test_a_port_in_use_is_a_localsample_error() -> None:
    app, _ = trivial_app()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        with anyio.fail_after(START_TIMEOUT_S), pytest.raises(ServerSpecError, match="could not start listening"):
            await serve_app(app, "127.0.0.1", port, token=TOKEN, allow_remote=False)


# -- the token ------------------------------------------------------------------------------


def test_a_generated_token_is_long_random_and_marked_generated() -> None:
    first, generated = make_token(None)
    second, _ = make_token(None)
    assert generated
    assert len(first) >= 40
    assert first != second
    assert make_token(TOKEN) == (TOKEN, False)


@pytest.mark.parametrize("bad", ["", "two words", "tab\there", "ünïcode"])
def test_a_token_that_cannot_travel_in_a_header_is_refused(bad: str) -> None:
    with pytest.raises(ServerSpecError, match="--token"):
        make_token(bad)


# -- the allow-list -------------------------------------------------------------------------


def test_a_loopback_bind_allows_the_loopback_names_on_its_port_only() -> None:
    allowed = allowed_hosts("127.0.0.1", PORT)
    for name in ("127.0.0.1", "localhost", "[::1]"):
        assert allowed.allows(name, PORT)
        assert not allowed.allows(name, PORT + 1)
    assert not allowed.allows(socket.gethostname().lower(), PORT)


def test_a_wildcard_bind_allows_loopback_and_the_hostname_never_the_wildcard() -> None:
    allowed = allowed_hosts("0.0.0.0", PORT)
    assert allowed.allows("localhost", PORT)
    assert allowed.allows(socket.gethostname().lower(), PORT)
    assert not allowed.allows("0.0.0.0", PORT)
    assert not allowed_hosts("::", PORT).allows("[::]", PORT)
    assert listen_url("0.0.0.0", PORT) == f"http://{socket.gethostname().lower()}:{PORT}/mcp"


def test_another_loopback_address_allows_itself_not_localhost() -> None:
    allowed = allowed_hosts("127.0.0.2", PORT)
    assert allowed.allows("127.0.0.2", PORT)
    assert not allowed.allows("localhost", PORT)


def test_extra_hosts_allow_any_port_or_the_one_named() -> None:
    allowed = allowed_hosts("127.0.0.1", PORT, ["MyHost.lan", "proxy.lan:443", "::2", "[fe80::1]:9000"])
    assert allowed.allows("myhost.lan", 1234)
    assert allowed.allows("proxy.lan", 443)
    assert not allowed.allows("proxy.lan", PORT)
    assert allowed.allows("[::2]", 80)
    assert allowed.allows("[fe80::1]", 9000)


@pytest.mark.parametrize("bad", ["", "*", "two words", "host:99999", "host:", "[::1"])
def test_a_malformed_extra_host_is_refused(bad: str) -> None:
    with pytest.raises(ServerSpecError, match="--allow-host"):
        allowed_hosts("127.0.0.1", PORT, [bad])


# -- the guard, in-process ------------------------------------------------------------------

GOOD = f"127.0.0.1:{PORT}"

CASES = [
    pytest.param({**bearer(TOKEN)}, 200, id="good token"),
    pytest.param({"Host": f"localhost:{PORT}", **bearer(TOKEN)}, 200, id="localhost"),
    pytest.param({"Host": f"[::1]:{PORT}", **bearer(TOKEN)}, 200, id="ipv6 loopback"),
    pytest.param({"Origin": f"http://127.0.0.1:{PORT}", **bearer(TOKEN)}, 200, id="good origin"),
    pytest.param({"Origin": f"https://localhost:{PORT}", **bearer(TOKEN)}, 200, id="https origin"),
    pytest.param({"Authorization": f"bearer {TOKEN}"}, 200, id="scheme in lower case"),
    pytest.param({}, 401, id="no token"),
    pytest.param(bearer("wrong"), 401, id="wrong token"),
    pytest.param(bearer(TOKEN + "x"), 401, id="longer token"),
    pytest.param({"Authorization": f"Basic {TOKEN}"}, 401, id="basic scheme"),
    pytest.param({"Authorization": TOKEN}, 401, id="no scheme"),
    pytest.param({"Host": "evil.example", **bearer(TOKEN)}, 421, id="evil host"),
    pytest.param({"Host": f"evil.example:{PORT}", **bearer(TOKEN)}, 421, id="evil host on our port"),
    pytest.param({"Host": f"127.0.0.1:{PORT + 1}", **bearer(TOKEN)}, 421, id="other port"),
    pytest.param({"Host": "127.0.0.1", **bearer(TOKEN)}, 421, id="default port"),
    pytest.param({"Host": f"127.0.0.1:{PORT}:1", **bearer(TOKEN)}, 421, id="two ports"),
    pytest.param({"Origin": "http://evil.example", **bearer(TOKEN)}, 403, id="evil origin"),
    pytest.param({"Origin": "null", **bearer(TOKEN)}, 403, id="null origin"),
    pytest.param({"Origin": "http://localhost:3000", **bearer(TOKEN)}, 403, id="other local origin"),
    pytest.param({"Origin": f"http://127.0.0.1:{PORT}.evil.example", **bearer(TOKEN)}, 403, id="prefix origin"),
    pytest.param({"Origin": f"file://127.0.0.1:{PORT}", **bearer(TOKEN)}, 403, id="file origin"),
    pytest.param({"Host": "evil.example"}, 421, id="host before token"),
    pytest.param({"Origin": "null"}, 403, id="origin before token"),
]


@pytest.mark.parametrize(("headers", "status"), CASES)
async def test_the_guard_lets_through_only_good_requests(headers: dict[str, str], status: int) -> None:
    app, reached = trivial_app()
    guard = Guard(app, token=TOKEN, allowed=allowed_hosts("127.0.0.1", PORT))
    transport = httpx2.ASGITransport(app=guard)
    async with httpx2.AsyncClient(transport=transport, base_url=f"http://{GOOD}") as client:
        response = await client.post("/mcp", headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == status
    if status == 200:
        assert reached == ["POST"]
        return
    assert reached == []
    body = response.json()
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == INVALID_REQUEST
    assert TOKEN not in response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_guard_refuses_two_authorization_headers() -> None:
    app, reached = trivial_app()
    guard = Guard(app, token=TOKEN, allowed=allowed_hosts("127.0.0.1", PORT))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    auth = f"Bearer {TOKEN}".encode()
    headers = [(b"host", GOOD.encode()), (b"authorization", auth), (b"authorization", auth)]
    scope: Scope = {"type": "http", "method": "GET", "path": "/mcp", "headers": headers, "scheme": "http"}
    await guard(scope, receive, send)
    assert sent[0]["status"] == 401
    assert reached == []


async def test_the_guard_passes_lifespan_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    await Guard(app, token=TOKEN, allowed=allowed_hosts("127.0.0.1", PORT))({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]


# -- the listener, on real uvicorn ----------------------------------------------------------


@asynccontextmanager
async def listening(app: Starlette, token: str | None) -> AsyncIterator[str]:
    """Serve ``app`` with :func:`serve_app` on a free loopback port; yield its base URL."""
    port = free_port()
    async with anyio.create_task_group() as group:
        group.start_soon(partial(serve_app, app, "127.0.0.1", port, token=token, allow_remote=False))
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
        group.cancel_scope.cancel()


def files_containing(text: str, *roots: Path) -> list[Path]:
    needle = text.encode()
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and needle in path.read_bytes():
                found.append(path)
    return found


async def test_a_generated_token_is_printed_once_required_and_never_stored(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, isolated: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    app, reached = trivial_app()
    async with listening(app, token=None) as base, httpx2.AsyncClient(base_url=base, timeout=10) as client:
        printed = capsys.readouterr().err
        match = re.search(r"Authorization: Bearer (\S+)", printed)
        assert match, printed
        token = match.group(1)
        assert f"{base}/mcp" in printed
        assert (await client.get("/mcp", headers=bearer(token))).status_code == 200
        assert (await client.get("/mcp")).status_code == 401
        assert (await client.get("/mcp", headers=bearer("wrong"))).status_code == 401
        assert (await client.get("/mcp", headers={"Host": "evil.example", **bearer(token)})).status_code == 421
        assert (await client.get("/mcp", headers={"Origin": "http://evil.example", **bearer(token)})).status_code == 403
        assert (await client.get("/mcp", headers={"Origin": "null", **bearer(token)})).status_code == 403
        assert (await client.get("/mcp", headers={"Origin": base, **bearer(token)})).status_code == 200
    assert reached == ["GET", "GET"]
    stderr = printed + capsys.readouterr().err
    assert stderr.count(token) == 1
    assert not any(token in record.getMessage() for record in caplog.records)
    assert files_containing(token, isolated, Path(os.environ["HOME"])) == []


async def test_a_given_token_is_required_and_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    app, reached = trivial_app()
    async with listening(app, token=TOKEN) as base, httpx2.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.post("/mcp", headers=bearer(TOKEN))).status_code == 200
        assert (await client.post("/mcp")).status_code == 401
    assert reached == ["POST"]
    stderr = capsys.readouterr().err
    assert f"serving MCP at {base}/mcp" in stderr
    assert TOKEN not in stderr


async def test_an_mcp_client_with_the_token_calls_a_tool_and_one_without_cannot() -> None:
    server = MCPServer("listen-test")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return text

    app = server.streamable_http_app(
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False)
    )
    async with listening(app, token=TOKEN) as base:
        with anyio.fail_after(30):
            async with (
                httpx2.AsyncClient(headers=bearer(TOKEN)) as http,
                Client(streamable_http_client(f"{base}/mcp", http_client=http)) as client,
            ):
                result = await client.call_tool("echo", {"text": "hello"})
                assert result.content[0].text == "hello"  # type: ignore[union-attr]
            with pytest.raises(BaseException) as refused:
                async with Client(f"{base}/mcp") as client:
                    await client.list_tools()
    errors = [e for e in leaves(refused.value) if isinstance(e, MCPError)]
    assert errors and {e.error.code for e in errors} == {INVALID_REQUEST}
    assert "bearer token" in errors[0].error.message


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or the error itself."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]
