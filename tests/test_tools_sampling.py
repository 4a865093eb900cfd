"""Tools in sampling requests (spec 2025-11-25) at the MCP boundary.

The fast tests send real requests from the SDK's server (``push_raw``) to the sampling
callback over the SDK's in-process transport and check validation, mapping, audit and
selection on FakeGenerators. The slow tests run the real model over stdio: the
capability declared by ``call`` and ``serve``, and results a server validates.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters, types

from localsample import Runtime
from localsample.errors import INVALID_PARAMS
from localsample.generation import ChatMessage, Completion, GenerationRequest, ToolCall, ToolSpec
from localsample.policy import Pending, shown_response
from localsample.sampling import SamplingHandler
from localsample.settings import Settings

from .conftest import FakeGenerator, fake_runtime, real_model_dir
from .servers.sampling_server import server

pytestmark = pytest.mark.anyio
TEST_CATALOG = Path(__file__).parent / "catalog.toml"
SERVER = Path(__file__).parent / "servers" / "sampling_server.py"
TOOLS_CAPABILITY = types.SamplingCapability(tools=types.SamplingToolsCapability())

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "inputSchema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def text(role: str, value: str) -> dict[str, Any]:
    return {"role": role, "content": {"type": "text", "text": value}}


def use(call_id: str, name: str = "get_weather", arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": arguments or {"city": "Oslo", "unit": "celsius"}}
    return {"role": "assistant", "content": [block]}


def result(call_id: str, value: str = "4 degrees, rain") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "tool_result", "toolUseId": call_id, "content": [text("", value)["content"]]}],
    }


def params(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages) or [text("user", "Weather in Oslo?")], "maxTokens": 8, **fields}


def runtime(tmp_path: Path, **settings: Any) -> Runtime:
    base = Settings(model_dir=real_model_dir(), catalog_path=TEST_CATALOG, log_dir=tmp_path / "logs", **settings)
    return fake_runtime(base, TEST_CATALOG)


async def push_raw(rt: Runtime, request: dict[str, Any]) -> dict[str, Any]:
    handler = SamplingHandler(rt, server="test")
    async with Client(server, sampling_callback=handler, mode="legacy", sampling_capabilities=TOOLS_CAPABILITY) as c:
        reply = await c.call_tool("push_raw", {"params": request})
    return json.loads(reply.content[0].text)  # type: ignore[no-any-return, union-attr]


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]


# -- validation: each a -32602 naming the field -------------------------------------------


@pytest.mark.parametrize(
    ("request_params", "expected"),
    [
        (params(text("user", "hi"), use("a"), result("zzz"), tools=[WEATHER]), "toolUseId 'zzz' matches no earlier"),
        (
            params(
                text("user", "hi"),
                use("a"),
                {"role": "user", "content": [result("a")["content"][0], text("", "and?")["content"]]},
                tools=[WEATHER],
            ),
            "messages[2] mixes tool_result with other content",
        ),
        (params(text("user", "hi"), use("a", name="nope"), result("a"), tools=[WEATHER]), "names 'nope', which"),
        (params(text("user", "hi"), use("a"), tools=[WEATHER]), "tool_use 'a' has no tool_result"),
        (params(text("user", "hi"), use("a"), text("user", "and?"), tools=[WEATHER]), "'a' has no tool_result"),
        (
            params(
                text("user", "hi"),
                use("a"),
                {"role": "user", "content": [result("a")["content"][0], result("a")["content"][0]]},
                tools=[WEATHER],
            ),
            "answers tool_use ['a', 'a']; the message before it made ['a']",
        ),
        (params(tools=[{"name": "", "inputSchema": {"type": "object"}}]), "params.tools[0].name is empty"),
        (params(tools=[WEATHER, WEATHER]), "params.tools[1].name 'get_weather' is offered twice"),
        (params(toolChoice={"mode": "required"}), 'toolChoice.mode is "required" but params.tools is empty'),
        (params(metadata={"response_format": {"type": "yaml"}}), "response_format.type must be json_schema"),
        (
            params(tools=[WEATHER], metadata={"response_format": {"type": "json_object"}}),
            "response_format cannot be combined with tools",
        ),
    ],
)
async def test_malformed_tool_requests_are_refused_naming_the_field(
    tmp_path: Path, request_params: dict[str, Any], expected: str
) -> None:
    rt = runtime(tmp_path)
    report = await push_raw(rt, request_params)
    assert report["error"]["code"] == INVALID_PARAMS, report
    assert expected in report["error"]["message"] and "fix:" in report["error"]["message"]
    [line] = audit(tmp_path)
    assert line["decision"] == "error" and expected in line["error"]
    rt.close()


# -- mapping, audit, approval -------------------------------------------------------------


async def test_a_tool_call_comes_back_as_tool_use_blocks_and_is_audited_by_name(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    report = await push_raw(rt, params(tools=[WEATHER], toolChoice={"mode": "required"}))
    answer = report["result"]
    assert answer["stopReason"] == "toolUse"
    [call] = answer["content"]  # a list, as the spec has it for tool calls
    assert call["type"] == "tool_use" and call["name"] == "get_weather" and call["id"]
    [line] = audit(tmp_path)
    assert line["decision"] == "approved" and line["tools_called"] == ["get_weather"]
    assert "city" not in json.dumps(line)  # arguments are text: only with audit_text
    rt.close()


async def test_history_with_tool_results_reaches_the_generator_as_tool_turns(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    report = await push_raw(rt, params(text("user", "Weather in Oslo?"), use("c1"), result("c1"), tools=[WEATHER]))
    assert report["result"]["content"]["type"] == "text"  # no call: one block, as 1.x servers expect
    [resident] = rt.pool.loaded()
    assert isinstance(resident.generator, FakeGenerator)
    [request] = resident.generator.requests
    assert [m.role for m in request.messages] == ["user", "assistant", "tool"]
    assert request.messages[1].tool_calls == (ToolCall("c1", "get_weather", {"city": "Oslo", "unit": "celsius"}),)
    assert request.messages[2].content == "4 degrees, rain" and request.messages[2].tool_call_id == "c1"
    assert request.tool_choice == "auto" and [t.name for t in request.tools] == ["get_weather"]
    rt.close()


def test_a_person_asked_sees_the_tools_offered_and_the_calls_proposed() -> None:
    tool = ToolSpec("get_weather", "The weather", {"type": "object"})
    history = [
        ChatMessage("user", "Weather in Oslo?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "get_weather", {"city": "Oslo"}),)),
        ChatMessage("tool", "4 degrees", tool_call_id="c1"),
    ]
    request = GenerationRequest(history, max_tokens=8, tools=[tool], tool_choice="required")
    summary = Pending("srv", "m", "default model", request).summary()
    assert "tools offered: get_weather (toolChoice required)" in summary
    assert 'calls get_weather({"city": "Oslo"})' in summary and "tool: 4 degrees" in summary
    answer = Completion("", "m", "toolUse", None, 1, 1, 0.0, 0.0, tool_calls=(ToolCall("c2", "get_weather", {}),))
    assert shown_response(answer) == "calls get_weather({})"


# -- selection ------------------------------------------------------------------------------


def write_catalog(path: Path, tools_model: bool) -> Path:
    capabilities = '["chat", "tools"]' if tools_model else '["chat"]'
    path.write_text(
        TEST_CATALOG.read_text().replace('capabilities = ["chat"]', f"capabilities = {capabilities}", 1),
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("tools_model", [True, False])
def test_a_request_with_tools_prefers_a_model_with_the_tools_capability(tmp_path: Path, tools_model: bool) -> None:
    catalog = write_catalog(tmp_path / "models.toml", tools_model)
    settings = Settings(model_dir=real_model_dir(), catalog_path=catalog, log_dir=tmp_path / "logs")
    rt = fake_runtime(settings, catalog)
    from localsample.runtime import needs_of

    tool = ToolSpec("t", "", {"type": "object"})
    with_tools = GenerationRequest([ChatMessage("user", "hi")], max_tokens=8, tools=[tool])
    choice = rt.select(needs=needs_of(with_tools), server="s")
    if tools_model:
        assert choice.model.id == "gemma3-270m" and "tools capability preferred" in choice.reason
    else:
        assert choice.model.id == "smollm2-135m-instruct"
        assert "no model with the tools capability can serve" in choice.reason
    no_call = GenerationRequest([ChatMessage("user", "hi")], max_tokens=8, tools=[tool], tool_choice="none")
    assert rt.select(needs=needs_of(no_call), server="s").model.id == "smollm2-135m-instruct"  # the default
    rt.close()


# -- over stdio, on the real model ----------------------------------------------------------


def call_push_raw(request: dict[str, Any], *args: str) -> dict[str, Any]:
    import subprocess

    server = ["--server", f"{sys.executable} {SERVER}", "--protocol", "legacy"]
    proc = subprocess.run(
        [sys.executable, "-m", "localsample", "call", *server, "push_raw", "--arg", f"params={json.dumps(request)}"]
        + [item for arg in args for item in ("--arg", arg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tools": [WEATHER], "toolChoice": {"mode": "sometimes"}}, "params.toolChoice.mode: Input should be 'auto'"),
        ({"tools": [{"name": "t", "inputSchema": {"type": "string"}}]}, "params.tools.0.inputSchema.type"),
    ],
)
def test_what_the_sdk_refuses_is_refused_naming_the_field(model_dir: Path, fields: Any, expected: str) -> None:
    """The SDK answers params it cannot validate with a bare "Invalid request parameters";
    localsample's transport names the field first."""
    report = call_push_raw(params(**fields))
    assert report["error"]["code"] == INVALID_PARAMS and expected in report["error"]["message"], report


