"""OpenAI chat completions ⇄ the library's request and completion types.

The HTTP front end (openai_api.py) reads a request body with :func:`parse_chat` (pydantic
models of the fields localsample serves: unknown fields are ignored, as OpenAI-compatible
servers do, but a field of the wrong type is refused), maps it onto a
``GenerationRequest`` with :func:`to_generation_request` under the same limits as the MCP
path (sampling_map.py: stop sequences, tools, response_format, sampler ranges), and
writes results with the ``openai`` package's own response types (:func:`chat_completion`,
:class:`Chunks`). Every refusal is an :class:`InvalidField`, a ``RequestError`` that names
the field (OpenAI's ``param``).

OpenAI → GenerationRequest: ``system`` and ``developer`` messages → ``system`` (joined);
``user``/``assistant``/``tool`` messages → turns (assistant ``tool_calls`` with JSON-string
arguments; ``tool`` messages answer them by ``tool_call_id``); ``max_completion_tokens``,
else ``max_tokens``, else a default; ``tools`` + ``tool_choice`` (a named function becomes
``required`` with only that tool offered); llama.cpp's ``top_k``, ``min_p`` and
``repeat_penalty`` too (openai_request.py sends them); ``response_format`` ``json_schema`` /
``json_object`` → ``response_schema``. Completion → OpenAI: ``finish_reason`` stop /
length / tool_calls, plus ``stop_reason``, the stop sequence matched (as vLLM reports it).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import ChatCompletionMessageFunctionToolCall as FunctionToolCall
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_message_function_tool_call import Function
from pydantic import BaseModel, ConfigDict, ValidationError

from localsample.generation import ChatMessage, Completion, GenerationRequest, ToolCall, ToolChoice, ToolSpec
from localsample.openai_content import InvalidField, field, text_of, user_content
from localsample.sampling_map import MAX_TOOLS, check_sampling_ranges, response_schema_of, stop_sequences

FinishReason = Literal["stop", "length", "tool_calls"]
FINISH_REASONS: dict[str, FinishReason] = {
    "endTurn": "stop",
    "stopSequence": "stop",
    "maxTokens": "length",
    "toolUse": "tool_calls",
}
DEFAULT_MAX_TOKENS = 1024
"""maxTokens of a request that sends neither max_tokens nor max_completion_tokens (unless the
client's settings cap it lower: servers.NAME.max_tokens)."""


# -- the request --------------------------------------------------------------------------


class Lenient(BaseModel):
    """Unknown fields are ignored; known ones must have their JSON type (no coercion)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class FunctionCallIn(Lenient):
    name: str
    arguments: str


class ToolCallIn(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionIn(Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(Lenient):
    type: Literal["function"]
    function: FunctionIn


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Lenient):
    include_usage: bool | None = None


class ChatRequest(Lenient):
    """The fields of a chat-completions request that localsample reads."""

    model: str
    messages: list[MessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    response_format: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    localsample: dict[str, Any] | None = None
    """What an attached localsample client adds (attach_api.py)."""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
"""Names pydantic puts in an error's location for union members, which are not fields."""


def param_of(loc: Sequence[int | str]) -> str:
    """A validation error's location as a field path: ``messages[0].content``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in TYPE_TAGS:
            path += f".{part}" if path else part
    return path


def parse_chat(body: bytes) -> ChatRequest:
    """The request body as a :class:`ChatRequest`; InvalidField names the first bad field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError) -> InvalidField:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidField(None, f"the request body is not valid JSON ({first['msg']})", "send a JSON object")
    param = param_of(first["loc"])
    if not param:
        return InvalidField(None, "the request body must be a JSON object", "send a JSON object")
    messages = list(dict.fromkeys(e["msg"].lower() for e in errors if param_of(e["loc"]) == param))
    got = "" if first["type"] == "missing" else f" (got {json.dumps(first['input'])[:80]})"
    return InvalidField(param, f"{param}: {' or '.join(messages)}{got}", f"send {param} as the OpenAI API defines it")


