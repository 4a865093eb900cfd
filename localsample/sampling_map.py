"""``sampling/createMessage`` params → ``GenerationRequest``, and ``Completion`` → result.

Validation follows the spec (2025-11-25); every refusal is a ``RequestError`` (-32602)
naming the field. ``image`` and ``audio`` content in user messages becomes ``Media`` at a
``MEDIA_MARKER`` in the turn's text (media.py checks the bytes against the type). Tools
in a request (``tools``, ``toolChoice``, ``tool_use`` and ``tool_result`` content) map onto
``ToolSpec``, ``ToolCall`` and ``tool`` turns; a result
that holds tool calls is a list of content blocks with ``stopReason: "toolUse"``.

localsample extension: ``metadata.response_format`` in OpenAI's shape,
``{"type": "json_schema", "json_schema": {"schema": {...}}}`` (or ``{"type":
"json_object"}``), makes the text answer JSON that follows the schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mcp import types
from pydantic import ValidationError

from localsample.catalog import SamplingDefaults
from localsample.errors import RequestError, UnsupportedContentError
from localsample.generation import (
    MEDIA_MARKER,
    ChatMessage,
    Completion,
    GenerationRequest,
    Media,
    Role,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from localsample.media import audio_of, image_of
from localsample.selection import Preferences

log = logging.getLogger(__name__)

METADATA_SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "top_p": (int, float),
    "top_k": int,
    "min_p": (int, float),
    "seed": int,
    "repeat_penalty": (int, float),
}
"""``metadata`` keys passed on to llama.cpp's sampler (in the catalog's ranges, see
``SamplingDefaults``); ``response_format`` is read too; other keys are ignored (logged once)."""

MAX_STOP_SEQUENCES = 32
"""Most stop sequences one request may send: each is matched against every new piece of
text, so an unbounded list would slow every request that shares the model."""

MAX_STOP_LENGTH = 256
"""Most characters in one stop sequence."""

MAX_TOOLS = 128
"""Most tools one request may offer (each adds to the prompt and the grammar)."""

TOOL_CHOICES: tuple[ToolChoice, ...] = ("auto", "required", "none")


def to_generation_request(params: types.CreateMessageRequestParams) -> GenerationRequest:
    """Validate a sampling request and map it onto the engine; RequestError names the field."""
    if not params.messages:
        raise RequestError("params.messages is empty", "send at least one user message")
    if params.max_tokens <= 0:
        raise RequestError(f"params.maxTokens must be positive (got {params.max_tokens})", "send maxTokens >= 1")
    if params.temperature is not None and not 0.0 <= params.temperature <= 2.0:
        raise RequestError(
            f"params.temperature must be between 0 and 2 (got {params.temperature})", "send a temperature in 0..2"
        )
    tools = tool_specs(params.tools)
    choice = tool_choice_of(params.tool_choice, tools)
    messages = chat_messages(params.messages, {t.name for t in tools})
    metadata = dict(params.metadata or {})
    response_schema = response_schema_of(metadata.pop("response_format", None))
    if response_schema is not None and tools and choice != "none":
        raise RequestError(
            "params.metadata.response_format cannot be combined with tools the model may call",
            'send toolChoice {"mode": "none"} with response_format, or leave response_format out',
        )
    return GenerationRequest(
        messages=messages,
        max_tokens=params.max_tokens,
        system=params.system_prompt or None,
        stop=tuple(stop_sequences(params.stop_sequences)),
        temperature=params.temperature,
        tools=tools,
        tool_choice=choice,
        response_schema=response_schema,
        **metadata_sampling(metadata),
    )


# -- tools --------------------------------------------------------------------------------


def tool_specs(tools: Sequence[types.Tool] | None) -> tuple[ToolSpec, ...]:
    specs: list[ToolSpec] = []
    if tools and len(tools) > MAX_TOOLS:
        raise RequestError(
            f"params.tools has {len(tools)} tools; at most {MAX_TOOLS} are accepted", "offer fewer tools"
        )
    for index, tool in enumerate(tools or ()):
        where = f"params.tools[{index}]"
        if not isinstance(tool.name, str) or not tool.name.strip():
            raise RequestError(f"{where}.name is empty", "give every tool a name")
        if any(spec.name == tool.name for spec in specs):
            raise RequestError(f"{where}.name '{tool.name}' is offered twice", "give every tool a distinct name")
        schema = tool.input_schema
        if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
            kind = schema.get("type") if isinstance(schema, Mapping) else type(schema).__name__
            raise RequestError(
                f"{where}.inputSchema must be a JSON schema of type object (got {kind!r})",
                'send an inputSchema like {"type": "object", "properties": {...}}',
            )
        specs.append(ToolSpec(tool.name, tool.description or tool.title or "", {"type": "object", **schema}))
    return tuple(specs)


def tool_choice_of(choice: types.ToolChoice | None, tools: Sequence[ToolSpec]) -> ToolChoice:
    mode = (choice.mode if choice is not None else None) or "auto"
    if mode not in TOOL_CHOICES:
        raise RequestError(
            f"params.toolChoice.mode must be auto, required or none (got {mode!r})", "send one of the three modes"
        )
    if mode == "required" and not tools:
        raise RequestError('params.toolChoice.mode is "required" but params.tools is empty', "offer at least one tool")
    return mode


# -- messages -----------------------------------------------------------------------------


def chat_messages(messages: Sequence[types.SamplingMessage], tool_names: set[str]) -> list[ChatMessage]:
    """The conversation, with tool calls on assistant turns and one ``tool`` turn per result."""
    result: list[ChatMessage] = []
    calls: set[str] = set()  # tool_use ids so far
    pending: list[str] = []  # the calls of the message just before, each answered next
    for index, message in enumerate(messages):
        where = f"params.messages[{index}]"
        blocks = message.content if isinstance(message.content, list) else [message.content]
        if any(isinstance(b, types.ToolResultContent) for b in blocks):
            turns = tool_results(message.role, blocks, calls, where)
            answered = [turn.tool_call_id or "" for turn in turns]
            if sorted(answered) != sorted(pending):
                raise RequestError(
                    f"{where} answers tool_use {sorted(answered)}; the message before it made {sorted(pending)}",
                    "answer each tool_use exactly once, in the user message right after it",
                )
            result += turns
            pending = []
            continue
        if pending:
            break
        turn = turn_of(message.role, blocks, tool_names, calls, where)
        pending = [call.id for call in turn.tool_calls]
        result.append(turn)
    if pending:
        raise RequestError(
            f"params.messages: tool_use {', '.join(repr(c) for c in pending)} has no tool_result",
            "follow every tool_use with a user message holding its tool_result",
        )
    return result


def tool_results(role: str, blocks: Sequence[object], calls: set[str], where: str) -> list[ChatMessage]:
    """A user message of tool results: one ``tool`` turn each."""
    if role != "user":
        raise RequestError(f"{where}: tool_result content belongs in a user message", "move it to a user message")
    turns: list[ChatMessage] = []
    for block in blocks:
        if not isinstance(block, types.ToolResultContent):
            raise RequestError(
                f"{where} mixes tool_result with other content",
                "send tool results alone, in a user message right after the assistant's tool_use",
            )
        if block.tool_use_id not in calls:
            raise RequestError(
                f"{where}: tool_result.toolUseId '{block.tool_use_id}' matches no earlier tool_use",
                "answer only tool_use blocks of earlier assistant messages, with their ids",
            )
        turns.append(ChatMessage("tool", result_text(block, where), tool_call_id=block.tool_use_id))
    return turns


def turn_of(role: Role, blocks: Sequence[object], tool_names: set[str], calls: set[str], where: str) -> ChatMessage:
    """A user or assistant turn: its text, and an assistant's tool calls."""
    texts: list[str] = []
    made: list[ToolCall] = []
    media: list[Media] = []
    for index, block in enumerate(blocks):
        if isinstance(block, types.TextContent):
            texts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            part = f"{where}.content" + (f"[{index}]" if len(blocks) > 1 else "")
            if role != "user":
                raise RequestError(
                    f"{part}: {block.type} content is read in user messages only", "move it to a user message"
                )
            read = image_of if isinstance(block, types.ImageContent) else audio_of
            media.append(read(block.data, block.mime_type, part))
            texts.append(MEDIA_MARKER)
        elif isinstance(block, types.ToolUseContent):
            if role != "assistant":
                raise RequestError(f"{where}: tool_use content belongs in an assistant message", "move it")
            if tool_names and block.name not in tool_names:  # without tools, history is only history
                raise RequestError(
                    f"{where}: tool_use names '{block.name}', which params.tools does not offer",
                    f"offer the tool in params.tools (offered: {', '.join(sorted(tool_names)) or 'none'})",
                )
            if block.id in calls:
                raise RequestError(f"{where}: tool_use id '{block.id}' is used twice", "give every call its own id")
            calls.add(block.id)
            made.append(ToolCall(block.id, block.name, dict(block.input)))
        else:
            raise unsupported(block, where)
    text = "".join(texts)
    if media and text.count(MEDIA_MARKER) != len(media):
        raise RequestError(
            f"{where}: its text holds {MEDIA_MARKER}, which marks where an image goes",
            f"leave the text {MEDIA_MARKER} out of the message",
        )
    return ChatMessage(role, text, tool_calls=tuple(made), media=tuple(media))


