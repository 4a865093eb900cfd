"""`serve` when downstream servers fail to start or go away, and when it is told to stop.

- A server that cannot connect (never answers, command not found) is left out with one
  log line; the host is served by the others.
- A server that crashes later is dropped from the host's lists, and the host is told
  that its lists changed; a call to its tools gets a clear error at once.
- SIGTERM or SIGINT mid-generation cancels the generation, audits the request as
  cancelled, removes the status file and exits promptly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client, StdioServerParameters, types
from mcp.client.session import IncomingMessage
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from localsample.client import ServerSpec
from localsample.listen import host_lines
from localsample.proxy import Proxy
from localsample.settings import load_settings

from .conftest import fake_runtime

pytestmark = pytest.mark.anyio

SERVERS = Path(__file__).parent / "servers"
DOWNSTREAM = f"{sys.executable} {SERVERS / 'sampling_server.py'}"
SILENT = f"{sys.executable} {SERVERS / 'silent_server.py'}"
LONG_TEXT = "Write a long essay about the history of computing, with ten sections."
"""A prompt the default model answers at length (greedy: about 600 tokens, seconds of work)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def serve_command(*servers: str, protocol: str = "auto") -> list[str]:
    command = [sys.executable, "-m", "localsample", "serve", "--protocol", protocol]
    for server in servers:
        command += ["--server", server]
    return command


@asynccontextmanager
async def host(*servers: str, errlog: TextIO, on_message: Any = None) -> AsyncIterator[Client]:
    """A host (SDK client, initialize handshake) talking to `serve` started with ``servers``;
    serve's stderr goes to ``errlog``."""
    command = serve_command(*servers)
    # env: the SDK gives a stdio child only a minimal environment unless told.
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    transport = stdio_client(params, errlog=errlog)
    async with Client(transport, mode="legacy", message_handler=on_message, cache=None) as client:
        yield client


# -- reading the host's stdin ------------------------------------------------------------


