"""Tool calls on a local model: the dialect of each template family, the prompt, the parse.

A chat template that supports tools (its ``tools`` variable, tool-call and tool-result
turns) is given the tools and the history in the OpenAI message shape every such template
reads, and the model writes calls in its own family's format:

- hermes (Qwen2.5, Qwen3, QwQ, Hermes 2/3):
  ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, one block per call;
- llama3 (Llama 3.1 / 3.2 / 3.3): ``{"name": …, "parameters": {…}}``;
- mistral (Mistral Nemo and other ``[TOOL_CALLS][…]`` templates):
  ``[TOOL_CALLS][{"name": …, "arguments": {…}}]``;
- generic (any other template: SmolLM2, SmolLM3, Gemma, Phi, Mistral Small 3.2's
  ``[ARGS]`` format …): as hermes, taught by a system prompt.

The generic fallback puts the tools and the call format in the system prompt
(``GENERIC_INSTRUCTIONS``) and renders history calls and results as plain text turns.

Whatever the model, a call is decoded under a GBNF grammar built from the tools' input
schemas (grammar.py): ``required`` constrains the whole answer to calls, ``auto`` lets the
model write freely until it starts a call (the dialect's ``trigger``) and constrains the
call from there, ``none`` offers no tools. So every call names a tool of the request and
its input follows that tool's schema (``split_answer`` checks what no grammar can).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localsample.errors import RequestError, ToolCallError
from localsample.generation import ChatMessage, GenerationRequest, ToolCall, ToolSpec


@dataclass(frozen=True)
class Dialect:
    """How one family of chat templates writes tool calls."""

    name: str
    opener: str  # text that starts the calls ("" when a call is bare JSON)
    closer: str  # text that ends each call (hermes) or "" when none
    args_key: str  # "arguments" or "parameters"
    trigger: str  # the text that shows the model is starting a call (auto mode)
    in_template: bool  # the chat template renders tools, calls and results itself
    listed: bool = False  # calls as one JSON list after the opener (mistral)

    @property
    def supports_tools(self) -> bool:
        return self.in_template


HERMES = Dialect("hermes", "<tool_call>", "</tool_call>", "arguments", "<tool_call>", True)
LLAMA3 = Dialect("llama3", "", "", "parameters", '{"name"', True)
MISTRAL = Dialect("mistral", "[TOOL_CALLS]", "", "arguments", "[TOOL_CALLS]", True, listed=True)
GENERIC = Dialect("generic", "<tool_call>", "</tool_call>", "arguments", "<tool_call>", False)


def detect_dialect(template: str) -> Dialect:
    """The dialect of a chat template, from the markers its tool turns use (checked against
    the 76 templates llama.cpp ships: only the intended families match)."""
    if "[TOOL_CALLS][" in template and "[AVAILABLE_TOOLS]" in template:
        return MISTRAL
    if "<|start_header_id|>" in template and '"parameters": ' in template and "ipython" in template:
        return LLAMA3
    if "<tool_call>" in template and "<tool_response>" in template and "<function=" not in template:
        return HERMES
    return GENERIC


def template_supports_tools(template: str) -> bool:
    """Whether a chat template writes tool calls in a family localsample knows."""
    return detect_dialect(template).supports_tools


GENERIC_INSTRUCTIONS = """\
You can call tools. The tools, one JSON object each:
{tools}
To call a tool, answer with
<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>
and write nothing after it. The result comes back inside <tool_response></tool_response>."""
"""The system prompt section that teaches a model without tool support the call format."""


# -- the prompt ---------------------------------------------------------------------------


def openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tools in the shape chat templates read (OpenAI's function tools)."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": dict(t.input_schema)},
        }
        for t in tools
    ]


def template_messages(request: GenerationRequest, dialect: Dialect) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """The messages (and ``tools``) to render the request's prompt with ``dialect``."""
    offered = list(request.tools) if request.offers_tools else []
    if dialect.in_template:
        return _native_messages(request, dialect), (openai_tools(offered) or None)
    return _generic_messages(request, offered), None


