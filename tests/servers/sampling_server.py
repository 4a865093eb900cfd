"""A real MCP server (the SDK's MCPServer) whose tools ask the client to sample.

Used in-process by the protocol tests and as a stdio subprocess by the CLI tests. Each
tool reports what came back as JSON, so tests can check what the server really saw.

- `write`: samples through `Resolve`/`Sample`, so it works on both protocol eras
  (pushed request on 2025-11-25, `InputRequiredResult` on 2026-07-28).
- `forecast`: as `write`, with a tool the model must call (tools in sampling).
- `push_raw`: sends the params it is given exactly as given (tools, tool_use history,
  malformed fields), and reports the result or the error.
- `push`: sends a hand-made `sampling/createMessage` (≤ 2025-11-25 only), optionally with
  a progress token and a timeout after which the server abandons (cancels) the request;
  fields may be malformed on purpose.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from mcp import types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Resolve, Sample
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

server = MCPServer("sampling-test-server")


def _message(text: str) -> types.SamplingMessage:
    return types.SamplingMessage(role="user", content=types.TextContent(type="text", text=text))


def ask(topic: str, max_tokens: int = 40, hint: str = "") -> Sample:
    hints = [types.ModelHint(name=hint)] if hint else None
    return Sample(
        [_message(f"Write one sentence about {topic}.")],
        max_tokens=max_tokens,
        temperature=0.0,
        model_preferences=types.ModelPreferences(hints=hints) if hints else None,
    )


@server.tool()
async def write(
    topic: str,
    max_tokens: int = 40,
    hint: str = "",
    result: Annotated[types.CreateMessageResult, Resolve(ask)] = None,  # type: ignore[assignment]
) -> str:
    """Sample one sentence about TOPIC; returns the result as JSON."""
    return result.model_dump_json(by_alias=True, exclude_none=True)


WEATHER_TOOL = types.Tool(
    name="get_weather",
    description="The weather forecast for a city.",
    input_schema={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
    },
)


def ask_with_tools(city: str) -> Sample:
    return Sample(
        [_message(f"What is the weather in {city}?")],
        max_tokens=60,
        temperature=0.0,
        tools=[WEATHER_TOOL],
        tool_choice=types.ToolChoice(mode="required"),
    )


@server.tool()
async def forecast(
    city: str,
    result: Annotated[types.CreateMessageResultWithTools, Resolve(ask_with_tools)] = None,  # type: ignore[assignment]
) -> str:
    """Sample with a tool the model must call (both eras: MRTR on 2026-07-28); returns the
    result as JSON."""
    return result.model_dump_json(by_alias=True, exclude_none=True)


def preferences(hints: list[str] | None, priorities: dict[str, float] | None) -> types.ModelPreferences | None:
    """modelPreferences from hint names and {"cost"|"speed"|"intelligence": priority}."""
    if not hints and not priorities:
        return None
    return types.ModelPreferences(
        hints=[types.ModelHint(name=h) for h in hints] if hints else None,
        cost_priority=(priorities or {}).get("cost"),
        speed_priority=(priorities or {}).get("speed"),
        intelligence_priority=(priorities or {}).get("intelligence"),
    )


@server.tool()
async def push(
    ctx: Context,
    text: str = "Write a long story about a lighthouse.",
    max_tokens: int = 40,
    stop: list[str] | None = None,
    temperature: float | None = 0.0,
    system: str | None = None,
    metadata: dict[str, Any] | None = None,
    hints: list[str] | None = None,
    priorities: dict[str, float] | None = None,
    progress: bool = False,
    timeout: float | None = None,
    empty: bool = False,
    image: bool = False,
    tools: bool = False,
    image_data: str | None = None,
    image_mime: str = "image/png",
    audio_data: str | None = None,
) -> str:
    """Send a sampling/createMessage as built from the arguments; report what came back.
    ``image_data`` / ``audio_data`` (base64) go in the user message, after its text."""
    messages = [] if empty else [_message(text)]
    if image_data is not None or audio_data is not None:
        blocks: list[types.SamplingMessageContentBlock] = [types.TextContent(type="text", text=text)]
        if image_data is not None:
            blocks.append(types.ImageContent(type="image", data=image_data, mime_type=image_mime))
        if audio_data is not None:
            blocks.append(types.AudioContent(type="audio", data=audio_data, mime_type="audio/wav"))
        messages = [types.SamplingMessage(role="user", content=blocks)]
    if image:
        messages.append(
            types.SamplingMessage(
                role="user", content=types.ImageContent(type="image", data="iVBORw0KGgo=", mime_type="image/png")
            )
        )
    params = types.CreateMessageRequestParams(
        messages=messages,
        max_tokens=max_tokens,
        stop_sequences=stop,
        temperature=temperature,
        system_prompt=system,
        metadata=metadata,
        model_preferences=preferences(hints, priorities),
        tools=[types.Tool(name="lookup", input_schema={"type": "object"})] if tools else None,
    )
    seen: list[dict[str, Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        seen.append({"progress": value, "total": total, "message": message})

    report: dict[str, Any] = {"progress": seen}
    try:
        with anyio.move_on_after(timeout if timeout is not None else 300) as scope:
            result = await ctx.session.send_request(
                types.CreateMessageRequest(params=params),
                types.CreateMessageResult,
                progress_callback=on_progress if progress else None,
            )
            report["result"] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        report["timed_out"] = scope.cancelled_caught
    except MCPError as exc:
        report["error"] = {"code": exc.error.code, "message": exc.error.message}
    return json.dumps(report)


@server.tool()
async def push_raw(ctx: Context, params: dict[str, Any], progress: bool = False) -> str:
    """Send PARAMS (JSON as on the wire, unchecked) as a sampling/createMessage; report the
    result (tool calls allowed), the progress seen, or the error."""
    request = RawRequest(method="sampling/createMessage", params=params)
    seen: list[dict[str, Any]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        seen.append({"progress": value, "total": total, "message": message})

    report: dict[str, Any] = {"progress": seen}
    try:
        result = await ctx.session.send_request(
            request,
            types.CreateMessageResultWithTools,
            progress_callback=on_progress if progress else None,
        )
        report["result"] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    except MCPError as exc:
        report["error"] = {"code": exc.error.code, "message": exc.error.message}
    return json.dumps(report)


class RawRequest(BaseModel):
    """A request sent exactly as given (no checks): to see what the client does with what a
    careless server may send."""

    method: str
    params: dict[str, Any]


@server.tool()
async def classic(ctx: Context, text: str = "Say hi.", max_tokens: int = 8) -> str:
    """The most common server pattern: push a sampling request with create_message."""
    result = await ctx.session.create_message([_message(text)], max_tokens=max_tokens)
    assert isinstance(result.content, types.TextContent)
    return f"{result.model}: {result.content.text}"


@server.tool()
def echo(text: str, times: int = 1) -> str:
    """No sampling: returns TEXT repeated TIMES (checks argument typing)."""
    return text * times


@server.tool()
async def count(ctx: Context, n: int = 3) -> str:
    """Report progress N times, then return (checks progress pass-through)."""
    for i in range(n):
        await ctx.report_progress(i + 1, n, f"step {i + 1}")
        await anyio.sleep(0.01)
    return f"counted {n}"


class Answer(BaseModel):
    ok: bool


@server.tool()
async def confirm(ctx: Context, question: str = "Proceed?") -> str:
    """Ask the user through elicitation; report the answer."""
    try:
        outcome = await ctx.elicit(question, Answer)
    except MCPError as exc:
        return f"elicitation failed: {exc.error.message}"
    return f"{outcome.action}: {outcome.data.ok if outcome.action == 'accept' else None}"


@server.tool()
async def sleepy(record: str, seconds: float = 30.0) -> str:
    """Sleep; write 'started', then 'finished' or 'cancelled', to the file RECORD."""
    from pathlib import Path

    path = Path(record)
    path.write_text("started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        path.write_text("cancelled")
        raise
    path.write_text("finished")
    return "slept"


@server.tool()
def crash() -> str:
    """Exit the server process at once, as a crash would."""
    import os

    os._exit(3)


@server.resource("note://greeting")
def greeting() -> str:
    """A static resource, for pass-through tests."""
    return "hello from the sampling test server"


@server.prompt()
def haiku(subject: str) -> str:
    """A prompt, for pass-through tests."""
    return f"Write a haiku about {subject}."


if __name__ == "__main__":
    server.run()
