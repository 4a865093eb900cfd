"""A real FastMCP 3.x server whose tools sample with tools and with structured output.

FastMCP 3 pins mcp 1.x, so it runs from its own virtualenv (tests/servers/fastmcp/.venv,
made by scripts/test.sh). FastMCP refuses to sample with tools unless the client declares
``sampling.tools``; it runs every tool_use it gets through the Python function itself and
validates ``result_type`` answers with pydantic, so these tests see what a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

pytestmark = [pytest.mark.slow, pytest.mark.anyio]
FASTMCP_DIR = Path(__file__).parent / "servers" / "fastmcp"
FASTMCP_PYTHON = FASTMCP_DIR / ".venv" / "bin" / "python"
SERVER = f"{FASTMCP_PYTHON} {FASTMCP_DIR / 'tools_server.py'}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def fastmcp_venv() -> None:
    if not FASTMCP_PYTHON.is_file():
        pytest.fail("FastMCP's virtualenv is missing: run scripts/test.sh (it creates tests/servers/fastmcp/.venv)")


def call(tool: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "localsample", "call", "--server", SERVER, tool]
    for arg in args:
        argv += ["--arg", arg]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def valid_weather_call(arguments: dict[str, Any]) -> bool:
    return (
        set(arguments) == {"city", "unit"}
        and isinstance(arguments["city"], str)
        and arguments["unit"]
        in (
            "celsius",
            "fahrenheit",
        )
    )


def test_call_runs_a_fastmcp_tool_call_through_the_real_function(model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    report = call("weather_step", "city=Paris", env={**os.environ, "FASTMCP_TOOL_LOG": str(log)})
    assert report["called"] is True
    invoked = [json.loads(line) for line in log.read_text().splitlines()]  # what get_weather really received
    assert invoked and invoked == report["calls"]
    assert all(valid_weather_call(c) for c in invoked)
    assert report["text"]  # then answered with toolChoice none, from a history holding the results


def test_call_answers_fastmcp_structured_output(model_dir: Path) -> None:
    report = call("tag_post", "text=My grandmother's pasta recipe with fresh tomatoes and basil")
    tags = report["result"]  # FastMCP validated it against its pydantic model on the first round
    assert report["rounds"] == 1
    assert 1 <= len(tags["tags"]) <= 5 and tags["category"] in ("news", "sports", "technology", "food", "other")
    assert 0.0 <= tags["confidence"] <= 1.0


def test_call_answers_fastmcp_auto_tools_with_text_or_a_valid_call(model_dir: Path) -> None:
    report = call("weather_report", "city=Lima", "max_tokens=96")
    assert report["text"] or report["calls"]
    assert all(valid_weather_call(c) for c in report["calls"])


async def test_serve_answers_fastmcp_tools_for_a_host(model_dir: Path) -> None:
    args = ["-m", "localsample", "serve", "--server", SERVER]
    host = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
    async with Client(host, mode="legacy") as client:
        step = await client.call_tool("weather_step", {"city": "Oslo"})
        tagged = await client.call_tool("tag_post", {"text": "The home team won the final in extra time."})
    assert not step.is_error and not tagged.is_error, (step, tagged)
    report = json.loads(step.content[0].text)  # type: ignore[union-attr]
    assert report["called"] and all(valid_weather_call(c) for c in report["calls"])
    result = json.loads(tagged.content[0].text)["result"]  # type: ignore[union-attr]
    assert result["category"] in ("news", "sports", "technology", "food", "other")