def to_generation_request(chat: ChatRequest, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerationRequest:
    """Map a parsed request onto the engine; InvalidField names the field it refuses."""
    if chat.n is not None and chat.n != 1:
        raise InvalidField("n", f"n: only one choice per request is served (got {chat.n})", "leave n out")
    name, max_tokens = "max_completion_tokens", chat.max_completion_tokens
    if max_tokens is None:
        name, max_tokens = "max_tokens", chat.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens <= 0:
        raise InvalidField(name, f"{name} must be positive (got {max_tokens})", f"send {name} >= 1")
    if chat.temperature is not None and not 0.0 <= chat.temperature <= 2.0:
        raise InvalidField(
            "temperature", f"temperature must be between 0 and 2 (got {chat.temperature})", "send a temperature in 0..2"
        )
    extra = {"top_p": chat.top_p, "top_k": chat.top_k, "min_p": chat.min_p, "repeat_penalty": chat.repeat_penalty}
    for key, value in (*extra.items(), ("seed", chat.seed)):
        with field(key):
            check_sampling_ranges({key: value} if value is not None else {}, "")
    with field("stop"):
        stop = stop_sequences([chat.stop] if isinstance(chat.stop, str) else chat.stop, "stop")
    tools, choice = tools_of(chat.tools or [], chat.tool_choice)
    system, messages = messages_of(chat.messages, {t.function.name for t in chat.tools or []})
    with field("response_format"):
        schema = response_schema_of(chat.response_format, "response_format")
    if schema is not None and tools and choice != "none":
        raise InvalidField(
            "response_format",
            "response_format cannot be combined with tools the model may call",
            'send tool_choice "none" with response_format, or leave response_format out',
        )
    with field("messages"):
        return GenerationRequest(
            messages=messages,
            max_tokens=max_tokens,
            system=system,
            stop=tuple(stop),
            temperature=chat.temperature,
            top_p=chat.top_p,
            top_k=chat.top_k,
            min_p=chat.min_p,
            repeat_penalty=chat.repeat_penalty,
            seed=chat.seed,
            tools=tools,
            tool_choice=choice,
            response_schema=schema,
        )


def tools_of(
    tools: Sequence[ToolIn], choice: Literal["auto", "none", "required"] | NamedToolChoice | None
) -> tuple[tuple[ToolSpec, ...], ToolChoice]:
    """The tools offered and the tool choice; a named function is ``required``, alone."""
    if len(tools) > MAX_TOOLS:
        raise InvalidField("tools", f"tools has {len(tools)} tools; at most {MAX_TOOLS} are accepted", "offer fewer")
    specs: list[ToolSpec] = []
    for index, tool in enumerate(tools):
        where, function = f"tools[{index}].function", tool.function
        if not function.name.strip():
            raise InvalidField(f"{where}.name", f"{where}.name is empty", "give every tool a name")
        if any(spec.name == function.name for spec in specs):
            raise InvalidField(f"{where}.name", f"{where}.name '{function.name}' is offered twice", "rename one")
        schema = function.parameters if function.parameters is not None else {"properties": {}}
        if schema.get("type", "object") != "object":
            raise InvalidField(
                f"{where}.parameters",
                f"{where}.parameters must be a JSON schema of type object (got {schema.get('type')!r})",
                'send parameters like {"type": "object", "properties": {...}}',
            )
        specs.append(ToolSpec(function.name, function.description or "", {"type": "object", **schema}))
    if isinstance(choice, NamedToolChoice):
        named = [spec for spec in specs if spec.name == choice.function.name]
        if not named:
            raise InvalidField(
                "tool_choice",
                f"tool_choice names the function '{choice.function.name}', which tools does not offer",
                f"name one of the tools offered ({', '.join(s.name for s in specs) or 'none'})",
            )
        return tuple(named), "required"
    if choice == "required" and not specs:
        raise InvalidField("tool_choice", 'tool_choice is "required" but tools is empty', "offer at least one tool")
    return tuple(specs), choice or "auto"


def messages_of(messages: Sequence[MessageIn], tool_names: set[str]) -> tuple[str | None, list[ChatMessage]]:
    """The system prompt (every system and developer message) and the conversation."""
    system: list[str] = []
    turns: list[ChatMessage] = []
    calls: set[str] = set()  # tool-call ids so far
    pending: list[str] = []  # calls not answered yet by a tool message
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role == "tool":
            turns.append(tool_turn(message, pending, where))
            continue
        if pending:
            raise InvalidField(
                where,
                f"{where} follows tool_calls {pending} that no tool message answers",
                "send one tool message per tool call, with its tool_call_id, right after the assistant message",
            )
        if message.role == "user":
            text, media = user_content(message.content, where)
            turns.append(ChatMessage("user", text, media=media))
            continue
        text = text_of(message.content, where)
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            made = tool_calls_of(message.tool_calls or [], tool_names, calls, where)
            pending = [call.id for call in made]
            turns.append(ChatMessage("assistant", text, tool_calls=made))
    if pending:
        raise InvalidField("messages", f"messages: tool_calls {pending} have no tool message", "answer every tool call")
    return "\n\n".join(system) or None, turns


def tool_turn(message: MessageIn, pending: list[str], where: str) -> ChatMessage:
    """A ``tool`` message: the result of one pending call."""
    if message.tool_call_id is None or message.tool_call_id not in pending:
        raise InvalidField(
            f"{where}.tool_call_id",
            f"{where}.tool_call_id {message.tool_call_id!r} answers no pending tool call (pending: {pending})",
            "answer each tool call of the assistant message before, once, with its id",
        )
    pending.remove(message.tool_call_id)
    return ChatMessage("tool", text_of(message.content, where), tool_call_id=message.tool_call_id)


def tool_calls_of(
    calls: Sequence[ToolCallIn], tool_names: set[str], seen: set[str], where: str
) -> tuple[ToolCall, ...]:
    """An assistant message's tool calls, with their arguments parsed."""
    made: list[ToolCall] = []
    for index, call in enumerate(calls):
        at = f"{where}.tool_calls[{index}]"
        if tool_names and call.function.name not in tool_names:  # without tools, history is only history
            raise InvalidField(
                f"{at}.function.name",
                f"{at} calls '{call.function.name}', which tools does not offer",
                f"offer the tool in tools (offered: {', '.join(sorted(tool_names))})",
            )
        if call.id in seen:
            raise InvalidField(f"{at}.id", f"{at}.id '{call.id}' is used twice", "give every call its own id")
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidField(
                f"{at}.function.arguments",
                f"{at}.function.arguments is not a JSON object",
                'send the arguments as a JSON object in a string, e.g. "{\\"city\\": \\"Paris\\"}"',
            )
        seen.add(call.id)
        made.append(ToolCall(call.id, call.function.name, arguments))
    return tuple(made)


# -- the response -------------------------------------------------------------------------


def finish_reason(completion: Completion) -> FinishReason:
    return "tool_calls" if completion.tool_calls else FINISH_REASONS[completion.stop_reason]


def usage_of(completion: Completion) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )


