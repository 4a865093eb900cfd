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
listeners close, the socket file is removed and the models are unloaded. A second signal
during that stop cuts short the wait for answers to send their end (``DRAIN_S``); the
signals stay handled until the daemon has exited, so none kills it half-stopped. Like
`serve`, it preloads the default model, unloads idle ones after their keep-alive, and publishes what
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from localsample.attach_api import AttachedClients
from localsample.daemon_socket import (
    ATTACH_PATH,
    LOCK_NAME,
    SOCKET_MODE,
    SOCKET_URL,
    STATUS_PATH,
    STOP_PATH,
    run_dir,
    socket_path,
)
from localsample.errors import DaemonError
from localsample.listen import serve_app, serve_socket
from localsample.openai_api import OpenAIServer
from localsample.runtime import Runtime
from localsample.settings import private_dir

log = logging.getLogger(__name__)

__all__ = ["Daemon", "Listen"]

GRACEFUL_SHUTDOWN_S = 1
"""Seconds the listeners wait for open connections once requests in flight are cancelled."""
DRAIN_S = 5.0
"""How long a stopping daemon waits for cancelled answers to send their closing events
(they take milliseconds; a loaded machine took over a second once). A request whose body
is still arriving holds the wait to its end; a second signal cuts it short."""
REAP_INTERVAL = 5.0
"""Seconds between checks for idle models whose keep-alive has run out."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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

    def __init__(self, runtime: Runtime, listen: Listen | None = None, idle_exit: float | None = None) -> None:
        self.runtime = runtime
        self.listen = listen
        self.idle_exit = idle_exit
        """Minutes without attached clients or requests after which the daemon exits (None: never)."""
        self.api = OpenAIServer(runtime)
        self.clients = AttachedClients()
        self.socket = socket_path(runtime.settings)
        self.stop_requested: anyio.Event | None = None
        self.listening: anyio.Event | None = None
        self.starting = 0  # listeners not bound yet
        self.stopped_by = ""
        self.draining: anyio.CancelScope | None = None  # the wait for answers to send their end

    async def run(self) -> None:
        """Serve until SIGTERM, SIGINT or a stop request; DaemonError if one runs already."""
        lock = DaemonLock(run_dir(self.runtime.settings) / LOCK_NAME)
        # Handled from here to the end: a signal during the stop must not kill the daemon
        # before it has removed its socket and unloaded its models.
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            try:
                lock.acquire(self.socket)
                sock = bind_socket(self.socket)
                try:
                    await self.serve(sock, signals)
                finally:
                    self.socket.unlink(missing_ok=True)
                    log.info("stopped (%s)", self.stopped_by or "an error")
            finally:
                self.runtime.close()
                lock.release()

    async def serve(self, sock: socket.socket, signals: AsyncIterator[signal.Signals]) -> None:
        self.stop_requested, self.listening = anyio.Event(), anyio.Event()
        self.draining = anyio.CancelScope()
        self.starting = 1 if self.listen is None else 2
        self.runtime.publishing = self.runtime.status_served = True
        local = self.api.app(
            [
                Route(STATUS_PATH, self.status, methods=["GET"]),
                Route(STOP_PATH, self.stop, methods=["POST"]),
                Route(ATTACH_PATH, self.clients.attach, methods=["POST"]),
            ]
        )
        async with anyio.create_task_group() as group:
            group.start_soon(self.stop_on_signal, signals)
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
            self.draining.deadline = anyio.current_time() + DRAIN_S
            with self.draining:  # let cancelled answers send their end
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

    async def stop_on_signal(self, signals: AsyncIterator[signal.Signals]) -> None:
        """The first signal stops the daemon; another, while it stops, stops it sooner."""
        async for received in signals:
            if self.stop_requested is not None and self.stop_requested.is_set():
                self.hurry_stop(f"{received.name} received again")
            else:
                self.request_stop(f"{received.name} received")

    def hurry_stop(self, why: str) -> None:
        if self.draining is not None and not self.draining.cancel_called:
            log.info("%s: stopping now, without waiting for answers in flight to send their end", why)
            self.draining.cancel()

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
            self.exit_when_idle()

    def exit_when_idle(self) -> None:
        """With ``idle_exit`` (a daemon started by ``daemon = "spawn"``): stop once no client has
        been attached and no request open for that many minutes."""
        if self.idle_exit is None:
            return
        if self.clients.live() or self.api.in_flight:
            self.clients.last_seen = time.monotonic()
            return
        if time.monotonic() - self.clients.last_seen >= self.idle_exit * 60:
            self.request_stop(f"no clients for {self.idle_exit:g} minutes (daemon_idle_exit)")

    def status_json(self) -> dict[str, Any]:
        listen = self.listen
        return {
            "pid": os.getpid(),
            "started": self.runtime.started,
            "socket": str(self.socket),
            "listen": f"{listen.host}:{listen.port}" if listen is not None else None,
            "models": self.models_status(),
            "requests": len(self.api.in_flight),
            "clients": self.clients.status(),
        }

    def models_status(self) -> list[dict[str, Any]]:
        """The pool's status of each loaded model, with its requests running and queued and,
        for the llama.cpp engine, its batch counters (widest step: most requests decoded
        together, the evidence that requests from several hosts share steps)."""
        residents = {resident.model.id: resident for resident in self.runtime.pool.loaded()}
        models = list(self.runtime.pool.status())
        for model in models:
            resident = residents[model["id"]]
            running = resident.generator.running
            model["running"], model["queued"] = running, max(resident.in_flight - running, 0)
            batcher = getattr(resident.generator, "batcher", None)  # the llama.cpp engine's scheduler
            if batcher is not None:
                model["widest_step"], model["tokens_generated"] = batcher.widest_step, batcher.tokens_generated
        return models

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.status_json())

    async def stop(self, request: Request) -> Response:
        self.request_stop("stop requested over the socket")
        return JSONResponse({**self.status_json(), "stopping": True})
