"""A minimal MCP server written against the wire format, pinned to protocol 2024-11-05.

No SDK: it reads and writes JSON-RPC lines on stdio, answers `initialize` with
2024-11-05 whatever the client asks, and its one tool pushes a `sampling/createMessage`
and returns the client's raw JSON answer, so tests see exactly what went over the wire.
"""

import json
import sys
from typing import Any

PROTOCOL = "2024-11-05"


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def read() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)
    message: dict[str, Any] = json.loads(line)
    return message


def main() -> None:
    while True:
        message = read()
        method, ident = message.get("method"), message.get("id")
        if method == "initialize":
            result = {
                "protocolVersion": PROTOCOL,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "old-protocol-server", "version": "0.1"},
            }
            send({"jsonrpc": "2.0", "id": ident, "result": result})
        elif method == "tools/list":
            tool = {"name": "ask", "description": "push one sampling request", "inputSchema": {"type": "object"}}
            send({"jsonrpc": "2.0", "id": ident, "result": {"tools": [tool]}})
        elif method == "tools/call":
            params = {
                "messages": [{"role": "user", "content": {"type": "text", "text": "Name one colour."}}],
                "maxTokens": 6,
                "modelPreferences": {"hints": [{"name": "claude-3-haiku"}]},
                "includeContext": "thisServer",
            }
            send({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": params})
            answer = read()
            while answer.get("id") != "s1":  # skip notifications
                answer = read()
            text = json.dumps(answer)
            send({"jsonrpc": "2.0", "id": ident, "result": {"content": [{"type": "text", "text": text}]}})
        elif ident is not None:
            send({"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": f"no method {method}"}})


if __name__ == "__main__":
    main()
