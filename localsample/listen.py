"""How `serve` listens to its host: over stdio (:func:`host_lines`), or over HTTP with
``--listen`` (bind checks, a bearer token, Host/Origin checks).

Anything that can reach the listening socket could otherwise open an MCP session and call
every downstream tool, so every listener gets three defences, in this order:

1. **Host** must name this listener (DNS rebinding: a web page whose name resolves to this
   machine sends its own name): the bound ``host:port``, plus ``localhost``, ``127.0.0.1``
   and ``[::1]`` on a loopback or wildcard bind, plus this machine's hostname on a
   non-loopback bind, plus the ``--allow-host`` names. Otherwise 421.
2. **Origin**, when a browser sends one, must be ``http(s)://`` one of those names;
   ``Origin: null`` (sandboxed frames, ``file:`` pages) is refused. Otherwise 403.
3. **Authorization: Bearer TOKEN** on every request, compared in constant time. Otherwise
   401 with ``WWW-Authenticate: Bearer``. The token is ``--token`` or one generated per run
   and printed once to stderr; it is never written to a file or a log record.

A refused request never reaches the wrapped application. Binding anything but
127.0.0.1, localhost or ::1 needs ``allow_remote`` (``--allow-remote``).

Use: ``check_bind`` early (before slow start-up work), then ``await serve_app(app, ...)``.
"""

from __future__ import annotations

import codecs
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from localsample.errors import INVALID_REQUEST, ServerSpecError

log = logging.getLogger(__name__)