def call_ids(completion: Completion) -> list[str]:
    """One distinct id per tool call: the model's, or a fresh one where it is empty or repeated."""
    ids: list[str] = []
    for call in completion.tool_calls:
        ids.append(call.id if call.id and call.id not in ids else f"call_{uuid.uuid4().hex[:16]}")
    return ids


def arguments_text(call: ToolCall) -> str:
    return json.dumps(dict(call.arguments), ensure_ascii=False)


def chat_completion(request_id: str, created: int, completion: Completion) -> ChatCompletion:
    """A whole answer as OpenAI's ``chat.completion`` object."""
    calls = [
        FunctionToolCall(id=call_id, type="function", function=Function(name=call.name, arguments=arguments_text(call)))
        for call_id, call in zip(call_ids(completion), completion.tool_calls, strict=True)
    ]
    message = ChatCompletionMessage(
        role="assistant",
        content=completion.text if completion.text or not calls else None,
        tool_calls=calls or None,
    )
    choice = Choice(
        index=0,
        message=message,
        finish_reason=finish_reason(completion),
        logprobs=None,
        stop_reason=completion.stop_sequence,
    )
    return ChatCompletion(
        id=request_id,
        object="chat.completion",
        created=created,
        model=completion.model,
        choices=[choice],
        usage=usage_of(completion),
    )


class Chunks:
    """The ``chat.completion.chunk`` events of one streamed answer, as JSON texts."""

    def __init__(self, request_id: str, created: int, include_usage: bool) -> None:
        self.request_id = request_id
        self.created = created
        self.include_usage = include_usage
        self.model = ""

    def chunk(self, choices: list[ChunkChoice], usage: CompletionUsage | None = None) -> str:
        extra: dict[str, Any] = {"usage": usage} if self.include_usage else {}
        return ChatCompletionChunk(
            id=self.request_id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=choices,
            **extra,
        ).model_dump_json(exclude_unset=True)

    def delta(self, delta: ChoiceDelta) -> str:
        return self.chunk([ChunkChoice(index=0, delta=delta, finish_reason=None, logprobs=None)])

    def role(self) -> str:
        """The first chunk: the assistant's role and empty content."""
        return self.delta(ChoiceDelta(role="assistant", content=""))

    def text(self, text: str) -> str:
        return self.delta(ChoiceDelta(content=text))

    def tool_calls(self, completion: Completion) -> str:
        """Every tool call of the answer, whole, in one delta."""
        calls = [
            ChoiceDeltaToolCall(
                index=index,
                id=call_id,
                type="function",
                function=ChoiceDeltaToolCallFunction(name=call.name, arguments=arguments_text(call)),
            )
            for index, (call_id, call) in enumerate(zip(call_ids(completion), completion.tool_calls, strict=True))
        ]
        return self.delta(ChoiceDelta(tool_calls=calls))

    def finish(self, completion: Completion) -> str:
        """The last chunk of the choice: why it ended (and the stop sequence matched)."""
        choice = ChunkChoice(
            index=0,
            delta=ChoiceDelta(),
            finish_reason=finish_reason(completion),
            logprobs=None,
            stop_reason=completion.stop_sequence,
        )
        return self.chunk([choice])

    def usage(self, completion: Completion) -> str:
        """With ``stream_options.include_usage``: the tokens, after the last choice chunk."""
        return self.chunk([], usage_of(completion))
