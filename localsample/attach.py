"""Clients of a running `localsample daemon`: `serve`, `call`, `sample` and `run` hand their
generation to it instead of loading models themselves.

With the ``daemon`` setting ``auto`` (the default) a command attaches when a daemon answers
on its Unix socket (``state_dir/run/daemon.sock``) and runs everything in-process
otherwise; ``spawn`` starts a daemon, detached, when none runs (it exits after
``daemon_idle_exit`` minutes without clients); ``never`` (``--no-daemon``) always runs
in-process. Attaching is logged once on stderr, naming the socket and the daemon's pid.

:class:`AttachedRuntime` is a ``Runtime`` whose ``answer`` sends the request to the
daemon (attach_api.py describes the protocol: OpenAI's chat completions plus a
``localsample`` block), so selection, limits, generation and audit are the daemon's,
global across hosts, while approval and review are asked here, where the user is: the
daemon sends a question on the request's stream and this side answers it with its own
asker (the terminal, or the host through elicitation). Nothing here imports llama.cpp.

The daemon may go away. A request it was answering fails at once with a ``DaemonError``
(never a hang: the connection closes, or ``SILENCE_LIMIT_S`` passes without a word). The
next request finds the socket gone and, in ``auto``, runs in-process (logged), or
attaches again once a daemon answers; in ``spawn`` it starts a new one first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2

from localsample.daemon_socket import ASK_PATH, ATTACH_PATH, SOCKET_URL, log_path, socket_path
from localsample.errors import DaemonError, EngineError, LocalsampleError, rebuilt
from localsample.generation import Completion, GenerationRequest, OnText, ToolCall
from localsample.openai_request import chat_body
from localsample.policy import Asker, Pending
from localsample.runtime import Answer, Origin, Runtime
from localsample.selection import Choice, Preferences
from localsample.settings import Settings, private_dir

log = logging.getLogger(__name__)

__all__ = ["AttachedRuntime", "client_runtime"]

CONNECT_TIMEOUT_S = 5.0
SILENCE_LIMIT_S = 600.0
"""The longest the daemon may stay silent while answering one request (a queue wait, a
large model's load and a person's answer included): past it the request fails."""
SPAWN_WAIT_S = 30.0
"""How long ``daemon = "spawn"`` waits for the daemon it started to answer."""
STATUS_ERRORS: dict[int, str] = {
    400: "RequestError",
    403: "RejectedError",
    404: "UnknownModelError",
    429: "RateLimitError",
    503: "BusyError",
}
"""An HTTP error status before the stream started, as the error class it stands for."""


class DaemonGone(Exception):
    """Nothing answers on the socket: the request was not sent (so it may go elsewhere)."""


def transport(sock: Path) -> httpx2.AsyncHTTPTransport:
    # No TLS on a Unix socket: verify=False skips building an SSL context (~40 ms).
    return httpx2.AsyncHTTPTransport(uds=str(sock), verify=False)


def attach(settings: Settings, command: str, server: str | None) -> int | None:
    """Register this process with the daemon on the socket; the daemon's pid, or None when
    none answers."""
    sock = socket_path(settings)
    if not sock.exists():
        return None
    body = {"pid": os.getpid(), "command": command, "server": server}
    try:
        with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(sock), verify=False), timeout=5.0) as http:
            response = http.post(SOCKET_URL + ATTACH_PATH, json=body)
        return int(response.json()["pid"]) if response.status_code == 200 else None
    except (httpx2.HTTPError, ValueError, KeyError, TypeError):
        return None


def spawn(settings: Settings) -> None:
    """Start a daemon, detached (its own session, its log in ``state_dir/run``), that exits
    after ``daemon_idle_exit`` minutes without clients; wait until its socket exists."""
    log_file = log_path(settings)
    private_dir(log_file.parent)
    command = [sys.executable, "-m", "localsample", "daemon", "--idle-exit", f"{settings.daemon_idle_exit:g}"]
    with open(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + SPAWN_WAIT_S
    while not socket_path(settings).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"it exited with status {process.returncode}" if process.returncode is not None else "it is slow"
            raise DaemonError(
                f"the localsample daemon started for daemon = spawn did not come up ({why}; log: {log_file})",
                "read its log, or start one yourself with `localsample daemon`",
            )
        time.sleep(0.05)


def client_runtime(settings: Settings, command: str, server: str | None = None) -> Runtime:
    """The runtime a client command uses: attached to the running daemon when the
    ``daemon`` setting allows and one answers (``spawn``: after starting one), else
    in-process."""
    if settings.daemon == "never":
        return Runtime(settings)
    pid = attach(settings, command, server)
    if pid is None and settings.daemon == "spawn":
        try:
            spawn(settings)
            pid = attach(settings, command, server)
        except DaemonError as exc:
            log.warning("%s; generating in-process", exc.one_line())
    if pid is None:
        return Runtime(settings)
    log.info("attached to the localsample daemon (pid %d, socket %s)", pid, socket_path(settings))
    return AttachedRuntime(settings, command, server, pid)


def completion_of(data: dict[str, Any]) -> Completion:
    """A ``Completion`` from the daemon's ``answer`` event (fields it has and this version
    does not know are left out)."""
    known = {f.name for f in dataclasses.fields(Completion)}
    calls = tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in data.get("tool_calls") or ())
    fields = {key: value for key, value in data.items() if key in known and key != "tool_calls"}
    return Completion(**fields, tool_calls=calls)


def status_error(status: int, body: bytes) -> LocalsampleError:
    """An error response before the stream began, as the error it stands for."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:300] or f"HTTP {status}"
    return rebuilt(STATUS_ERRORS.get(status, "EngineError"), f"the daemon refused the request: {message}", None)


