// An MCP server built with the official TypeScript SDK whose tool asks the client to
// sample (sampling/createMessage, pushed over the initialize-handshake protocol).
// localsample's tests run it over stdio to check that servers from other SDKs work.
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { z } from "zod";

const server = new McpServer({ name: "ts-sampler", version: "1.0.0" });

server.registerTool(
  "summarize",
  {
    description: "Summarize TEXT with the client's model; returns the sampling result as JSON",
    inputSchema: { text: z.string(), maxTokens: z.number().int().optional() },
  },
  async ({ text, maxTokens }) => {
    const result = await server.server.createMessage({
      messages: [{ role: "user", content: { type: "text", text: `Summarize in one sentence: ${text}` } }],
      maxTokens: maxTokens ?? 30,
      temperature: 0,
      modelPreferences: { hints: [{ name: "claude-3-haiku" }] },
    });
    return { content: [{ type: "text", text: JSON.stringify(result) }] };
  },
);

await server.connect(new StdioServerTransport());
