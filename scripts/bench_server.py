"""The MCP server side of `scripts/bench.py`'s end-to-end figures.

Its tool pushes one sampling/createMessage to the client and times it from here, the
server's side: request out, JSON-RPC over stdio, localsample, the model, result back.
"""

import json
import time
import warnings
from typing import Any

from mcp import types
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning

warnings.filterwarnings("ignore", category=MCPDeprecationWarning)  # pushing sampling is the point here

server = MCPServer("bench-server")


@server.tool()
async def timed_sample(ctx: Context, prompt: str, system: str, max_tokens: int, metadata: dict[str, Any]) -> str:
    """Send one sampling request; report how long it took, seen from the server."""
    message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
    started = time.perf_counter()
    result = await ctx.session.create_message(
        [message], max_tokens=max_tokens, system_prompt=system, temperature=0.0, metadata=metadata
    )
    seconds = time.perf_counter() - started
    return json.dumps({"seconds": seconds, "stop_reason": result.stop_reason, "model": result.model})


if __name__ == "__main__":
    server.run()
