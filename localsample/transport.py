"""Transports to downstream servers that answer malformed JSON-RPC instead of dropping it.

The SDK's stdio transport parses each line a server writes and, when a line is not a
valid JSON-RPC message, logs a traceback and drops it: the server waits forever for a
reply that never comes. :class:`StdioTransport` runs the server itself and checks every
line first (:func:`localsample.messages.read_message`). A well-formed message goes to the SDK untouched; a
malformed request is answered at once, as JSON-RPC 2.0 says:

- ``-32700`` (parse error, ``"id": null``) for a line that is not JSON or nests too deeply;
- ``-32600`` (invalid request) for a bad ``jsonrpc``, ``id`` or ``params`` shape, echoing
  the id when it is usable (an integer or a string), else ``null``;
- ``-32602`` (invalid params) for a lone UTF-16 surrogate in ``params``.

Each malformed message costs one log line that names the server, and the connection stays
open. A malformed *response* fails the request it answers (when its id can be read), so
the caller sees an error instead of waiting. Streamable HTTP servers get the same
checks and answers (``transport_http.py``, built on :class:`GuardedTransport`).

Both transports also bound the connect (``connect_timeout``: a server that never answers
``initialize`` or ``server/discover`` closes the connection instead of hanging it), and
the stdio one keeps the last lines the server wrote to stderr (still passed through to
our own stderr as they come) so that errors can show why a server stopped.
"""

from __future__ import annotations

import codecs
import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream
from mcp.client.stdio import (
    FORCE_KILL_TIMEOUT,
    PROCESS_TERMINATION_TIMEOUT,
    StdioServerParameters,
    get_default_environment,
)
from mcp.os.posix.utilities import terminate_posix_process_tree
from mcp.shared.message import SessionMessage

from localsample.messages import read_message

log = logging.getLogger(__name__)

TransportStreams = tuple[
    anyio.abc.ObjectReceiveStream[SessionMessage | Exception], anyio.abc.ObjectSendStream[SessionMessage]
]

STDERR_TAIL_LINES = 20
"""How many of a server's last stderr lines errors can show."""
STDERR_LINE_CHARS = 500
"""Longer stderr lines are cut to this many characters in the kept tail."""
REPLY_TIMEOUT = 5.0
"""Seconds an error reply to a malformed request may wait for the server's stdin."""
FLUSH_TIMEOUT = 0.5
"""Seconds the writer may take to flush accepted messages at shutdown."""
REAP_TIMEOUT = 2.0
"""Seconds to wait for a killed server to be reaped."""
STDERR_EOF_TIMEOUT = 1.0
"""Seconds to wait, once the server has exited, for the rest of its stderr."""
EXIT_POLL_INTERVAL = 0.01


class ConnectWatch:
    """Closes a connection that has not finished connecting in time.

    The transport starts :meth:`run` in its task group; the client calls :meth:`connected`
    once its handshake is done. If that has not happened after ``timeout`` seconds,
    ``close`` runs (it ends the stream the SDK reads, so every pending request fails with
    "connection closed") and :attr:`timed_out` is set.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.timed_out = False
        self.done = False
        self.scope: anyio.CancelScope | None = None

    def connected(self) -> None:
        self.done = True
        if self.scope is not None:
            self.scope.cancel()

    async def run(self, close: MemoryObjectSendStream[Any]) -> None:
        if self.timeout is None or self.done:
            return
        with anyio.CancelScope() as self.scope:
            await anyio.sleep(self.timeout)
            self.timed_out = True
            close.close()


class StderrTail:
    """Passes a server's stderr through to ours as it comes, keeping its last lines.

    The bytes go to file descriptor ``out`` (2: where a server started by the host would
    have written), not through ``sys.stderr``, which code may swap for a while (a
    ``redirect_stderr`` in another thread would swallow them).
    """

    def __init__(self, lines: int = STDERR_TAIL_LINES, out: int | None = 2) -> None:
        self.keep = lines
        self.out = out
        self.lines: deque[str] = deque(maxlen=lines)
        self.partial = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes, *, final: bool = False) -> None:
        if self.out is not None and chunk:
            write_all(self.out, chunk)
        text = self.decoder.decode(chunk, final=final)
        pieces = (self.partial + text).split("\n")
        self.partial = pieces.pop()[:STDERR_LINE_CHARS]
        self.lines.extend(piece.rstrip("\r")[:STDERR_LINE_CHARS] for piece in pieces)

    def tail(self) -> list[str]:
        """The last lines written (a last line without its newline included), blank ones dropped."""
        lines = [*self.lines, self.partial] if self.partial else list(self.lines)
        return [line for line in lines if line.strip()][-self.keep :]

    async def relay(self, stream: anyio.abc.ByteReceiveStream, done: anyio.Event) -> None:
        """Read ``stream`` to its end; ``done`` is set then."""
        try:
            async for chunk in stream:
                self.feed(chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass
        finally:
            self.feed(b"", final=True)
            done.set()


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd``; give up quietly if it is closed, broken or would block."""
    view = memoryview(data)
    with suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]


