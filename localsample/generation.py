"""What a generation is, whoever runs it: request, completion, stop matching, the seam.

This module is a leaf (it imports only the error tree), so every layer can share these
types: the MCP mapping builds a ``GenerationRequest``, the pool hands out ``Generator``s
(the in-process llama.cpp engine today; remote engines and a daemon client implement the
same protocol), and every generator returns a ``Completion`` with an exact stop reason.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from localsample.errors import RequestError

Role = Literal["system", "user", "assistant", "tool"]
StopReason = Literal["endTurn", "stopSequence", "maxTokens", "toolUse"]
MediaKind = Literal["image", "audio"]
ToolChoice = Literal["auto", "required", "none"]
"""``auto``: the model decides; ``required``: it must call a tool; ``none``: it must not."""

OnText = Callable[[str, int], Awaitable[None]]
"""Called on the event loop with each new piece of text and the completion tokens so far."""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its name, what it does, and a JSON schema of its input."""

    name: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or made earlier, in a conversation's history)."""

    id: str
    name: str
    arguments: Mapping[str, Any]


MEDIA_MARKER = "<__media__>"
"""Where a message's image or audio stands in its ``content`` (one marker per item of
``media``, in order); the engine hands the rendered prompt to llama.cpp's multimodal
library, which puts each item's embeddings there."""


@dataclass(frozen=True)
class Media:
    """An image or audio clip in a user message, checked (media.py): the bytes as sent,
    their type, and what a person is shown of them (never the bytes)."""

    kind: MediaKind
    mime_type: str
    data: bytes = field(repr=False)
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    """An audio clip's length, where its header tells it (WAV)."""

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the bytes: the image's identity in the engine's caches."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    def describe(self) -> str:
        """``image/png 640x480, 12.3 KB``: what approval and logs show."""
        size = f"{len(self.data) / 1024:.1f} KB"
        if self.kind == "image":
            return f"{self.mime_type} {self.width}x{self.height}, {size}"
        length = f"{self.seconds:.1f} s, " if self.seconds is not None else ""
        return f"{self.mime_type} {length}{size}"


@dataclass(frozen=True)
class ChatMessage:
    """One turn. An assistant turn may carry ``tool_calls``; a ``tool`` turn is the result
    of the call ``tool_call_id`` (its text in ``content``). A user turn may carry ``media``,
    each standing at a ``MEDIA_MARKER`` in ``content``."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    media: tuple[Media, ...] = ()

    def __post_init__(self) -> None:
        markers = self.content.count(MEDIA_MARKER) if self.media else 0  # text alone may hold one: it is text
        if markers != len(self.media):
            raise RequestError(
                f"a {self.role} message's text holds {markers} media markers ({MEDIA_MARKER}) "
                f"for {len(self.media)} images or audio clips",
                f"leave the text {MEDIA_MARKER} out of messages: it marks where an image goes",
            )

    @property
    def text(self) -> str:
        """The content without media markers (what a person reads)."""
        return self.content.replace(MEDIA_MARKER, "") if self.media else self.content

    def shown(self) -> str:
        """The content with each medium described in brackets: ``[image image/png 64x48, 1.2 KB]``."""
        if not self.media:
            return self.content
        pieces = self.content.split(MEDIA_MARKER)
        out = [pieces[0]]
        for medium, piece in zip(self.media, pieces[1:], strict=True):
            out += [f"[{medium.kind} {medium.describe()}]", piece]
        return "".join(out)


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. ``None`` sampling values fall back to the catalog's defaults."""

    messages: Sequence[ChatMessage]
    max_tokens: int
    system: str | None = None
    stop: Sequence[str] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    tools: Sequence[ToolSpec] = ()
    tool_choice: ToolChoice = "auto"
    response_schema: Mapping[str, Any] | None = None
    """A JSON schema the text answer must follow (when no tool is called)."""

    @property
    def offers_tools(self) -> bool:
        """Whether the model may call a tool in its answer."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def media(self) -> list[Media]:
        """Every image and audio clip, in the order of the conversation."""
        return [medium for message in self.messages for medium in message.media]

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise RequestError(f"maxTokens must be positive (got {self.max_tokens})", "send maxTokens >= 1")
        if not self.messages:
            raise RequestError("the request has no messages", "send at least one user message")


@dataclass(frozen=True)
class Completion:
    """A finished generation with its counts and timings (seconds)."""

    text: str
    model: str
    stop_reason: StopReason
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    duration: float
    tool_calls: tuple[ToolCall, ...] = ()
    engine: str | None = None
    """The remote engine's URL that answered (None: in this process or its daemon's)."""

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time after the first (prompt eval excluded)."""
        decode_time = self.duration - self.time_to_first_token
        if self.completion_tokens < 2 or decode_time <= 0:
            return 0.0
        return (self.completion_tokens - 1) / decode_time


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler values one request runs with, every default already applied."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int | None


class StopMatcher:
    """Finds stop sequences in streamed text, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Text safe to emit now, and the stop sequence found (the text before it is returned)."""
        if not self.stops:
            return piece, None
        text = self.held + piece
        found: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is not None:
            self.held = ""
            return text[: found[0]], found[1]
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        self.held = text[len(text) - hold :]
        return text[: len(text) - hold], None

    def flush(self) -> str:
        """The text held back when generation ends without a stop sequence."""
        held, self.held = self.held, ""
        return held


@dataclass(frozen=True)
class Constraint:
    """Grammar-constrained decoding for one request (llama.cpp GBNF, root rule ``root``).

    Without a ``trigger`` the grammar covers the whole answer. With one, the model writes
    freely until the trigger text appears (a tool-call opener); the generation is then cut
    back to just before the trigger and the grammar covers the rest, trigger included.
    """

    grammar: str
    trigger: str | None = None


@dataclass
class Job:
    """One generation in flight: shared between the event loop and a worker thread."""

    request: GenerationRequest
    sampling: SamplerSettings
    emit: Callable[[str, int], None]
    """Worker thread: new text and the completion tokens so far."""
    constraint: Constraint | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    admitted: threading.Event = field(default_factory=threading.Event)
    """Set when the job leaves the queue and starts (its prompt is being evaluated)."""


class Generator(Protocol):
    """The generation seam: what the pool hands out for one catalog model.

    ``generate`` streams text to ``on_text`` and returns the completion; cancelling the
    calling task stops generation (within a token for the llama.cpp engine) and frees its
    resources before the cancellation propagates. A request that waits longer than
    ``queue_timeout`` seconds for the generator to start it gets ``BusyError``.
    """

    model_id: str

    @property
    def loaded(self) -> bool:
        """Whether the model is ready to generate without a load first."""
        ...

    @property
    def size(self) -> int:
        """Bytes the model takes when loaded (its files' size for a GGUF)."""
        ...

    async def ensure_loaded(self) -> None: ...

    @property
    def running(self) -> int:
        """Requests generating now (not those waiting for a turn)."""
        ...

    async def generate(
        self, request: GenerationRequest, on_text: OnText | None = None, *, queue_timeout: float | None = None
    ) -> Completion: ...

    async def reset_cache(self) -> None:
        """Forget every cached prompt: the next request evaluates its whole prompt."""
        ...

    def close(self) -> None:
        """Unload the model and free what it holds (safe to call more than once)."""
        ...
