"""`localsample serve` as a real subprocess, driven by an SDK client acting as the host.

The host declares no sampling capability; the downstream server's sampling is answered
by localsample. Runs in both eras (the host's initialize handshake, and 2026-07-28).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters, types
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError

pytestmark = pytest.mark.anyio

SERVER = Path(__file__).parent / "servers" / "sampling_server.py"
DOWNSTREAM = f"{sys.executable} {SERVER}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def host(
    *servers: str, mode: str = "legacy", protocol: str = "auto", elicitation: Any = None
) -> AsyncIterator[Client]:
    args = ["-m", "localsample", "serve", "--protocol", protocol]
    for server in servers:
        args += ["--server", server]
    # The SDK gives a stdio child only a minimal environment (HOME, PATH, ...) unless told:
    # pass ours, so the child uses this test's directories, not HOME's.
    params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with Client(params, mode=mode, elicitation_callback=elicitation) as client:
        yield client


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_host_calls_a_tool_whose_sampling_is_answered_locally(model_dir: Path, mode: str) -> None:
    async with host(DOWNSTREAM, mode=mode) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"write", "push", "echo", "count", "crash"} <= tools
        result = await client.call_tool("write", {"topic": "cats", "max_tokens": 10})
    assert not result.is_error
    sampled = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert sampled["model"] == "smollm2-135m-instruct"
    assert sampled["stopReason"] == "maxTokens" and sampled["content"]["text"]


async def test_resources_prompts_and_plain_tools_pass_through(model_dir: Path) -> None:
    async with host(DOWNSTREAM) as client:
        listed = [str(r.uri) for r in (await client.list_resources()).resources]
        assert listed == ["note://greeting"]
        read = await client.read_resource("note://greeting")
        assert read.contents[0].text == "hello from the sampling test server"  # type: ignore[union-attr]
        prompts = [p.name for p in (await client.list_prompts()).prompts]
        assert prompts == ["haiku"]
        prompt = await client.get_prompt("haiku", {"subject": "rain"})
        assert prompt.messages[0].content.text == "Write a haiku about rain."  # type: ignore[union-attr]
        echoed = await client.call_tool("echo", {"text": "ab", "times": 3})
        assert echoed.content[0].text == "ababab"  # type: ignore[union-attr]


async def test_progress_of_forwarded_calls_reaches_the_host(model_dir: Path) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with host(DOWNSTREAM) as client:
        result = await client.call_tool("count", {"n": 3}, progress_callback=on_progress)
    assert result.content[0].text == "counted 3"  # type: ignore[union-attr]
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_sampling_progress_reaches_the_downstream_server_through_serve(model_dir: Path) -> None:
    """A server that pushes sampling/createMessage (with a progress token) needs the
    handshake era, hence --protocol legacy."""
    async with host(DOWNSTREAM, protocol="legacy") as client:
        result = await client.call_tool("push", {"max_tokens": 100, "progress": True})
    report = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert report["result"]["model"] == "smollm2-135m-instruct"
    assert len(report["progress"]) >= 2
    assert report["result"]["content"]["text"].startswith(report["progress"][-1]["message"])


async def test_colliding_names_of_two_servers_are_prefixed(model_dir: Path) -> None:
    async with host(f"one={DOWNSTREAM}", f"two={DOWNSTREAM}") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"one__write", "two__write", "one__echo", "two__echo"} <= tools
        assert "write" not in tools
        result = await client.call_tool("two__echo", {"text": "z"})
        assert result.content[0].text == "z"  # type: ignore[union-attr]
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert prompts == {"one__haiku", "two__haiku"}


async def test_a_crashed_downstream_gives_a_clear_error_and_nothing_hangs(model_dir: Path) -> None:
    async with host(DOWNSTREAM) as client:
        with anyio.fail_after(20):
            with pytest.raises(MCPError, match="closed the connection"):
                await client.call_tool("crash", {})
            with pytest.raises(MCPError) as info:
                await client.call_tool("echo", {"text": "x"})
    assert "sampling_server" in str(info.value) and "restart" in str(info.value)


async def test_a_downstream_that_cannot_start_fails_serve_with_a_clear_message(model_dir: Path) -> None:
    proc = await anyio.run_process(
        [sys.executable, "-m", "localsample", "serve", "--server", "no-such-program-xyz --flag"], check=False
    )
    assert proc.returncode == 1
    assert b"command not found: no-such-program-xyz" in proc.stderr
    assert proc.stdout == b""  # stdout belongs to the protocol: nothing else is written there


async def test_elicitation_from_the_downstream_server_reaches_the_host(model_dir: Path) -> None:
    asked: list[str] = []

    async def answer(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with host(DOWNSTREAM, protocol="legacy", elicitation=answer) as client:
        result = await client.call_tool("confirm", {"question": "Ship it?"})
    assert asked == ["Ship it?"]
    assert result.content[0].text == "accept: True"  # type: ignore[union-attr]


async def test_elicitation_without_host_support_is_an_error_not_a_hang(model_dir: Path) -> None:
    async with host(DOWNSTREAM, protocol="legacy") as client:
        with anyio.fail_after(30):
            result = await client.call_tool("confirm", {})
    assert "elicitation failed: the host does not support elicitation" in result.content[0].text  # type: ignore[union-attr]


async def test_a_call_the_host_cancels_is_cancelled_downstream(model_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    async with host(DOWNSTREAM) as client:
        with anyio.move_on_after(3):
            await client.call_tool("sleepy", {"record": str(record)})
        with anyio.fail_after(10):
            while record.read_text() == "started":
                await anyio.sleep(0.1)
        assert record.read_text() == "cancelled"
        echoed = await client.call_tool("echo", {"text": "still here"})  # the proxy keeps serving
        assert echoed.content[0].text == "still here"  # type: ignore[union-attr]
