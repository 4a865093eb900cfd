"""A stub MCP server that sends malformed JSON-RPC requests to its client, on purpose.

No SDK: it writes raw lines on stdout. It answers the handshake (``server/discover`` with
"method not found", then ``initialize``) and offers one tool, ``probe``. Calling ``probe``
makes the server send each case of ``CASES`` as a server→client request, wait up to
``REPLY_WAIT`` seconds for the client's reply, then send one well-formed
``sampling/createMessage``; the tool's result is a JSON report of every reply (or its
absence) and of the sampling answer.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any

REPLY_WAIT = 5.0
SAMPLING = {"messages": [{"role": "user", "content": {"type": "text", "text": "Hi."}}], "maxTokens": 5}
SURROGATE = '{"messages":[{"role":"user","content":{"type":"text","text":"a\\ud800b"}}],"maxTokens":5}'
DEEP = "[" * 10_000 + "]" * 10_000


def request(ident: str, params: str, method: str = "sampling/createMessage", version: str = '"2.0"') -> str:
    return f'{{"jsonrpc":{version},"id":{ident},"method":"{method}","params":{params}}}'


CASES: dict[str, str] = {
    "params-list": request('"params-list"', "[1, 2]"),
    "params-string": request('"params-string"', '"hello"'),
    "lone-surrogate": request('"lone-surrogate"', SURROGATE),
    "deep": request('"deep"', f'{{"x":{DEEP}}}'),
    "id-object": request('{"a": 1}', "{}", method="ping"),
    "id-list": request("[1]", "{}", method="ping"),
    "id-bool": request("true", "{}", method="ping"),
    "id-float": request("1.5", "{}", method="ping"),
    "jsonrpc-1.0": request('"jsonrpc-1.0"', "{}", method="ping", version='"1.0"'),
    "not-json": "this is not json {",
}

buffer = b""


def send(message: dict[str, Any] | str) -> None:
    line = message if isinstance(message, str) else json.dumps(message)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def read(timeout: float | None = None) -> dict[str, Any] | None:
    """The next message from the client; ``None`` after ``timeout`` seconds; exits at EOF."""
    global buffer
    deadline = None if timeout is None else time.monotonic() + timeout
    while b"\n" not in buffer:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        ready, _, _ = select.select([0], [], [], left)
        if not ready:
            return None
        chunk = os.read(0, 65536)
        if not chunk:
            sys.exit(0)
        buffer += chunk
    line, _, buffer = buffer.partition(b"\n")
    message: dict[str, Any] = json.loads(line)
    return message


def reply_to(timeout: float) -> tuple[dict[str, Any] | None, float]:
    """The client's next response (not a request or notification), and how long it took."""
    start = time.monotonic()
    while (left := timeout - (time.monotonic() - start)) > 0:
        message = read(left)
        if message is None:
            break
        if "method" not in message:
            return message, time.monotonic() - start
    return None, time.monotonic() - start


def probe() -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, line in CASES.items():
        send(line)
        reply, took = reply_to(REPLY_WAIT)
        report[name] = {"reply": reply, "seconds": took}
    send({"jsonrpc": "2.0", "id": "good", "method": "sampling/createMessage", "params": SAMPLING})
    reply, took = reply_to(REPLY_WAIT)
    report["good"] = {"reply": reply, "seconds": took}
    return report


def main() -> None:
    while True:
        message = read()
        assert message is not None
        method, ident = message.get("method"), message.get("id")
        if method == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "malformed-server", "version": "0.1"},
            }
            send({"jsonrpc": "2.0", "id": ident, "result": result})
        elif method == "tools/list":
            tool = {"name": "probe", "description": "send malformed requests", "inputSchema": {"type": "object"}}
            send({"jsonrpc": "2.0", "id": ident, "result": {"tools": [tool]}})
        elif method == "tools/call":
            text = json.dumps(probe())
            send({"jsonrpc": "2.0", "id": ident, "result": {"content": [{"type": "text", "text": text}]}})
        elif ident is not None:
            send({"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": f"no method {method}"}})


if __name__ == "__main__":
    main()