class Transport(AbstractAsyncContextManager[TransportStreams]):
    """A transport the SDK's Client enters: ``open()`` yields its streams."""

    context: AbstractAsyncContextManager[TransportStreams] | None = None

    def open(self) -> AbstractAsyncContextManager[TransportStreams]:
        raise NotImplementedError

    async def __aenter__(self) -> TransportStreams:
        self.context = self.open()
        return await self.context.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self.context is not None, "the transport was not entered"
        return await self.context.__aexit__(*exc_info)


class StdioTransport(Transport):
    """Runs a server over stdio, checking every line it writes (see the module docstring).

    Used as the ``server`` of an ``mcp.Client`` (any async context manager yielding the two
    streams is a transport to it). Single use.
    """

    def __init__(self, params: StdioServerParameters, *, name: str, connect_timeout: float | None = None) -> None:
        self.params = params
        self.name = name
        self.watch = ConnectWatch(connect_timeout)
        self.stderr = StderrTail()
        self.returncode: int | None = None

    def stderr_tail(self) -> list[str]:
        return self.stderr.tail()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TransportStreams]:
        params = self.params
        process = await anyio.open_process(
            [params.command, *params.args],
            env=get_default_environment() | (params.env or {}),
            cwd=params.cwd,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        # No awaits until the task group is entered, or a cancellation could leak the process.
        to_session, session_reads = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        session_writes, from_session = anyio.create_memory_object_stream[SessionMessage](0)
        replies = session_writes.clone()
        writer_done, stderr_done = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(self.read_stdout, process, to_session, replies)
            group.start_soon(self.write_stdin, process, from_session, to_session, writer_done)
            assert process.stderr is not None
            group.start_soon(self.stderr.relay, process.stderr, stderr_done)
            group.start_soon(self.watch.run, to_session)
            try:
                yield session_reads, session_writes
            finally:
                with anyio.CancelScope(shield=True):  # every wait inside is bounded
                    session_reads.close()
                    session_writes.close()
                    replies.close()
                    with anyio.move_on_after(FLUSH_TIMEOUT):
                        await writer_done.wait()
                    self.returncode = await stop_process(process)
                    with anyio.move_on_after(STDERR_EOF_TIMEOUT):
                        await stderr_done.wait()
                    for stream in (process.stdout, process.stderr):
                        if stream is not None:
                            with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                                await stream.aclose()
                group.cancel_scope.cancel()

    async def read_stdout(
        self,
        process: anyio.abc.Process,
        to_session: MemoryObjectSendStream[SessionMessage | Exception],
        replies: anyio.abc.ObjectSendStream[SessionMessage],
    ) -> None:
        """Split stdout into lines and pass each on, answered, or failed (see ``deliver``)."""
        assert process.stdout is not None
        pending: list[bytes] = []
        try:
            async with to_session:
                async for chunk in process.stdout:
                    start = 0
                    while (end := chunk.find(b"\n", start)) != -1:
                        pending.append(chunk[start:end])
                        line = b"".join(pending)
                        pending.clear()
                        start = end + 1
                        await self.deliver(line, to_session, replies)
                    if start < len(chunk):
                        pending.append(chunk[start:])
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            pass  # the session or the pipe is gone: shutdown takes over
        # The session is gone: keep reading, so a server still writing is not blocked on a full pipe.
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            async for _ in process.stdout:
                pass

    async def deliver(
        self,
        line: bytes,
        to_session: MemoryObjectSendStream[SessionMessage | Exception],
        replies: anyio.abc.ObjectSendStream[SessionMessage],
    ) -> None:
        if not line.strip():
            return
        verdict = read_message(line)
        if isinstance(verdict, SessionMessage):
            await to_session.send(verdict)
            return
        log.warning(verdict.log_line(self.name))
        if verdict.kind == "response" and verdict.ident is not None:
            await to_session.send(verdict.failure(self.name))
        elif verdict.kind == "request":
            with anyio.move_on_after(REPLY_TIMEOUT) as scope:
                await replies.send(verdict.reply())
            if scope.cancelled_caught:
                log.warning("server '%s' did not read our error reply in time; dropped it", self.name)

    async def write_stdin(
        self,
        process: anyio.abc.Process,
        from_session: anyio.abc.ObjectReceiveStream[SessionMessage],
        to_session: MemoryObjectSendStream[SessionMessage | Exception],
        done: anyio.Event,
    ) -> None:
        assert process.stdin is not None
        encoding, errors = self.params.encoding, self.params.encoding_error_handler
        try:
            async with from_session:
                async for item in from_session:
                    text = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await process.stdin.send((text + "\n").encode(encoding, errors=errors))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The server stopped reading: end the session's stream so no request waits forever.
            to_session.close()
        finally:
            done.set()


async def stop_process(process: anyio.abc.Process) -> int | None:
    """Close the server's stdin, give it time to exit, then end its whole process group.

    Returns its exit status (``None`` if it survived even the kill). Every wait is bounded.
    """
    if process.stdin is not None:
        with suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await process.stdin.aclose()
    if not await wait_exit(process, PROCESS_TERMINATION_TIMEOUT):
        if sys.platform == "win32":  # pragma: no cover
            process.kill()
        else:
            await terminate_posix_process_tree(process, FORCE_KILL_TIMEOUT)
        if not await wait_exit(process, REAP_TIMEOUT):
            log.warning("server process %d is still alive after a kill; leaving it", process.pid)
    return process.returncode


async def wait_exit(process: anyio.abc.Process, timeout: float) -> bool:
    """Whether the process exits within ``timeout`` seconds (polled: ``wait()`` also waits
    for pipes a grandchild may hold open)."""
    with anyio.move_on_after(timeout):
        while process.returncode is None:
            await anyio.sleep(EXIT_POLL_INTERVAL)
    return process.returncode is not None


class GuardedTransport(Transport):
    """Another SDK transport (Streamable HTTP) with a bounded connect.

    Items pass through one relay task; an error the SDK puts in the stream (a message it
    could not parse; it logs its own details) becomes one log line naming the server.
    Subclasses that build the inner transport themselves override :meth:`connect`.
    """

    def __init__(
        self,
        inner: AbstractAsyncContextManager[Any] | None,
        *,
        name: str,
        connect_timeout: float | None = None,
    ) -> None:
        self.inner = inner
        self.name = name
        self.watch = ConnectWatch(connect_timeout)

    def stderr_tail(self) -> list[str]:
        return []

    def connect(self) -> AbstractAsyncContextManager[Any]:
        """The inner transport, entered once by :meth:`open`."""
        assert self.inner is not None, "no inner transport"
        return self.inner

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TransportStreams]:
        async with self.connect() as (reads, writes):
            to_session, session_reads = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            async with anyio.create_task_group() as group:
                group.start_soon(self.relay, reads, to_session)
                group.start_soon(self.watch.run, to_session)
                try:
                    yield session_reads, writes
                finally:
                    session_reads.close()
                    group.cancel_scope.cancel()

    async def relay(
        self,
        reads: anyio.abc.ObjectReceiveStream[SessionMessage | Exception],
        to_session: MemoryObjectSendStream[SessionMessage | Exception],
    ) -> None:
        with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async with to_session:
                async for item in reads:
                    if isinstance(item, Exception):
                        log.warning("server '%s' sent a message that is not valid JSON-RPC; ignored it", self.name)
                        continue
                    await to_session.send(item)