async def test_the_hosts_stdin_is_read_line_by_line(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        lines = host_lines(read_end)
        os.write(write_end, b'{"a": 1}\n{"b": "\xc3')
        with anyio.fail_after(5):
            assert await anext(lines) == '{"a": 1}\n'
            os.write(write_end, b'\xa9"}\n{"c"')
            assert await anext(lines) == '{"b": "é"}\n'
            os.close(write_end)
            write_end = -1
            assert [line async for line in lines] == ['{"c"']
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


async def test_a_read_that_waits_for_the_host_stops_at_once_when_cancelled() -> None:
    """The SDK's own reader blocks a worker thread until the host's next line: a signal
    could not stop `serve` while the host was quiet."""
    read_end, write_end = os.pipe()
    try:
        started = time.monotonic()
        with anyio.fail_after(5), anyio.move_on_after(0.2) as waiting:
            await anext(host_lines(read_end))
        assert waiting.cancelled_caught
        assert time.monotonic() - started < 2
    finally:
        os.close(read_end)
        os.close(write_end)


# -- servers that fail to connect --------------------------------------------------------


@pytest.mark.slow
async def test_a_server_that_never_answers_is_left_out_and_the_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = fake_runtime(load_settings())
    specs = [ServerSpec.parse(f"silent={SILENT}"), ServerSpec.parse(f"good={DOWNSTREAM}")]
    proxy = Proxy(runtime, specs, connect_timeout=5.0)  # time enough for the good one to start
    seen: dict[str, Any] = {}

    async def run_host() -> None:
        async with Client(proxy.server, mode="legacy") as client:
            seen["tools"] = {t.name for t in (await client.list_tools()).tools}
            seen["echo"] = await client.call_tool("echo", {"text": "hi"})

    caplog.set_level(logging.INFO, logger="localsample")
    try:
        with anyio.fail_after(30):
            await proxy.serve(run_host)
    finally:
        runtime.close()
    assert {"echo", "write", "push"} <= seen["tools"]
    assert seen["echo"].content[0].text == "hi"
    about_silent = [r for r in caplog.records if "'silent'" in r.getMessage()]
    assert len(about_silent) == 1, [r.getMessage() for r in about_silent]
    assert about_silent[0].levelno == logging.ERROR
    assert "within 5 s" in about_silent[0].getMessage()


@pytest.mark.slow
async def test_a_server_whose_command_is_missing_is_left_out_with_one_log_line(tmp_path: Path) -> None:
    stderr = tmp_path / "serve.stderr"
    with stderr.open("w") as errlog:
        async with host("broken=no-such-program-xyz --flag", DOWNSTREAM, errlog=errlog) as client:
            with anyio.fail_after(60):
                tools = {t.name for t in (await client.list_tools()).tools}
                echoed = await client.call_tool("echo", {"text": "still served"})
    assert {"echo", "write"} <= tools
    assert echoed.content[0].text == "still served"  # type: ignore[union-attr]
    about_broken = [line for line in stderr.read_text().splitlines() if "'broken'" in line]
    assert len(about_broken) == 1, about_broken
    assert "command not found: no-such-program-xyz" in about_broken[0]


# -- a server that goes away -------------------------------------------------------------


@pytest.mark.slow
async def test_after_one_server_crashes_the_host_gets_the_others_lists(tmp_path: Path) -> None:
    changed: list[str] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(
            message,
            types.ToolListChangedNotification
            | types.PromptListChangedNotification
            | types.ResourceListChangedNotification,
        ):
            changed.append(message.method)

    with (tmp_path / "serve.stderr").open("w") as errlog:
        async with host(f"one={DOWNSTREAM}", f"two={DOWNSTREAM}", errlog=errlog, on_message=on_message) as client:
            with anyio.fail_after(60):
                before = {t.name for t in (await client.list_tools()).tools}
                assert {"one__crash", "two__crash", "one__echo", "two__echo"} <= before
                with pytest.raises(MCPError, match="closed the connection"):
                    await client.call_tool("one__crash", {})

                after = {t.name for t in (await client.list_tools()).tools}
                prompts = [p.name for p in (await client.list_prompts()).prompts]
                resources = [str(r.uri) for r in (await client.list_resources()).resources]
                while len(changed) < 3:
                    await anyio.sleep(0.05)
                echoed = await client.call_tool("two__echo", {"text": "z"})  # a name the host already knows
            with anyio.fail_after(5), pytest.raises(MCPError) as dead:
                await client.call_tool("one__echo", {"text": "x"})
    assert {"echo", "crash", "write"} <= after
    assert not any(name.startswith(("one__", "two__")) for name in after)
    assert prompts == ["haiku"]
    assert resources == ["note://greeting"]
    assert sorted(changed) == [
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/tools/list_changed",
    ]
    assert echoed.content[0].text == "z"  # type: ignore[union-attr]
    assert "'one' is not available" in str(dead.value)


# -- stopping on a signal ----------------------------------------------------------------


class RawHost:
    """A host that speaks JSON-RPC lines to a `serve` process it started itself (so that a
    test can signal that process and time its exit)."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.input = process.stdin
        self.output = BufferedByteReceiveStream(process.stdout)

    async def send(self, message: dict[str, Any]) -> None:
        await self.input.send(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

    async def reply(self, ident: int) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(await self.output.receive_until(b"\n", 1 << 24))
            if message.get("id") == ident:
                return message

    async def start(self) -> None:
        """The initialize handshake."""
        client = {"name": "test-host", "version": "0"}
        await self.send(
            {
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client},
            }
        )
        assert "result" in await self.reply(1)
        await self.send({"method": "notifications/initialized"})


async def wait_for_line(path: Path, text: str) -> None:
    while text not in path.read_text(errors="replace"):
        await anyio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_mid_generation_cancels_it_cleans_up_and_exits(
    model_dir: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    stderr = tmp_path / "serve.stderr"
    env = dict(os.environ) | {"LOCALSAMPLE_LOG_LEVEL": "debug"}  # the debug line says when generation starts
    with stderr.open("w") as errlog:
        process = await anyio.open_process(serve_command(DOWNSTREAM, protocol="legacy"), env=env, stderr=errlog)
        try:
            raw = RawHost(process)
            with anyio.fail_after(120):
                await raw.start()
                arguments = {"text": LONG_TEXT, "max_tokens": 2000}
                await raw.send({"id": 2, "method": "tools/call", "params": {"name": "push", "arguments": arguments}})
                await wait_for_line(stderr, "loaded smollm2-135m-instruct")
                await wait_for_line(stderr, "model smollm2-135m-instruct:")
            await anyio.sleep(0.5)  # into the generation
            status = Path(os.environ["LOCALSAMPLE_STATE_DIR"]) / "run" / f"{process.pid}.json"
            assert status.is_file()
            process.send_signal(signum)
            started = time.monotonic()
            with anyio.fail_after(5):  # it should take about a second
                await process.wait()
            took = time.monotonic() - started
        finally:
            if process.returncode is None:
                process.kill()
                with anyio.move_on_after(5):
                    await process.wait()
    lines = [line for line in stderr.read_text(errors="replace").splitlines() if "llama.cpp:" not in line]
    log = "\n".join(lines[-30:])  # for the assertion messages
    print(f"{signum.name}: serve exited {took:.2f} s after the signal")
    assert took < 5, log
    assert process.returncode == (130 if signum == signal.SIGINT else 0), log
    assert not status.exists()
    audit = Path(os.environ["LOCALSAMPLE_LOG_DIR"]) / "audit.jsonl"
    decisions = [json.loads(line)["decision"] for line in audit.read_text().splitlines()]
    assert decisions == ["cancelled"], log
    assert f"{signum.name} received" in log
