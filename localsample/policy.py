"""Guardrails and human approval for sampling requests, per server.

``Limits`` applies a server's settings before generation: the maxTokens cap (clamp or
reject) and rate limits over a rolling minute (requests, and generated tokens). An
``Approver`` decides whether a request goes ahead: automatically, never, or by asking a
human (at the terminal for `call`/`sample`, through MCP elicitation in `serve`). A human
may edit the prompt and parameters, and review the response before it goes back: for a
request with tools the person sees the tools offered and the calls the model proposes,
and sends or rejects the answer as a whole (an edit is applied only to answers without calls).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from localsample.errors import RateLimitError, RequestError
from localsample.generation import MEDIA_MARKER, ChatMessage, Completion, GenerationRequest, ToolCall
from localsample.media import check_limits
from localsample.settings import Settings

log = logging.getLogger(__name__)

WINDOW = 60.0
"""Seconds of the rolling window of the per-minute limits."""


@dataclass(frozen=True)
class Decision:
    approved: bool
    by: str  # "policy", "user at the terminal", "host user (elicitation)", "timeout"
    reason: str = ""
    request: GenerationRequest | None = None  # the request to run, if a human edited it
    human: bool = False  # a person decided (so a person may also review the response)


@dataclass(frozen=True)
class Pending:
    """What a human is shown: the server, the chosen model and why, the request."""

    server: str
    model: str
    reason: str
    request: GenerationRequest

    def summary(self) -> str:
        lines = [f"Sampling request from server '{self.server}'", f"model: {self.model} ({self.reason})"]
        if self.request.system:
            lines.append(f"system: {self.request.system}")
        for m in self.request.messages:
            lines.append(f"{m.role}: {m.shown()}" if m.content or not m.tool_calls else f"{m.role}:")
            lines += [f"  calls {call_line(c)}" for c in m.tool_calls]
        if self.request.offers_tools:
            names = ", ".join(t.name for t in self.request.tools)
            lines.append(f"tools offered: {names} (toolChoice {self.request.tool_choice})")
        params = f"maxTokens {self.request.max_tokens}"
        if self.request.temperature is not None:
            params += f", temperature {self.request.temperature}"
        if self.request.stop:
            params += f", stop {list(self.request.stop)}"
        lines.append(params)
        return "\n".join(lines)


def call_line(call: ToolCall) -> str:
    """A tool call on one line: ``name({"arg": 1})``."""
    return f"{call.name}({json.dumps(dict(call.arguments), ensure_ascii=False)})"


def shown_response(completion: Completion) -> str:
    """What a reviewer is shown: the text, and the calls the model proposes."""
    lines = [completion.text] if completion.text else []
    lines += [f"calls {call_line(c)}" for c in completion.tool_calls]
    return "\n".join(lines)


class Approver(Protocol):
    def available(self) -> bool:
        """Whether a human can be asked here and now."""
        ...

    async def approve(self, pending: Pending) -> Decision: ...

    async def review(self, pending: Pending, text: str) -> str | None:
        """The response to send (possibly edited), or None to reject it."""
        ...


class Asker(Approver, Protocol):
    """An approver that asks a person (at the terminal, or the host's user)."""

    unavailable: str
    """Why no person can be asked, when ``available()`` is False (for the log)."""


class AutoApprover:
    def available(self) -> bool:
        return True

    async def approve(self, pending: Pending) -> Decision:
        return Decision(True, "policy", "approve = auto")

    async def review(self, pending: Pending, text: str) -> str | None:
        return text


class DenyApprover:
    def __init__(self, why: str) -> None:
        self.why = why

    def available(self) -> bool:
        return True

    async def approve(self, pending: Pending) -> Decision:
        return Decision(False, "policy", self.why)

    async def review(self, pending: Pending, text: str) -> str | None:
        return None


def edited(
    request: GenerationRequest, prompt: str | None, max_tokens: int | None, temp: float | None
) -> GenerationRequest:
    """The request with a new last user message and/or parameters, as a human edited it
    (the message's images and audio stay, before the new text)."""
    messages = list(request.messages)
    if prompt:
        last = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages) - 1)
        kept = messages[last].media
        messages[last] = ChatMessage("user", MEDIA_MARKER * len(kept) + prompt, media=kept)
    return dataclasses.replace(
        request,
        messages=messages,
        max_tokens=max_tokens if max_tokens is not None else request.max_tokens,
        temperature=temp if temp is not None else request.temperature,
    )


