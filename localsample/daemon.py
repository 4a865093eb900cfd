"""`localsample daemon`: one resident process that owns the models for every host and
serves the OpenAI-compatible API (openai_api.py) on a Unix socket and, with ``--listen``,
on TCP.

The Unix socket ``state_dir/run/daemon.sock`` (mode 0600, in a 0700 directory) always
listens; its file permissions are the credential, so it asks for no token. It alone also
answers ``GET /localsample/status`` and ``POST /localsample/stop`` (how `localsample
daemon stop` asks the daemon to exit): neither is ever served over TCP. A TCP listener sits
behind listen.py's ``Guard`` (bearer token, Host and Origin checks; loopback only unless
``allow_remote``).

One daemon per state directory: it holds an exclusive lock on ``daemon.lock`` (which names
its pid) for its whole life, so a second one fails at once, naming the first, and a socket
file left by one that crashed is replaced. SIGTERM, SIGINT and the stop request end it the
same way: new requests get 503, those in flight are cancelled (and audited so), the
listeners close, the socket file is removed and the models are unloaded. Like `serve`, it
preloads the default model, unloads idle ones after their keep-alive, and publishes what
it has loaded for `localsample ps`.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from localsample.errors import DaemonError
from localsample.listen import serve_app, serve_socket
from localsample.openai_api import OpenAIServer
from localsample.runtime import Runtime
from localsample.settings import Settings, private_dir

log = logging.getLogger(__name__)

__all__ = ["Daemon", "Listen", "daemon_status", "socket_path", "stop_daemon"]

SOCKET_NAME = "daemon.sock"
LOCK_NAME = "daemon.lock"
STATUS_PATH = "/localsample/status"
STOP_PATH = "/localsample/stop"
SOCKET_MODE = 0o600
GRACEFUL_SHUTDOWN_S = 1
"""Seconds the listeners wait for open connections once requests in flight are cancelled."""
STOP_WAIT_S = 10.0
"""How long `localsample daemon stop` waits for the daemon to exit."""
REAP_INTERVAL = 5.0
"""Seconds between checks for idle models whose keep-alive has run out."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SOCKET_URL = "http://localsample"
"""The base URL of requests over the Unix socket (the host name is not looked at)."""


def run_dir(settings: Settings) -> Path:
    """Where running daemons keep their socket, lock and status (as `ps` reads them)."""
    return settings.state_dir / "run"


def socket_path(settings: Settings) -> Path:
    return run_dir(settings) / SOCKET_NAME


@dataclass(frozen=True)
class Listen:
    """``--listen HOST:PORT`` and its options (``token`` None: generate one)."""

    host: str
    port: int
    token: str | None = None
    allow_remote: bool = False
    extra_hosts: tuple[str, ...] = ()


class DaemonLock:
    """An exclusive ``flock`` on ``daemon.lock`` for the daemon's life; the file names its pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, sock: Path) -> None:
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, SOCKET_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonError(
                f"a localsample daemon already runs (pid {holder}, socket {sock})",
                "use that one, or stop it first with `localsample daemon stop`",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def is_locked(path: Path) -> bool:
    """Whether a live daemon holds the lock at ``path``."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def bind_socket(path: Path) -> socket.socket:
    """A listening-ready Unix socket at ``path`` (mode 0600); the caller holds the lock, so
    a file already there is left from a daemon that ended without removing it."""
    private_dir(path.parent)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)  # the directory is 0700 already: nobody else could reach it meanwhile
    except OSError as exc:
        sock.close()
        raise DaemonError(
            f"cannot create the daemon's socket {path}: {exc}",
            "set state_dir (LOCALSAMPLE_STATE_DIR) to a shorter path you can write to: a Unix socket's "
            "path has at most 107 bytes",
        ) from exc
    return sock