__all__ = [
    "GRACEFUL_SHUTDOWN_S",
    "LOOPBACK_HOSTS",
    "AllowedHosts",
    "Guard",
    "allowed_hosts",
    "check_bind",
    "is_loopback",
    "listen_url",
    "make_token",
    "serve_app",
    "serve_socket",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""The only bind addresses that need no ``--allow-remote`` (127.0.0.2 and the like do)."""

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
"""How Host and Origin headers spell the loopback addresses."""

GRACEFUL_SHUTDOWN_S = 5
"""How long shutdown waits for open connections (SSE streams stay open) before cancelling them."""

SHUTDOWN_MARGIN_S = 2.0
"""Beyond the graceful period: the bound on the app's own shutdown after a cancellation."""

TOKEN_BYTES = 32
"""Random bytes in a generated token (43 URL-safe characters)."""

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

ANY_PORT = 0
"""The port of an allowed name that matches whatever port a header carries."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is 127.0.0.1, localhost or ::1 (in any spelling of that one address)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address in (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is 0.0.0.0 or :: (every interface)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_bind(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond loopback unless the user said so with ``--allow-remote``."""
    if allow_remote or is_loopback(host):
        return
    raise ServerSpecError(
        f"--listen {host} is not 127.0.0.1, localhost or ::1: anything that reaches that address "
        "could call every tool of the servers behind localsample",
        "listen on 127.0.0.1 (e.g. --listen 127.0.0.1:8765), or add --allow-remote to mean it; "
        "every request then needs the bearer token (pass one with --token, or use the one printed at start)",
    )


def make_token(given: str | None) -> tuple[str, bool]:
    """The bearer token to require, and whether it was generated here (``given`` is None)."""
    if given is None:
        return secrets.token_urlsafe(TOKEN_BYTES), True
    if not given or not given.isascii() or not given.isprintable() or any(c.isspace() for c in given):
        raise ServerSpecError(
            "--token must be non-empty printable ASCII without spaces",
            "leave --token out to get a generated one, or pass e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`",
        )
    return given, False


def host_form(host: str) -> str:
    """``host`` as Host and Origin headers spell it: lower case, IPv6 in brackets."""
    host = host.strip("[]").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    """``name[:port]`` (IPv6 in brackets) as (name as :func:`host_form` spells it, port), or None."""
    authority = authority.lower()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        name, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        name, sep, port_text = authority.partition(":")
        if sep and not port_text:
            return None
    if not name:
        return None
    if not port_text:
        return host_form(name), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host_form(name), int(port_text)


@dataclass(frozen=True)
class AllowedHosts:
    """The names (with ports) that Host and Origin headers may carry; ANY_PORT matches any port."""

    names: frozenset[tuple[str, int]]

    def allows(self, name: str, port: int) -> bool:
        return (name, port) in self.names or (name, ANY_PORT) in self.names

    def describe(self) -> str:
        return ", ".join(sorted(n if p == ANY_PORT else f"{n}:{p}" for n, p in self.names))


def parse_extra_host(value: str) -> tuple[str, int]:
    """One ``--allow-host`` value: ``NAME`` (any port) or ``NAME:PORT``; IPv6 bare or in brackets."""
    text = value.strip()
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return host_form(str(ipaddress.ip_address(bare))), ANY_PORT
    except ValueError:
        pass
    parsed = split_authority(text, ANY_PORT)
    if parsed is None or not all(c.isalnum() or c in ".-_[]:" for c in parsed[0]):
        raise ServerSpecError(
            f"--allow-host {value!r} is not a host name",
            "write NAME or NAME:PORT, e.g. --allow-host myhost.lan or --allow-host myhost.lan:8765",
        )
    return parsed


def allowed_hosts(host: str, port: int, extra_hosts: Iterable[str] = ()) -> AllowedHosts:
    """What a listener bound to ``host:port`` accepts in Host and Origin headers.

    The bound name itself (never a wildcard 0.0.0.0 or ::); the loopback names on a loopback
    or wildcard bind; this machine's hostname on any other bind; and every ``extra_hosts``
    value (``NAME`` for any port, ``NAME:PORT`` for one).
    """
    names: set[tuple[str, int]] = set()
    if is_loopback(host) or is_wildcard(host):
        names.update((name, port) for name in LOOPBACK_NAMES)
    if not is_wildcard(host):
        names.add((host_form(host), port))
    if not is_loopback(host):
        names.add((host_form(socket.gethostname()), port))
    names.update(parse_extra_host(value) for value in extra_hosts)
    return AllowedHosts(frozenset(names))


def listen_url(host: str, port: int, path: str = "/mcp") -> str:
    """The URL a client uses for a listener on ``host:port`` (the hostname for a wildcard bind)."""
    name = host_form(socket.gethostname()) if is_wildcard(host) else host_form(host)
    return f"http://{name}:{port}{path}"


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, as the HTTP status and a short message for the client."""

    status: int
    message: str
    log_detail: str


class Guard:
    """ASGI middleware: Host, Origin and bearer-token checks before ``app`` sees a request.

    HTTP and WebSocket scopes are checked; lifespan passes through untouched, so the
    wrapped app (the SDK's Streamable HTTP app) still starts and stops its session manager.
    """

    def __init__(self, app: ASGIApp, *, token: str, allowed: AllowedHosts) -> None:
        if not token:
            raise ValueError("Guard needs a non-empty token")
        self.app = app
        self.token = token.encode()
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "an unknown peer"
        log.warning("refused a request from %s: %s", peer, refusal.log_detail)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_refusal(send, refusal)

    def check(self, scope: Scope) -> Refusal | None:
        """The reason to refuse this request, or None to let it through."""
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), []).append(value)
        default_port = DEFAULT_PORTS.get(str(scope.get("scheme", "http")), 80)
        return (
            self.check_host(headers.get(b"host", []), default_port)
            or self.check_origin(headers.get(b"origin", []))
            or self.check_token(headers.get(b"authorization", []))
        )

    def check_host(self, values: list[bytes], default_port: int) -> Refusal | None:
        text = values[0].decode("latin-1") if len(values) == 1 else ""
        parsed = split_authority(text, default_port)
        if parsed is not None and self.allowed.allows(*parsed):
            return None
        return Refusal(
            421,
            "this listener does not answer to that Host name",
            f"Host {text[:100]!r} is not one of {self.allowed.describe()} (add it with --allow-host if it is yours)",
        )

    def check_origin(self, values: list[bytes]) -> Refusal | None:
        if not values:
            return None  # not a browser, or a same-origin request from an old one
        text = values[0].decode("latin-1") if len(values) == 1 else ""
        scheme, sep, authority = text.lower().partition("://")
        parsed = split_authority(authority, DEFAULT_PORTS[scheme]) if sep and scheme in ("http", "https") else None
        if parsed is not None and self.allowed.allows(*parsed):
            return None
        return Refusal(
            403,
            "requests from that Origin are not allowed",
            f"Origin {text[:100]!r} is not http(s):// one of {self.allowed.describe()}",
        )

    def check_token(self, values: list[bytes]) -> Refusal | None:
        given = b""
        if len(values) == 1:
            scheme, _, credentials = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = credentials.strip()
        if hmac.compare_digest(given, self.token):
            return None
        return Refusal(
            401,
            "missing or wrong bearer token; send the header Authorization: Bearer TOKEN "
            "with the --token value or the token localsample printed when it started",
            "no bearer token" if not values else "wrong bearer token",
        )


async def send_refusal(send: Send, refusal: Refusal) -> None:
    """A short JSON-RPC-shaped error response; 401 says which scheme to use."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": refusal.message}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refusal.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="localsample"'))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Listener(uvicorn.Server):
    """uvicorn's server, announcing itself once bound and failing with a localsample error."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started
        self.stopping = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        address = f"{self.config.host}:{self.config.port}"
        try:
            await super().startup(sockets)
        except SystemExit as exc:  # uvicorn exits when it cannot bind or the app fails to start
            raise ServerSpecError(
                f"could not start listening on {address} (the reason is in the log line above)",
                "pick a free port with --listen HOST:PORT, or stop the process that uses this one",
            ) from exc
        if self.started:
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stopping = True
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave SIGINT and SIGTERM to the caller, who stops the listener by cancelling it."""
        yield


def announce(url: str, token: str, generated: bool, what: str = "MCP") -> None:
    """Tell the user (on stderr, never a file or a log record) where to connect and with what."""
    if generated:
        lines = [
            f"localsample: serving {what} at {url}",
            f"localsample: send the header  Authorization: Bearer {token}",
            "localsample: (this token was generated for this run and is shown only here; --token sets your own)",
        ]
    else:
        lines = [f"localsample: serving {what} at {url} (send Authorization: Bearer with your --token value)"]
    stream = sys.stderr
    if stream is not None:
        stream.write("\n".join(lines) + "\n")
        stream.flush()


async def serve_app(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    token: str | None,
    allow_remote: bool,
    extra_hosts: Sequence[str] = (),
    path: str = "/mcp",
    graceful_shutdown: int = GRACEFUL_SHUTDOWN_S,
    what: str = "MCP",
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` behind a :class:`Guard` on ``host:port`` with uvicorn until cancelled.

    Signals are the caller's: cancel this coroutine to stop (e.g. from an
    ``anyio.open_signal_receiver`` loop); the socket is then closed and the app's lifespan
    shut down, within ``graceful_shutdown`` seconds for open connections plus a margin.

    ``token`` is the ``--token`` value, or None to generate one; the token and the URL
    (``path`` on this listener, serving ``what``) are printed once on stderr when the
    socket is bound; ``on_started`` is called after that.
    uvicorn logs through the ``uvicorn`` loggers (the root handler: stderr), without access
    logs. Raises :class:`ServerSpecError` for a refused bind or when listening fails.
    """
    check_bind(host, allow_remote)
    secret, generated = make_token(token)
    allowed = allowed_hosts(host, port, extra_hosts)
    if not is_loopback(host):
        log.warning(
            "listening on %s:%d (--allow-remote): this is plain HTTP, so the token crosses the network in "
            "clear text unless a TLS proxy sits in front",
            host,
            port,
        )
    log.info("Host and Origin headers may name: %s", allowed.describe())
    config = uvicorn_config(Guard(app, token=secret, allowed=allowed), graceful_shutdown, host=host, port=port)
    url = listen_url(host, port, path)

    def started() -> None:
        announce(url, secret, generated, what)
        if on_started is not None:
            on_started()

    await _run_listener(_Listener(config, started), graceful_shutdown)


async def serve_socket(
    app: ASGIApp, sock: socket.socket, *, graceful_shutdown: int = GRACEFUL_SHUTDOWN_S, on_started: Callable[[], None]
) -> None:
    """Serve ``app`` on a socket the caller bound (a Unix socket, whose file permissions
    are the credential: no :class:`Guard`) until cancelled, as :func:`serve_app` does;
    ``on_started`` is called once it accepts connections. The socket is closed on return;
    its file is the caller's to remove."""
    await _run_listener(_Listener(uvicorn_config(app, graceful_shutdown), on_started), graceful_shutdown, [sock])


def uvicorn_config(app: ASGIApp, graceful_shutdown: int, **where: Any) -> uvicorn.Config:
    """uvicorn quiet (our own log lines only, no server header), for ``app`` at ``where``."""
    return uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=graceful_shutdown,
        **where,
    )


async def _run_listener(
    listener: _Listener, graceful_shutdown: int, sockets: list[socket.socket] | None = None
) -> None:
    """Run ``listener`` until cancelled; then close its socket and shut the app down anyway."""
    try:
        await listener.serve(sockets)
    finally:
        if listener.started and not listener.stopping:  # cancelled: close the socket and the app anyway
            with anyio.CancelScope(shield=True), anyio.move_on_after(graceful_shutdown + SHUTDOWN_MARGIN_S):
                await listener.shutdown(sockets)


READ_SIZE = 65536
"""Bytes read from the host's stdin at a time."""


async def host_lines(fd: int = 0) -> AsyncIterator[str]:
    """The host's messages on stdin (``fd``), one line at a time, read on the event loop.

    The SDK's stdio transport reads stdin on a worker thread, which a cancellation cannot
    interrupt: stopping on a signal would wait for the host's next message. Here the loop
    waits until the pipe is readable, so a cancellation stops the read at once. A file
    that cannot be polled (a regular file, /dev/null) never blocks, and is read directly.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        try:
            await anyio.wait_readable(fd)
        except OSError:
            await anyio.lowlevel.checkpoint()
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue
        *lines, pending = (pending + decoder.decode(chunk, final=not chunk)).split("\n")
        for line in lines:
            yield line + "\n"
        if not chunk:
            if pending:
                yield pending
            return