def result_text(block: types.ToolResultContent, where: str) -> str:
    """A tool result as the text the model reads."""
    texts: list[str] = []
    for item in block.content:
        if isinstance(item, types.TextContent):
            texts.append(item.text)
        elif isinstance(item, types.EmbeddedResource) and isinstance(item.resource, types.TextResourceContents):
            texts.append(item.resource.text)
        else:
            raise unsupported(item, f"{where}.content")
    if not texts and block.structured_content is not None:
        texts.append(json.dumps(block.structured_content))
    text = "\n".join(texts)
    return f"Error: {text}" if block.is_error else text


def unsupported(block: object, where: str) -> UnsupportedContentError:
    kind = getattr(block, "type", type(block).__name__)
    return UnsupportedContentError(
        f"{where} has {kind} content, which localsample does not read there",
        "send text, image or audio content in user messages (a tool result: text)",
    )


# -- other parameters ---------------------------------------------------------------------


def stop_sequences(stops: Sequence[str] | None, where: str = "params.stopSequences") -> list[str]:
    """The stop sequences, within the limits every front end applies (``where`` names the
    field in the caller's protocol)."""
    stops = list(stops or [])
    if any(not isinstance(s, str) for s in stops):
        raise RequestError(f"{where} must be a list of strings", "send stop sequences as strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(
            f"{where} has {len(stops)} entries; at most {MAX_STOP_SEQUENCES} are accepted",
            f"send at most {MAX_STOP_SEQUENCES} stop sequences",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_LENGTH:
        raise RequestError(
            f"{where} has an entry of {longest} characters; at most {MAX_STOP_LENGTH} are accepted",
            f"send stop sequences of at most {MAX_STOP_LENGTH} characters",
        )
    return stops


def response_schema_of(value: object, where: str = "params.metadata.response_format") -> Mapping[str, Any] | None:
    """The JSON schema of a ``response_format`` in OpenAI's shape (``where`` names the
    field), if any."""
    if value is None:
        return None
    fix = 'send {"type": "json_schema", "json_schema": {"schema": {...}}} or {"type": "json_object"}'
    if not isinstance(value, Mapping):
        raise RequestError(f"{where} must be an object", fix)
    kind = value.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "text":
        return None
    if kind != "json_schema":
        raise RequestError(f"{where}.type must be json_schema, json_object or text (got {kind!r})", fix)
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise RequestError(f"{where}.json_schema.schema must be a JSON schema object", fix)
    return schema


_warned_metadata: set[str] = set()


def metadata_sampling(metadata: Mapping[str, Any]) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for key, value in metadata.items():
        expected = METADATA_SAMPLING_KEYS.get(key)
        if expected is None:
            if key not in _warned_metadata:
                _warned_metadata.add(key)
                log.info(
                    "ignoring metadata key %r (used: %s)", key, ", ".join([*METADATA_SAMPLING_KEYS, "response_format"])
                )
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            raise RequestError(f"params.metadata.{key} must be a number (got {value!r})", f"send a numeric {key}")
        chosen[key] = value
    check_sampling_ranges(chosen, "params.metadata.")
    return chosen


def check_sampling_ranges(values: Mapping[str, Any], prefix: str) -> None:
    """Sampler values must lie in the ranges the catalog's defaults do (``SamplingDefaults``);
    the error names the field as ``prefix`` + its key."""
    try:
        SamplingDefaults(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        raise RequestError(
            f"{prefix}{key} is out of range: {error['msg'].lower()} (got {values[key]!r})",
            f"send {key} within its range, or leave it out to use the model's default",
        ) from None


def preferences_of(params: types.CreateMessageRequestParams) -> Preferences:
    prefs = params.model_preferences
    if prefs is None:
        return Preferences()
    return Preferences(
        hints=tuple(h.name for h in prefs.hints or () if h.name),
        cost=prefs.cost_priority,
        speed=prefs.speed_priority,
        intelligence=prefs.intelligence_priority,
    )


# -- the result ---------------------------------------------------------------------------


def to_result(completion: Completion) -> types.CreateMessageResult | types.CreateMessageResultWithTools:
    """One text block (what 1.x servers validate), or, when the model called tools, a list:
    the text before the calls (if any) and one tool_use block per call."""
    if not completion.tool_calls:
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=completion.text),
            model=completion.model,
            stop_reason=completion.stop_reason,
        )
    blocks: list[types.SamplingMessageContentBlock] = []
    if completion.text:
        blocks.append(types.TextContent(type="text", text=completion.text))
    blocks += [
        types.ToolUseContent(type="tool_use", id=c.id, name=c.name, input=dict(c.arguments))
        for c in completion.tool_calls
    ]
    return types.CreateMessageResultWithTools(
        role="assistant", content=blocks, model=completion.model, stop_reason="toolUse"
    )
