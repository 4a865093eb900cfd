"""A real MCP server (the SDK's MCPServer) with tools for what `run` must survive, which
the notes example cannot be made to do on demand.

- `big_report`: a result far longer than any small model's context.
- `wait_forever`: never finishes by itself; when it is cancelled it writes "cancelled" to
  the file named by $AGENT_MARK, so a test can see the cancellation reached the server.
- `list_notes`: the same name as the notes example's tool, for name collisions.
- `forecast`: asks the client's model for a sentence (sampling inside a tool, both eras).
- `crash`: the server process exits in the middle of the call.

`python agent_server.py` serves on stdio; `python agent_server.py --http PORT` serves
Streamable HTTP on 127.0.0.1:PORT at /mcp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import anyio
from mcp import types
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Resolve, Sample

server = MCPServer("agent-test-server")


@server.tool()
def big_report() -> str:
    """The full yearly report (very long)."""
    return "\n".join(f"line {n}: sales were steady and stock levels normal." for n in range(6000))


@server.tool()
async def wait_forever() -> str:
    """Wait for the next delivery (slow)."""
    mark = Path(os.environ["AGENT_MARK"])
    mark.write_text("started")
    try:
        await anyio.sleep(3600)
    except anyio.get_cancelled_exc_class():
        mark.write_text("cancelled")
        raise
    return "delivered"


@server.tool()
def list_notes() -> str:
    """List the notes of the agent test server."""
    return "agent-server-note.md (1 bytes)"


def ask_for_forecast() -> Sample:
    text = types.TextContent(type="text", text="Write one sentence about tomorrow's weather.")
    return Sample([types.SamplingMessage(role="user", content=text)], max_tokens=30, temperature=0.0)


@server.tool()
async def forecast(
    sentence: Annotated[types.CreateMessageResult, Resolve(ask_for_forecast)] = None,  # type: ignore[assignment]
) -> str:
    """Tomorrow's weather, in one sentence written by the client's model."""
    text = sentence.content.text if isinstance(sentence.content, types.TextContent) else ""
    return f"forecast: {text.strip()}"


@server.tool()
def crash() -> str:
    """Restart the delivery service."""
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