def _native_messages(request: GenerationRequest, dialect: Dialect) -> list[dict[str, Any]]:
    rename = _mistral_id if dialect is MISTRAL else str
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    for m in request.messages:
        content = m.content
        if m.tool_call_id is not None and dialect is MISTRAL:
            content = json.dumps(content)  # its template writes a result's content raw into JSON
        entry: dict[str, Any] = {"role": m.role, "content": content}
        if m.tool_call_id is not None:
            entry["tool_call_id"] = rename(m.tool_call_id)
            entry["name"] = _called_name(request.messages, m.tool_call_id)
        calls = [
            {"id": rename(c.id), "type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
            for c in m.tool_calls
        ]
        if calls and dialect is LLAMA3:  # one call per turn: its template refuses more
            messages += [{**entry, "tool_calls": [call]} for call in calls]
        elif calls:
            messages.append({**entry, "tool_calls": calls})
        else:
            messages.append(entry)
    return _results_after_calls(messages) if dialect is LLAMA3 else messages


def _results_after_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Llama 3: each split-off call followed by its own result (call, result, call, result)."""
    ordered: list[dict[str, Any]] = []
    results = {m["tool_call_id"]: m for m in messages if "tool_call_id" in m}
    for message in messages:
        if "tool_call_id" in message:
            continue
        ordered.append(message)
        for call in message.get("tool_calls", ()):
            if call["id"] in results:
                ordered.append(results[call["id"]])
    return ordered


def _generic_messages(request: GenerationRequest, offered: list[ToolSpec]) -> list[dict[str, Any]]:
    system = request.system or ""
    if offered:
        listing = "\n".join(
            json.dumps({"name": t.name, "description": t.description, "parameters": dict(t.input_schema)})
            for t in offered
        )
        # The same for every toolChoice (the grammar forces a required call), so that an
        # agent's next step, in auto, reuses the prompt cached from this one.
        section = GENERIC_INSTRUCTIONS.format(tools=listing)
        system = f"{system}\n\n{section}" if system else section
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in request.messages:
        role, content = m.role, m.content
        if m.tool_calls:
            calls = "\n".join(call_text(GENERIC, c) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if turns and turns[-1]["role"] == role and role != "system":  # results of parallel calls: one turn
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


def render_prompt(formatter: Callable[..., Any], request: GenerationRequest, dialect: Dialect, model_id: str) -> str:
    """The request's prompt, rendered by ``formatter`` (llama-cpp-python's Jinja2 chat
    formatter over the model's template).

    A template that refuses a form of the conversation gets the next one: tool-use templates
    (Hermes) need a tools list even when none is offered, and some (Gemma) have no system
    role, so the system text leads the first user turn. A constrained answer starts at once,
    so thinking templates (Qwen3, SmolLM3) are told to skip thinking.
    """
    messages, tools = template_messages(request, dialect)
    constrained = request.tool_choice == "required" or request.response_schema is not None
    extra = {"enable_thinking": False} if constrained else {}
    attempts = [(messages, tools)]
    if tools is None:
        attempts.append((messages, []))
    if messages and messages[0]["role"] == "system":
        attempts.append((fold_system(messages), tools))
    for index, (turns, offered) in enumerate(attempts):
        try:
            return str(formatter(messages=turns, tools=offered, **extra).prompt)
        except Exception as exc:  # jinja2 raises many types, and templates call raise_exception
            if index == len(attempts) - 1:
                raise RequestError(
                    f"the chat template of '{model_id}' rejected the conversation: {exc}",
                    "check the order of roles (most templates want user/assistant turns alternating, "
                    "starting with user)",
                ) from exc
    raise AssertionError("unreachable")


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation without its system turn, whose text leads the first user turn (for
    templates without a system role)."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": system}, *rest]
    first["content"] = f"{system}\n\n{first['content']}"
    return rest


def call_text(dialect: Dialect, call: ToolCall) -> str:
    """One call as the dialect writes it."""
    body = json.dumps({"name": call.name, dialect.args_key: dict(call.arguments)})
    if dialect.listed:
        return f"{dialect.opener}[{body}]"
    return f"{dialect.opener}{body}{dialect.closer}"


def _called_name(messages: Sequence[ChatMessage], call_id: str) -> str:
    for m in messages:
        for c in m.tool_calls:
            if c.id == call_id:
                return c.name
    return ""


def _mistral_id(call_id: str) -> str:
    """Mistral templates accept only 9-character alphanumeric call ids: a stable stand-in."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).hexdigest()
    return digest[:9]


# -- the answer ---------------------------------------------------------------------------


def split_answer(text: str, request: GenerationRequest, dialect: Dialect) -> tuple[str, list[ToolCall]]:
    """The text before the calls and the calls in an answer to a request with tools.

    When maxTokens cut the answer inside a call, that call is dropped and the complete
    ones stand; with none complete, ToolCallError says to raise maxTokens.
    """
    if not request.offers_tools:
        return text, []
    start = _calls_start(text, dialect)
    if start < 0:
        if request.tool_choice == "required":  # the grammar starts with the trigger
            raise _truncated(request)
        return text, []
    calls = _parse_calls(text[start:], dialect)
    if not calls:
        raise _truncated(request)
    tools = {t.name: t for t in request.tools}
    result = []
    for name, arguments in calls:
        tool = tools.get(name)
        if tool is None:  # the grammar allows only the request's names
            raise ToolCallError(f"the model called '{name}', which the request does not offer")
        _check_input(tool, arguments)
        result.append(ToolCall(new_call_id(), name, arguments))
    return text[:start].strip(), result


BARE_CALL = re.compile(r'\{\s*"name"\s*:')
"""Where a call starts in a dialect without an opener (the grammar may write ``{ "name"``)."""


def _calls_start(text: str, dialect: Dialect) -> int:
    if dialect.opener:
        return text.find(dialect.opener)
    found = BARE_CALL.search(text)
    return found.start() if found else -1


def _parse_calls(text: str, dialect: Dialect) -> list[tuple[str, dict[str, Any]]]:
    """Every complete call in ``text`` (which starts at the first call)."""
    if dialect.listed:
        return _parse_list(text, dialect)
    decoder = json.JSONDecoder()
    found: list[tuple[str, dict[str, Any]]] = []
    pos = 0
    try:
        while True:
            if dialect.opener:
                if not text.startswith(dialect.opener, pos):
                    break
                pos += len(dialect.opener)
            pos = _skip_space(text, pos)
            item, pos = decoder.raw_decode(text, pos)
            pos = _skip_space(text, pos)
            if dialect.closer:
                if not text.startswith(dialect.closer, pos):
                    break
                pos = _skip_space(text, pos + len(dialect.closer))
            found.append((item["name"], item[dialect.args_key]))
            if not dialect.opener:
                break
    except (ValueError, KeyError, TypeError):
        pass  # an unfinished call (maxTokens): the complete ones before it stand
    return found


def _parse_list(text: str, dialect: Dialect) -> list[tuple[str, dict[str, Any]]]:
    """``OPENER[{call}, {call}, …]``, item by item: a list cut short keeps its complete calls."""
    decoder = json.JSONDecoder()
    found: list[tuple[str, dict[str, Any]]] = []
    pos = _skip_space(text, len(dialect.opener))
    if not text.startswith("[", pos):
        return found
    pos += 1
    try:
        while True:
            item, pos = decoder.raw_decode(text, _skip_space(text, pos))
            found.append((item["name"], item[dialect.args_key]))
            pos = _skip_space(text, pos)
            if not text.startswith(",", pos):
                break
            pos += 1
    except (ValueError, KeyError, TypeError):
        pass  # an unfinished call (maxTokens): the complete ones before it stand
    return found


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _check_input(tool: ToolSpec, arguments: Any) -> None:
    """The grammar enforces types, properties, enums and required fields; a few schema
    keywords (multipleOf, uniqueItems, not, if/then …) it cannot: check them here."""
    import jsonschema  # only requests with tools need it

    validator_class = jsonschema.validators.validator_for(tool.input_schema)
    problem = jsonschema.exceptions.best_match(validator_class(dict(tool.input_schema)).iter_errors(arguments))
    if problem is not None:
        raise ToolCallError(
            f"the model's call to '{tool.name}' breaks its inputSchema: {problem.message}",
            "retry the request, or drop schema keywords a grammar cannot enforce (multipleOf, uniqueItems, not)",
        )


def _truncated(request: GenerationRequest) -> ToolCallError:
    return ToolCallError(
        f"maxTokens ({request.max_tokens}) ran out in the middle of the model's tool call",
        "send a larger maxTokens (a call needs its arguments' JSON plus a few tokens)",
    )


def new_call_id() -> str:
    """A fresh, unique tool-call id."""
    return f"call_{uuid.uuid4().hex[:16]}"