class Daemon:
    """The daemon: owns ``runtime`` (and closes it when :meth:`run` returns)."""

    def __init__(self, runtime: Runtime, listen: Listen | None = None) -> None:
        self.runtime = runtime
        self.listen = listen
        self.api = OpenAIServer(runtime)
        self.socket = socket_path(runtime.settings)
        self.stop_requested: anyio.Event | None = None
        self.listening: anyio.Event | None = None
        self.starting = 0  # listeners not bound yet
        self.stopped_by = ""

    async def run(self) -> None:
        """Serve until SIGTERM, SIGINT or a stop request; DaemonError if one runs already."""
        lock = DaemonLock(run_dir(self.runtime.settings) / LOCK_NAME)
        try:
            lock.acquire(self.socket)
            sock = bind_socket(self.socket)
            try:
                await self.serve(sock)
            finally:
                self.socket.unlink(missing_ok=True)
                log.info("stopped (%s)", self.stopped_by or "an error")
        finally:
            self.runtime.close()
            lock.release()

    async def serve(self, sock: socket.socket) -> None:
        self.stop_requested, self.listening = anyio.Event(), anyio.Event()
        self.starting = 1 if self.listen is None else 2
        self.runtime.publishing = True
        local = self.api.app(
            [Route(STATUS_PATH, self.status, methods=["GET"]), Route(STOP_PATH, self.stop, methods=["POST"])]
        )
        async with anyio.create_task_group() as group:
            group.start_soon(self.stop_on_signal)
            group.start_soon(self.keep_models)
            group.start_soon(
                functools.partial(
                    serve_socket, local, sock, graceful_shutdown=GRACEFUL_SHUTDOWN_S, on_started=self.socket_started
                )
            )
            if self.listen is not None:
                group.start_soon(self.serve_tcp, self.listen)
            await self.stop_requested.wait()
            self.api.stop()
            with anyio.move_on_after(GRACEFUL_SHUTDOWN_S):  # let cancelled answers send their end
                await self.api.drained()
            group.cancel_scope.cancel()

    async def serve_tcp(self, listen: Listen) -> None:
        await serve_app(
            self.api.app(),
            listen.host,
            listen.port,
            token=listen.token,
            allow_remote=listen.allow_remote,
            extra_hosts=listen.extra_hosts,
            path="/v1",
            graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            what="the OpenAI-compatible API",
            on_started=self.started,
        )

    def started(self) -> None:
        """A listener is bound (and has said where): once all are, models may load."""
        self.starting -= 1
        if self.starting == 0 and self.listening is not None:
            self.listening.set()

    def socket_started(self) -> None:
        self.started()
        log.info(
            "daemon running (pid %d): the OpenAI-compatible API on the Unix socket %s (base URL %s/v1); "
            "`localsample daemon stop` or Ctrl-C stops it",
            os.getpid(),
            self.socket,
            SOCKET_URL,
        )

    def request_stop(self, why: str) -> None:
        if self.stop_requested is not None and not self.stop_requested.is_set():
            self.stopped_by = why
            log.info("%s: cancelling requests in flight and stopping", why)
            self.stop_requested.set()

    async def stop_on_signal(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async for received in signals:
                self.request_stop(f"{received.name} received")
                return

    async def keep_models(self) -> None:
        """Preload the preload models, then unload idle ones when their keep-alive ends.

        Preloading waits for the listeners: loading a model swaps ``sys.stderr`` for a
        while (engine.py), which would swallow the URL and token announced meanwhile."""
        assert self.listening is not None
        await self.listening.wait()
        try:
            await self.runtime.preload()
        except Exception as exc:  # a model that fails to load must not stop the daemon
            log.error("preloading failed: %s", exc)
        while True:
            await anyio.sleep(REAP_INTERVAL)
            self.runtime.reap()

    def status_json(self) -> dict[str, Any]:
        listen = self.listen
        return {
            "pid": os.getpid(),
            "started": self.runtime.started,
            "socket": str(self.socket),
            "listen": f"{listen.host}:{listen.port}" if listen is not None else None,
            "models": list(self.runtime.pool.status()),
        }

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.status_json())

    async def stop(self, request: Request) -> Response:
        self.request_stop("stop requested over the socket")
        return JSONResponse({**self.status_json(), "stopping": True})


def socket_request(settings: Settings, method: str, path: str) -> dict[str, Any]:
    """A request to the running daemon over its socket; DaemonError if none answers."""
    sock = socket_path(settings)
    fix = "start one with `localsample daemon`"
    if not sock.exists():
        raise DaemonError(f"no localsample daemon runs (no socket at {sock})", fix)
    try:
        with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(sock)), timeout=10.0) as client:
            response = client.request(method, SOCKET_URL + path)
    except httpx2.TransportError as exc:
        raise DaemonError(f"no localsample daemon answers on {sock} ({exc})", fix) from exc
    if response.status_code != 200:
        raise DaemonError(f"the daemon on {sock} answered {method} {path} with {response.status_code}", None)
    data: dict[str, Any] = response.json()
    return data


def daemon_status(settings: Settings) -> dict[str, Any]:
    """What the running daemon reports: pid, socket, listen address, loaded models."""
    return socket_request(settings, "GET", STATUS_PATH)


def stop_daemon(settings: Settings, wait: float = STOP_WAIT_S) -> int:
    """Ask the running daemon to exit and wait until it has; its pid. DaemonError if none
    runs, or if it is still running after ``wait`` seconds."""
    pid = int(socket_request(settings, "POST", STOP_PATH)["pid"])
    lock = run_dir(settings) / LOCK_NAME
    deadline = time.monotonic() + wait
    while is_locked(lock):
        if time.monotonic() > deadline:
            raise DaemonError(f"the daemon (pid {pid}) did not stop within {wait:g} s", f"end it with `kill {pid}`")
        time.sleep(0.05)
    return pid
