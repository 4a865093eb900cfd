"""Asking a human: at the terminal (`call`, `sample`, `run`) or through the host (`serve`).

The terminal approver shows the request on stderr and reads the answer from stdin (the
terminal): approve, edit the prompt or parameters, or reject with a reason; with
``review_response`` it shows the response and lets the human send, edit or reject it.
For `run` it also asks before a tool call the model made runs (yes, no with a reason the
model is told, or always for that tool).
The elicitation approver asks the host's user with an MCP elicitation form, when the
host supports elicitation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mcp import types
from mcp.server.session import ServerSession

from localsample.generation import ToolCall
from localsample.policy import Decision, Pending, call_line, edited

T = TypeVar("T")
TERMINAL = "user at the terminal"
HOST = "host user (elicitation)"


async def in_daemon_thread(func: Callable[[], T]) -> T:
    """Run blocking terminal input without keeping the process alive if it is abandoned
    (a timed-out prompt still waits for a line; a daemon thread lets the process exit)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(func())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="localsample-ask").start()
    return await asyncio.wrap_future(future)


class TerminalApprover:
    """Asks the person at the terminal (stderr and stdin)."""

    unavailable = "there is no terminal"

    def __init__(self) -> None:
        self.out = sys.stderr
        self._turn = threading.Lock()  # concurrent requests are asked one after another

    def available(self) -> bool:
        return sys.stdin.isatty()

    def _read(self, prompt: str) -> str:
        self.out.write(prompt)
        self.out.flush()
        line = sys.stdin.readline()
        if not line:
            raise EOFError("the terminal closed")
        return line.strip()

    def _ask(self, pending: Pending) -> Decision:
        request = pending.request
        self.out.write("\n" + Pending(pending.server, pending.model, pending.reason, request).summary() + "\n")
        while True:
            answer = self._read("Approve? [y]es / [n]o / [e]dit: ").lower()
            if answer in ("y", "yes"):
                return Decision(True, TERMINAL, "approved", request, human=True)
            if answer in ("n", "no"):
                reason = self._read("Reason (optional): ") or "no reason given"
                return Decision(False, TERMINAL, reason, human=True)
            if answer in ("e", "edit"):
                prompt = self._read("New prompt (empty keeps it): ")
                max_tokens = self._read(f"maxTokens [{request.max_tokens}]: ")
                temperature = self._read(f"temperature [{request.temperature}]: ")
                try:
                    request = edited(
                        request,
                        prompt or None,
                        int(max_tokens) if max_tokens else None,
                        float(temperature) if temperature else None,
                    )
                except ValueError as exc:
                    self.out.write(f"not changed: {exc}\n")
                self.out.write(Pending(pending.server, pending.model, pending.reason, request).summary() + "\n")

    def _review(self, text: str) -> str | None:
        self.out.write(f"\nResponse:\n{text}\n")
        while True:
            answer = self._read("Send it? [y]es / [n]o / [e]dit: ").lower()
            if answer in ("y", "yes"):
                return text
            if answer in ("n", "no"):
                return None
            if answer in ("e", "edit"):
                return self._read("New response (one line): ")

    def _ask_tool(self, server: str, call: ToolCall) -> Decision:
        self.out.write(f"\nThe model wants to run a tool of server '{server}':\n  {call_line(call)}\n")
        while True:
            answer = self._read("Run it? [y]es / [n]o / [a]lways (this tool, this session): ").lower()
            if answer in ("y", "yes"):
                return Decision(True, TERMINAL, "approved", human=True)
            if answer in ("a", "always"):
                return Decision(True, TERMINAL, "always", human=True)
            if answer in ("n", "no"):
                reason = self._read("Reason, for the model (optional): ") or "no reason given"
                return Decision(False, TERMINAL, reason, human=True)

    def _one_at_a_time(self, ask: Callable[[], T]) -> T:
        with self._turn:
            return ask()

    async def approve(self, pending: Pending) -> Decision:
        return await in_daemon_thread(lambda: self._one_at_a_time(lambda: self._ask(pending)))

    async def review(self, pending: Pending, text: str) -> str | None:
        return await in_daemon_thread(lambda: self._one_at_a_time(lambda: self._review(text)))

    async def approve_tool(self, server: str, call: ToolCall) -> Decision:
        """Ask whether the agent may run ``call`` on ``server`` (``reason`` "always": and
        this tool from now on, for this session)."""
        return await in_daemon_thread(lambda: self._one_at_a_time(lambda: self._ask_tool(server, call)))


APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approve": {"type": "boolean", "title": "Approve", "description": "Let the local model answer this request"},
        "reason": {"type": "string", "title": "Reason", "description": "Why not (if rejecting)"},
    },
    "required": ["approve"],
}
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "send": {"type": "boolean", "title": "Send", "description": "Send this response to the server"},
        "response": {"type": "string", "title": "Edited response", "description": "Leave empty to send it as is"},
    },
    "required": ["send"],
}


class ElicitationApprover:
    """Asks the host's user through MCP elicitation (serve: the host owns stdin/stdout)."""

    unavailable = "the host does not support elicitation"

    def __init__(self, host: Callable[[], ServerSession | None]) -> None:
        self.host = host

    def available(self) -> bool:
        host = self.host()
        caps = types.ClientCapabilities(elicitation=types.ElicitationCapability())
        return host is not None and host.can_send_request and host.check_client_capability(caps)

    async def _elicit(self, message: str, schema: dict[str, Any]) -> types.ElicitResult:
        host = self.host()
        assert host is not None
        return await host.elicit_form(message, schema)

    async def approve(self, pending: Pending) -> Decision:
        result = await self._elicit(pending.summary() + "\n\nApprove this sampling request?", APPROVAL_SCHEMA)
        content = result.content or {}
        if result.action == "accept" and content.get("approve") is True:
            return Decision(True, HOST, "approved", pending.request, human=True)
        reason = str(content.get("reason") or f"the user chose {result.action}")
        return Decision(False, HOST, reason, human=True)

    async def review(self, pending: Pending, text: str) -> str | None:
        result = await self._elicit(f"Response from {pending.model}:\n{text}\n\nSend it to the server?", REVIEW_SCHEMA)
        content = result.content or {}
        if result.action != "accept" or content.get("send") is not True:
            return None
        return str(content.get("response") or text)