@pytest.mark.slow
def test_call_declares_sampling_tools_and_returns_a_valid_call(model_dir: Path) -> None:
    request = params(tools=[WEATHER], toolChoice={"mode": "required"}, maxTokens=60, temperature=0)
    report = call_push_raw(request, "progress=true")
    answer = report["result"]  # the server's SDK accepted tools: the capability was declared
    assert report["progress"] and report["progress"][-1]["message"].startswith("<tool_call>")  # the call's JSON
    assert answer["stopReason"] == "toolUse"
    calls = [b for b in answer["content"] if b["type"] == "tool_use"]
    assert calls and all(c["name"] == "get_weather" for c in calls)
    assert all(set(c["input"]) == {"city", "unit"} and c["input"]["unit"] in ("celsius", "fahrenheit") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.slow
async def test_serve_declares_sampling_tools_for_both_eras(model_dir: Path) -> None:
    """The server's own ``forecast`` tool samples with a required tool through ``Sample``: a
    pushed request on 2025-11-25, an ``InputRequiredResult`` on 2026-07-28."""
    for protocol in ("legacy", "auto"):
        args = ["-m", "localsample", "serve", "--server", f"{sys.executable} {SERVER}", "--protocol", protocol]
        host = StdioServerParameters(command=sys.executable, args=args, env=dict(os.environ))
        async with Client(host, mode="legacy") as client:
            reply = await client.call_tool("forecast", {"city": "Lima"})
        assert not reply.is_error, reply
        answer = json.loads(reply.content[0].text)  # type: ignore[union-attr]
        assert answer["stopReason"] == "toolUse", protocol
        assert all(
            b["name"] == "get_weather" and b["input"]["unit"] in ("celsius", "fahrenheit") for b in answer["content"]
        )
