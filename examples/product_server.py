"""An MCP server whose tool asks the client's model to write a product description.

Run it under localsample, which answers the sampling request with a local model:

    localsample call --server "python examples/product_server.py" create_product \
        --arg name=tomato --arg keywords="red, fresh"

The sampling request is declared with `Resolve(...)`/`Sample(...)`, so it works on both
protocol eras: pushed as `sampling/createMessage` to 2025-11-25 clients, carried in an
`InputRequiredResult` to 2026-07-28 clients.
"""

from typing import Annotated

from mcp import types
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Resolve, Sample

server = MCPServer("product-writer")


def ask_for_description(name: str, keywords: str = "") -> Sample:
    prompt = f"Write a two-sentence product description for: {name}."
    if keywords:
        prompt += f" Mention: {keywords}."
    return Sample(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
        system_prompt="You write short, vivid product descriptions for an online shop.",
        max_tokens=120,
        temperature=0.7,
        model_preferences=types.ModelPreferences(hints=[types.ModelHint(name="claude-3-5-haiku")], speed_priority=0.8),
    )


@server.tool()
async def create_product(
    name: str,
    keywords: str = "",
    description: Annotated[types.CreateMessageResult, Resolve(ask_for_description)] = None,  # type: ignore[assignment]
) -> str:
    """Create a product listing whose description is written by the client's model."""
    text = description.content.text if isinstance(description.content, types.TextContent) else ""
    return f"{name.title()}\n\n{text.strip()}\n\n(description written by {description.model})"


if __name__ == "__main__":
    server.run()