class AttachedRuntime(Runtime):
    """A ``Runtime`` that answers through the daemon (see the module's docstring); it falls
    back on its own in-process pipeline while no daemon answers."""

    def __init__(self, settings: Settings, command: str, server: str | None, daemon_pid: int) -> None:
        super().__init__(settings)
        self.command = command
        self.server = server
        self.daemon_pid: int | None = daemon_pid
        self.socket = socket_path(settings)
        self.said_in_process = False
        self.http: httpx2.AsyncClient | None = None
        self.http_loop: asyncio.AbstractEventLoop | None = None
        """Whether the fall back on in-process generation was logged (once until attached again)."""

    @property
    def attached(self) -> bool:
        return self.daemon_pid is not None

    def where(self) -> str:
        return f"pid {self.daemon_pid}, socket {self.socket}"

    async def answer(
        self,
        request: GenerationRequest,
        origin: Origin,
        *,
        prefs: Preferences | None = None,
        model: str | None = None,
        ask: Asker | None = None,
        on_text: OnText | None = None,
        choice: Choice | None = None,
    ) -> Answer:
        if not self.attached:
            await self.reattach()
        if self.attached:
            try:
                return await self.remote(request, origin, prefs, model, ask, on_text, choice)
            except DaemonGone:
                log.warning("the localsample daemon (%s) is gone: generating in-process", self.where())
                self.daemon_pid, self.said_in_process = None, True
        if not self.said_in_process:
            log.warning("no localsample daemon answers on %s: generating in-process", self.socket)
            self.said_in_process = True
        return await super().answer(request, origin, prefs=prefs, model=model, ask=ask, on_text=on_text, choice=choice)

    async def reattach(self) -> None:
        """Attach again if a daemon answers now (``spawn``: start one first)."""
        settings = self.settings
        pid = await anyio.to_thread.run_sync(attach, settings, self.command, self.server)
        if pid is None and settings.daemon == "spawn":
            try:
                await anyio.to_thread.run_sync(spawn, settings)
                pid = await anyio.to_thread.run_sync(attach, settings, self.command, self.server)
            except DaemonError as exc:
                log.warning("%s; generating in-process", exc.one_line())
        if pid is not None:
            self.daemon_pid, self.said_in_process = pid, False
            log.info("attached again to the localsample daemon (%s)", self.where())

    def client(self) -> httpx2.AsyncClient:
        """The HTTP client for the daemon's socket: one per event loop, so that requests reuse
        their connections (a new client and connection per request cost ~1.5 ms)."""
        loop = asyncio.get_running_loop()
        if self.http is None or self.http_loop is not loop:
            timeout = httpx2.Timeout(SILENCE_LIMIT_S, connect=CONNECT_TIMEOUT_S)
            self.http, self.http_loop = httpx2.AsyncClient(transport=transport(self.socket), timeout=timeout), loop
        return self.http

    async def forget_client(self) -> None:
        if self.http is not None and self.http_loop is asyncio.get_running_loop():
            await self.http.aclose()
        self.http = None

    async def aclose(self) -> None:
        await super().aclose()  # first: nothing before it awaits, so a cancellation cannot skip it
        with anyio.CancelScope(shield=True):
            await self.forget_client()

    async def remote(
        self,
        request: GenerationRequest,
        origin: Origin,
        prefs: Preferences | None,
        model: str | None,
        ask: Asker | None,
        on_text: OnText | None,
        choice: Choice | None,
    ) -> Answer:
        """The request answered by the daemon; DaemonGone when it was never sent."""
        prefs = prefs or Preferences()
        body = chat_body(request, model or (choice.model.id if choice else "auto"))
        body["stream"] = True
        body["localsample"] = {
            "server": origin.server,
            "request_id": origin.request_id,
            "protocol": origin.protocol,
            "via": origin.via,
            "hints": list(prefs.hints),
            "cost": prefs.cost,
            "speed": prefs.speed,
            "intelligence": prefs.intelligence,
            "model": model,
            "choice": {"model": choice.model.id, "reason": choice.reason} if choice else None,
            "ask": ask is not None and ask.available(),
            "text": on_text is not None,
        }
        try:
            try:
                async with self.client().stream("POST", SOCKET_URL + "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        raise status_error(response.status_code, await response.aread())
                    return await self.events(response, request, origin, ask, on_text)
            except (httpx2.ConnectError, FileNotFoundError, ConnectionRefusedError) as exc:
                await self.forget_client()
                raise DaemonGone(str(exc)) from exc
        except httpx2.TimeoutException as exc:
            raise DaemonError(
                f"the localsample daemon ({self.where()}) said nothing for {SILENCE_LIMIT_S:g} s while answering",
                "see its log; `localsample ps` shows what it is doing",
            ) from exc
        except httpx2.TransportError as exc:
            gone = DaemonError(
                f"the localsample daemon ({self.where()}) went away while answering ({type(exc).__name__})",
                "its log says why; the next request attaches again, or generates in-process",
            )
            self.daemon_pid = None  # the next request looks again
            await self.forget_client()
            raise gone from exc

    async def events(
        self,
        response: httpx2.Response,
        request: GenerationRequest,
        origin: Origin,
        ask: Asker | None,
        on_text: OnText | None,
    ) -> Answer:
        """Read the stream: text to ``on_text``, questions to ``ask`` (answered while the
        stream is read on, so a question the daemon stopped waiting for does not block),
        the answer or the error last."""
        result: Answer | LocalsampleError | None = None
        failure: Exception | None = None
        async with anyio.create_task_group() as asking:
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:]).get("localsample") or {}
                    if "text" in event and on_text is not None:
                        await on_text(event["text"], int(event["tokens"]))
                    elif "ask" in event and ask is not None:
                        asking.start_soon(self.reply, event["ask"], request, origin, ask)
                    elif "answer" in event:
                        result = Answer(completion_of(event["answer"]), str(event["reason"]))
                    elif "error" in event:
                        error = event["error"]
                        result = rebuilt(str(error["kind"]), str(error["problem"]), error.get("fix"))
            except Exception as exc:  # raised below, outside the task group (not in an exception group)
                failure = exc
            asking.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if isinstance(result, LocalsampleError):
            raise result
        if result is None:
            raise EngineError(
                f"the localsample daemon ({self.where()}) ended its answer without a result",
                "see its log; a daemon and client of different localsample versions may not understand each other",
            )
        return result

    async def reply(self, question: dict[str, Any], request: GenerationRequest, origin: Origin, ask: Asker) -> None:
        """Ask the user here and send the answer back to the daemon."""
        asked = dataclasses.replace(request, max_tokens=int(question["max_tokens"]))
        pending = Pending(origin.server, str(question["model"]), str(question["reason"]), asked)
        if question["kind"] == "review":
            answer: dict[str, Any] = {"text": await ask.review(pending, str(question["response"]))}
        else:
            decision = await ask.approve(pending)
            edited = chat_body(decision.request, "edited") if decision.request is not None else None
            answer = {
                "approved": decision.approved,
                "by": decision.by,
                "reason": decision.reason,
                "human": decision.human,
                "request": edited,
            }
        try:
            await self.client().post(SOCKET_URL + ASK_PATH.format(ask_id=question["id"]), json=answer)
        except httpx2.HTTPError as exc:  # the request's own stream reports what became of the daemon
            log.warning("%s: the answer to the daemon's question was not delivered: %s", origin.server, exc)

    async def preload(self) -> None:
        if not self.attached:  # the daemon preloads its own
            await super().preload()

    def reap(self) -> None:
        if not self.attached:
            super().reap()
