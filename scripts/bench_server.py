"""The MCP server side of `scripts/bench.py`'s end-to-end figures.

Its tool pushes one sampling/createMessage to the client, with a progress token, and times
it from here, the server's side: request out, JSON-RPC over stdio, localsample, the model,
progress notifications as text is generated, the result back.
"""

import json
import time
from typing import Any

from mcp import types
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("bench-server")


@server.tool()
async def timed_sample(ctx: Context, prompt: str, system: str, max_tokens: int, metadata: dict[str, Any]) -> str:
    """Send one sampling request; report how long it took, seen from the server."""
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
    params = types.CreateMessageRequestParams(
        messages=[message], max_tokens=max_tokens, system_prompt=system, temperature=0.0, metadata=metadata
    )
    progress: list[tuple[float, float]] = []  # (seconds since the request, tokens so far)

    async def on_progress(tokens: float, _total: float | None, _message: str | None) -> None:
        progress.append((time.perf_counter() - started, tokens))

    started = time.perf_counter()
    result = await ctx.session.send_request(
        types.CreateMessageRequest(params=params), types.CreateMessageResult, progress_callback=on_progress
    )
    seconds = time.perf_counter() - started
    report = {"seconds": seconds, "first_progress": progress[0] if progress else None}
    return json.dumps(report | {"stop_reason": result.stop_reason, "model": result.model})


if __name__ == "__main__":
    server.run()
