"""An agent's conversation: its turns, kept within the model's context, saved and resumed.

The context is measured before each step with the estimate selection uses (about three
characters a token, which overestimates for prose), and checked exactly by the engine:

- a tool result longer than ``tool_result_share`` of ``n_ctx`` is cut when it is added,
  with a note to the model that it was cut;
- when the turns (plus the tools offered and the step's ``max_tokens``) would not fit,
  the oldest are dropped first, whole exchanges at a time (a call and its results stay
  together), never the latest user message or the latest exchange, and the turns kept
  start with a user message; one log line says so.

A saved conversation is one JSON object (``version``, ``system``, ``model``, ``messages``)
written with mode 0600: it holds prompts and tool results.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsample.errors import AgentError
from localsample.generation import ChatMessage, ToolCall, ToolSpec
from localsample.selection import CHARS_PER_TOKEN, estimate_tokens

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROLES = ("user", "assistant", "tool")


def truncated_result(text: str, n_ctx: int, share: float) -> str:
    """``text``, cut to about ``share`` of ``n_ctx`` tokens with a note saying so."""
    limit = max(int(n_ctx * share) * CHARS_PER_TOKEN, 200)
    if len(text) <= limit:
        return text
    note = (
        f"\n[cut: the result had {len(text)} characters; only the first {limit} are shown. "
        "Ask the tool for less (a narrower query or a part) if more is needed.]"
    )
    return text[:limit] + note


def tools_tokens(tools: Sequence[ToolSpec]) -> int:
    """About how many prompt tokens the tools' descriptions take."""
    chars = sum(len(t.name) + len(t.description) + len(json.dumps(dict(t.input_schema))) for t in tools)
    return chars // CHARS_PER_TOKEN + 40 * bool(tools)


def message_chars(message: ChatMessage) -> int:
    return len(message.content) + sum(len(c.name) + len(json.dumps(dict(c.arguments))) for c in message.tool_calls)


@dataclass
class Conversation:
    """The turns so far (the system prompt apart) and the model that speaks in them."""

    messages: list[ChatMessage] = field(default_factory=list)
    system: str | None = None
    model: str | None = None

    def add(self, message: ChatMessage) -> None:
        self.messages.append(message)

    def estimate(self, messages: Sequence[ChatMessage] | None = None) -> int:
        """About how many prompt tokens ``messages`` (default: all) and the system take."""
        shown = self.messages if messages is None else messages
        chars = sum(map(message_chars, shown)) + len(self.system or "")
        return estimate_tokens(chars, len(shown) + 1)

    def exchanges(self) -> list[list[ChatMessage]]:
        """The turns in droppable units: an assistant turn with the results of its calls
        stays whole; every other turn is a unit of its own."""
        units: list[list[ChatMessage]] = []
        for message in self.messages:
            if message.role == "tool" and units and units[-1][0].tool_calls:
                units[-1].append(message)
            else:
                units.append([message])
        return units

    def fit(self, budget: int, *, at_least: int = 0) -> int:
        """Drop the oldest exchanges until the turns fit ``budget`` tokens (estimated), and
        at least ``at_least`` of them; returns how many messages were dropped.

        The latest user message (the task) is never dropped, nor the latest exchange (the
        model needs it to go on); older turns go first, then the task's older exchanges.
        """
        units = self.exchanges()
        last_user = max((i for i, u in enumerate(units) if u[0].role == "user"), default=0)
        droppable = [i for i in range(len(units)) if i != last_user and i != len(units) - 1]
        dropped: set[int] = set()
        for index in droppable:
            kept = [m for i, u in enumerate(units) if i not in dropped for m in u]
            # A conversation starts with a user turn (templates insist): an answer whose
            # question was dropped goes too.
            if len(dropped) >= at_least and self.estimate(kept) <= budget and kept[0].role == "user":
                break
            dropped.add(index)
        if not dropped:
            return 0
        removed = sum(len(units[i]) for i in dropped)
        self.messages = [m for i, u in enumerate(units) if i not in dropped for m in u]
        log.warning("context: dropped the %d oldest messages so the conversation fits the model's context", removed)
        return removed

    # -- saving --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "system": self.system,
            "model": self.model,
            "messages": [message_json(m) for m in self.messages],
        }

    def save(self, path: Path) -> None:
        """Write the conversation to ``path`` (mode 0600, replaced whole)."""
        data = json.dumps(self.to_json(), indent=2, ensure_ascii=False).encode("utf-8")
        # A new file of our own (mkstemp: 0600, never an existing file or a link), then renamed.
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """A conversation saved by ``save``; a missing or malformed file is an ``AgentError``."""
        fix = "give a file written by `localsample run --save FILE`"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AgentError(f"--resume {path}: no such file", fix) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AgentError(f"--resume {path}: not a saved conversation ({exc})", fix) from exc
        try:
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"expected an object with version {FORMAT_VERSION}")
            messages = [message_of(item) for item in data["messages"]]
            called = {c.id for m in messages for c in m.tool_calls}
            if any(m.tool_call_id not in called for m in messages if m.role == "tool"):
                raise ValueError("a tool result answers no earlier call")
            system, model = data.get("system"), data.get("model")
            if not (system is None or isinstance(system, str)) or not (model is None or isinstance(model, str)):
                raise ValueError("system and model must be strings")
        except (KeyError, TypeError, ValueError) as exc:
            raise AgentError(f"--resume {path}: not a saved conversation ({exc})", fix) from exc
        return cls(messages, system, model)


def message_json(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        data["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": dict(c.arguments)} for c in message.tool_calls]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def message_of(item: Any) -> ChatMessage:
    """One saved message (``ValueError``/``KeyError``/``TypeError`` when malformed)."""
    role, content = item["role"], item["content"]
    if role not in ROLES or not isinstance(content, str):
        raise ValueError(f"a message has role {role!r}; expected one of {', '.join(ROLES)} with text content")
    calls = tuple(ToolCall(str(c["id"]), str(c["name"]), dict(c["arguments"])) for c in item.get("tool_calls") or [])
    call_id = item.get("tool_call_id")
    if role == "tool" and not isinstance(call_id, str):
        raise ValueError("a tool message has no tool_call_id")
    return ChatMessage(role, content, calls, call_id)