def choose_approver(settings: Settings, server: str, ask: Asker | None) -> Approver:
    """The approver a server's settings call for: auto, deny, or ``ask`` (a person) when one
    can be asked here, else its ``ask_fallback``."""
    policy = settings.server(server)
    key = f"servers.{server}" if server in settings.servers else 'servers."*"'
    if policy.approve == "auto":
        return AutoApprover()
    if policy.approve == "deny":
        return DenyApprover(f"approve = deny for server '{server}' ({key}.approve)")
    if ask is not None and ask.available():
        return ask
    where = ask.unavailable if ask is not None else "there is no terminal"
    log.warning("%s: approve = ask, but %s: %s.ask_fallback = %s", server, where, key, policy.ask_fallback)
    if policy.ask_fallback == "auto":
        return AutoApprover()
    return DenyApprover(f"approve = ask, but {where} to ask on ({key}.ask_fallback = deny)")


class Limits:
    """Per-server maxTokens caps and rate limits over a rolling minute."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.requests: dict[str, deque[float]] = {}
        self.tokens: dict[str, deque[tuple[float, int]]] = {}

    def check(self, server: str, request: GenerationRequest) -> GenerationRequest:
        """The request as allowed (clamped), or RejectedError / RequestError naming the setting."""
        policy = self.settings.server(server)
        now = self.clock()
        key = f"servers.{server}" if server in self.settings.servers else 'servers."*"'
        if policy.requests_per_minute is not None:
            window = self._trim(self.requests.setdefault(server, deque()), now)
            if len(window) >= policy.requests_per_minute:
                wait = WINDOW - (now - window[0])
                raise RateLimitError(
                    f"rate limit: server '{server}' already made {len(window)} sampling requests in the last "
                    f"minute (limit {policy.requests_per_minute})",
                    f"retry in {wait:.0f} s, or raise {key}.requests_per_minute in the settings",
                )
        if policy.tokens_per_minute is not None:
            spent = self._trim_tokens(self.tokens.setdefault(server, deque()), now)
            if spent >= policy.tokens_per_minute:
                raise RateLimitError(
                    f"rate limit: server '{server}' generated {spent} tokens in the last minute "
                    f"(limit {policy.tokens_per_minute})",
                    f"retry later, or raise {key}.tokens_per_minute in the settings",
                )
        if policy.max_tokens is not None and request.max_tokens > policy.max_tokens:
            if policy.over_max_tokens == "reject":
                raise RequestError(
                    f"maxTokens {request.max_tokens} is over the cap of {policy.max_tokens} for server '{server}'",
                    f"ask for at most {policy.max_tokens}, or raise {key}.max_tokens in the settings",
                )
            request = dataclasses.replace(request, max_tokens=policy.max_tokens)
        check_limits(request.media, self.settings.max_media_bytes, self.settings.max_image_pixels)
        self.requests.setdefault(server, deque()).append(now)
        return request

    def record_tokens(self, server: str, tokens: int) -> None:
        self.tokens.setdefault(server, deque()).append((self.clock(), tokens))

    def _trim(self, window: deque[float], now: float) -> deque[float]:
        while window and now - window[0] >= WINDOW:
            window.popleft()
        return window

    def _trim_tokens(self, window: deque[tuple[float, int]], now: float) -> int:
        while window and now - window[0][0] >= WINDOW:
            window.popleft()
        return sum(tokens for _, tokens in window)
