"""A stub MCP server that sends malformed JSON-RPC requests to its client, on purpose.

No SDK: it writes raw lines on stdout. It answers the handshake (``server/discover`` with
"method not found", then ``initialize``) and offers one tool, ``probe``. Calling ``probe``
makes the server send each case of ``malformed_corpus.CASES`` as a server→client request,
wait up to ``REPLY_WAIT`` seconds for the client's reply, then send one well-formed
``sampling/createMessage``; the tool's result is a JSON report of every reply (or its
absence) and of the sampling answer.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: find the tests package
from tests.servers.malformed_corpus import CASES, SAMPLING

REPLY_WAIT = 5.0

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
    for name, case in CASES.items():
        send(case.line)
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
