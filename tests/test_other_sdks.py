"""Servers built with other SDKs, as users run them: a TypeScript-SDK server from npm
(protocol 2025-11-25, initialize handshake, sampling pushed with createMessage).
scripts/test.sh installs its packages (`npm ci` in tests/servers/ts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

TS_DIR = Path(__file__).parent / "servers" / "ts"
TS_SERVER = f"node {TS_DIR / 'server.mjs'}"


@pytest.fixture(scope="module", autouse=True)
def ts_packages() -> None:
    if not (TS_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        pytest.fail("TypeScript SDK missing: run `npm ci` in tests/servers/ts (scripts/test.sh does)")


def test_call_answers_a_typescript_sdk_server(model_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "localsample",
            "call",
            "--server",
            TS_SERVER,
            "summarize",
            "--arg",
            "text=Tomatoes are red fruits that grow on vines in summer.",
            "--arg",
            "maxTokens=12",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # what the TypeScript server received, validated by its SDK
    assert result["model"] == "smollm2-135m-instruct"
    assert result["role"] == "assistant" and result["content"]["type"] == "text"
    assert result["stopReason"] in ("endTurn", "maxTokens") and result["content"]["text"]


def test_serve_fronts_a_typescript_sdk_server(model_dir: Path) -> None:
    async def as_host() -> str:
        args = ["-m", "localsample", "serve", "--server", TS_SERVER]
        params = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
        async with Client(params, mode="legacy") as host:
            assert [t.name for t in (await host.list_tools()).tools] == ["summarize"]
            result = await host.call_tool("summarize", {"text": "Owls hunt at night.", "maxTokens": 8})
        return result.content[0].text  # type: ignore[union-attr]

    result = json.loads(anyio.run(as_host))
    assert result["model"] == "smollm2-135m-instruct"


def test_a_server_pinned_to_protocol_2024_11_05_gets_a_well_formed_answer(model_dir: Path) -> None:
    server = f"{sys.executable} {Path(__file__).parent / 'servers' / 'old_protocol_server.py'}"
    proc = subprocess.run(
        [sys.executable, "-m", "localsample", "call", "--server", server, "ask"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)  # the raw JSON-RPC response the server received
    assert answer["jsonrpc"] == "2.0" and answer["id"] == "s1" and "error" not in answer
    result = answer["result"]
    assert result["role"] == "assistant"
    assert result["content"]["type"] == "text" and result["content"]["text"]  # one block, not a list
    assert result["model"] == "smollm2-135m-instruct"
    assert result["stopReason"] in ("endTurn", "maxTokens")
    assert "includeContext=thisServer treated as none" in proc.stderr
