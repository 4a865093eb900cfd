# mypy: ignore-errors
# (FastMCP lives only in tests/servers/fastmcp/.venv, which mypy in .venv cannot see.)
"""A FastMCP 3.x server whose tools sample with tools and with structured output.

Runs in its own virtualenv (FastMCP 3 needs mcp 1.x; scripts/test.sh creates it):
    tests/servers/fastmcp/.venv/bin/python tests/servers/fastmcp/tools_server.py

- `weather_report(city)`: `ctx.sample(..., tools=[get_weather])`. FastMCP sends
  `sampling/createMessage` with `tools`, runs every `tool_use` the client returns (with
  stopReason "toolUse") through the Python function itself, sends the `tool_result`s
  back, and stops at the first answer that is not a tool use. Returns that answer's text
  and every call `get_weather` really received.
- `tag_post(text)`: `ctx.sample(..., result_type=Tags)`. FastMCP adds a synthetic
  `final_response` tool whose input schema is Tags' and sends toolChoice "required";
  a text answer gets a nudge and another try (4 tries in all), input that fails
  validation gets an error tool_result and another try (4 in all). Returns the
  validated Tags and how many sampling rounds it took.
- `weather_step(city)`: `ctx.sample_step(..., tools=[get_weather], tool_choice="required")`
  (FastMCP runs the call), then a step with toolChoice "none" over that history.
- `summarize(text)`: plain `ctx.sample` (no tools), for comparison.
- `describe_photo(image)`: `ctx.sample` with an image content block (base64 PNG).

Each call to `get_weather` is also appended, as a JSON line, to the file named by the
environment variable FASTMCP_TOOL_LOG when it is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from fastmcp import Context, FastMCP
from pydantic import BaseModel, Field

server = FastMCP("fastmcp-tools-test-server")

_calls: ContextVar[list[dict[str, Any]] | None] = ContextVar("calls", default=None)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get today's weather forecast for a city, with the temperature in the given unit."""
    # FastMCP calls this with the model's arguments as they are (no schema validation),
    # so what is recorded here is exactly what the client's tool_use block carried.
    call = {"city": city, "unit": unit}
    calls = _calls.get()
    if calls is not None:
        calls.append(call)
    log = os.environ.get("FASTMCP_TOOL_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(call) + "\n")
    degrees = "21 degrees Celsius" if unit == "celsius" else "70 degrees Fahrenheit"
    return f"Forecast for {city}: sunny, {degrees}, light wind from the west."


class Tags(BaseModel):
    """Tags for a short post."""

    tags: list[str] = Field(min_length=1, max_length=5, description="Lowercase topic tags")
    category: Literal["news", "sports", "technology", "food", "other"]
    confidence: float = Field(ge=0.0, le=1.0)


@contextmanager
def recording() -> Iterator[list[dict[str, Any]]]:
    """The calls get_weather receives while the block runs."""
    calls: list[dict[str, Any]] = []
    token = _calls.set(calls)
    try:
        yield calls
    finally:
        _calls.reset(token)


def _rounds(history: list[Any]) -> int:
    return sum(1 for message in history if message.role == "assistant")


@server.tool
async def weather_report(city: str, ctx: Context, max_tokens: int = 256) -> dict[str, Any]:
    """Ask the client's model for a weather report; it may call get_weather to get one."""
    with recording() as calls:
        result = await ctx.sample(
            f"What is the weather in {city} today? Use the get_weather tool, then answer in one sentence.",
            system_prompt="You are a concise weather assistant.",
            max_tokens=max_tokens,
            tools=[get_weather],
        )
    return {"text": result.text, "calls": calls, "rounds": _rounds(result.history)}


@server.tool
async def weather_step(city: str, ctx: Context, max_tokens: int = 128) -> dict[str, Any]:
    """One agent step by hand: `ctx.sample_step` with toolChoice "required" (FastMCP runs
    the call through get_weather itself), then a step with toolChoice "none" that answers
    from the tool result in the history."""
    with recording() as calls:
        step = await ctx.sample_step(
            f"What is the weather in {city} today?",
            system_prompt="You are a concise weather assistant.",
            max_tokens=max_tokens,
            tools=[get_weather],
            tool_choice="required",
        )
        final = await ctx.sample_step(step.history, max_tokens=max_tokens, tools=[get_weather], tool_choice="none")
    return {"called": step.is_tool_use, "calls": calls, "text": final.text, "history": len(step.history)}


@server.tool
async def tag_post(text: str, ctx: Context, max_tokens: int = 256) -> dict[str, Any]:
    """Ask the client's model to tag a post; the answer is validated as Tags."""
    result = await ctx.sample(
        f"Tag this post:\n\n{text}",
        system_prompt="You tag short posts with topics and a category.",
        max_tokens=max_tokens,
        result_type=Tags,
    )
    return {"result": result.result.model_dump(mode="json"), "rounds": _rounds(result.history)}


@server.tool
async def summarize(text: str, ctx: Context, max_tokens: int = 64) -> dict[str, Any]:
    """Ask the client's model for a one-sentence summary (plain sampling, no tools)."""
    result = await ctx.sample(f"Summarize in one sentence:\n\n{text}", max_tokens=max_tokens)
    return {"text": result.text}


@server.tool
async def describe_photo(
    image: str, ctx: Context, mime_type: str = "image/png", max_tokens: int = 16
) -> dict[str, Any]:
    """Ask the client's model to describe a product photo (``image``: base64): an image
    content block in a user message, then the question."""
    from mcp.types import ImageContent, SamplingMessage

    photo = SamplingMessage(role="user", content=ImageContent(type="image", data=image, mimeType=mime_type))
    result = await ctx.sample([photo, "Describe this product photo in one sentence."], max_tokens=max_tokens)
    return {"text": result.text}


if __name__ == "__main__":
    server.run(show_banner=False)
