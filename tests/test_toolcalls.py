"""Tool-call dialects against real chat templates, and the grammar against their formats.

The templates are the real ones llama.cpp ships (Qwen2.5, Qwen3, Llama 3.1/3.2, Hermes
2/3, Mistral Nemo, Mistral Small 3.2, SmolLM3, Phi-3.5, Gemma 2), extracted by
scripts/test.sh from llama-cpp-python's sdist into tests/.templates. Each is rendered
with a conversation holding tools, a call and its result, as the engine renders it; and
the grammar built for a request must accept, token by token on the real vocabulary, the
call exactly as the family's own template writes it in history.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import llama_chat_format

from localsample.constrained import GrammarSampler
from localsample.engine import Engine
from localsample.errors import RequestError
from localsample.generation import ChatMessage, GenerationRequest, ToolCall, ToolSpec
from localsample.grammar import calls_grammar, schema_grammar
from localsample.toolcalls import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    Dialect,
    call_text,
    detect_dialect,
    render_prompt,
    split_answer,
    template_messages,
)

TEMPLATES = Path(__file__).parent / ".templates"
FAMILIES: dict[str, Dialect] = {
    "Qwen-Qwen2.5-7B-Instruct": HERMES,
    "Qwen-Qwen3-0.6B": HERMES,
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": HERMES,
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": HERMES,
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA3,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "Mistral-Small-3.2-24B-Instruct-2506": GENERIC,  # its [ARGS] format: the generic prompt
    "HuggingFaceTB-SmolLM3-3B": GENERIC,  # llama.cpp's copy ignores tools
    "microsoft-Phi-3.5-mini-instruct": GENERIC,
    "google-gemma-2-2b-it": GENERIC,
}
WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    },
)
CALLS = (
    ToolCall("call_1", "get_weather", {"city": "Oslo", "unit": "celsius"}),
    ToolCall("call_2", "get_weather", {"city": "Lima", "unit": "fahrenheit"}),
)


def template(name: str) -> str:
    path = TEMPLATES / f"{name}.jinja"
    if not path.is_file():
        pytest.fail(f"{path} missing: scripts/test.sh extracts the chat templates from llama-cpp-python's sdist")
    return path.read_text(encoding="utf-8")


def conversation(calls: tuple[ToolCall, ...] = CALLS, **fields: Any) -> GenerationRequest:
    return GenerationRequest(
        [
            ChatMessage("user", "Weather in Oslo and Lima?"),
            ChatMessage("assistant", "", tool_calls=calls),
            *(ChatMessage("tool", f"{c.arguments['city']}: 4 degrees", tool_call_id=c.id) for c in calls),
        ],
        max_tokens=64,
        system="You are a weather assistant.",
        tools=[WEATHER],
        **fields,
    )


def render(name: str, request: GenerationRequest) -> str:
    """The prompt as the engine renders it (the date pinned: Llama 3.2 prints today's)."""
    formatter = llama_chat_format.Jinja2ChatFormatter(template=template(name), eos_token="</s>", bos_token="<s>")
    return render_prompt(
        functools.partial(formatter, date_string="22 Nov 2026"), request, detect_dialect(template(name)), name
    )


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_is_detected(name: str) -> None:
    assert detect_dialect(template(name)) is FAMILIES[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_tools_calls_and_results_render_with_each_template(name: str) -> None:
    dialect = FAMILIES[name]
    single = (CALLS[0],) if name.startswith("google-gemma") else CALLS
    prompt = render(name, conversation(single))
    assert "Oslo: 4 degrees" in prompt or name.startswith("microsoft-Phi")  # Phi drops tool turns
    if dialect is GENERIC:
        return
    assert "get_weather" in prompt and "The weather in a city." in prompt  # the tools are offered
    assert dialect.opener in prompt
    for call in single:  # each history call as the family writes it, which is what the grammar makes
        body = json.dumps({"name": call.name, dialect.args_key: dict(call.arguments)})
        assert squeezed(body)[:-1] in squeezed(prompt)


def test_the_generic_prompt_teaches_the_format_and_renders_history_as_text() -> None:
    messages, tools = template_messages(conversation(tool_choice="required"), GENERIC)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # results: one user turn
    assert "<tool_call>" in messages[0]["content"]
    # The system prompt does not depend on toolChoice: an agent's required step and the auto
    # step after it share their prefix (the grammar is what forces a required call).
    assert template_messages(conversation(tool_choice="auto"), GENERIC)[0][0] == messages[0]
    assert messages[2]["content"].count("<tool_call>") == 2
    assert messages[3]["content"].count("<tool_response>") == 2


def test_none_offers_no_tools_but_keeps_the_history() -> None:
    messages, tools = template_messages(conversation(tool_choice="none"), HERMES)
    assert tools is None and messages[2]["tool_calls"]


def test_mistral_call_ids_become_nine_alphanumerics() -> None:
    prompt = render("mistralai-Mistral-Nemo-Instruct-2407", conversation())
    ids = re.findall(r'"id": "(\w+)"', prompt)
    assert len(ids) == 2 and all(len(i) == 9 and i.isalnum() for i in ids) and ids[0] != ids[1]


@pytest.mark.slow
@pytest.mark.parametrize("dialect", [HERMES, LLAMA3, MISTRAL, GENERIC], ids=lambda d: d.name)
def test_the_grammar_accepts_each_family_s_own_call_format(engine: Engine, dialect: Dialect) -> None:
    llama = engine.load()
    batcher = engine.batcher
    assert batcher is not None
    calls = CALLS[:1] if dialect is LLAMA3 else CALLS  # Llama 3 makes one call at a time
    if dialect.listed:  # as Mistral writes them: one list, each call with a 9-character id
        bodies = [
            json.dumps({"name": c.name, "arguments": dict(c.arguments), "id": f"abc{i}defgh"})
            for i, c in enumerate(calls)
        ]
        text = f"{dialect.opener}[{', '.join(bodies)}]"
    else:
        text = "\n".join(call_text(dialect, c) for c in calls)
    grammar = GrammarSampler(batcher.vocab, batcher.n_vocab, calls_grammar([WEATHER], dialect))
    try:
        for token in llama.tokenize(text.encode(), add_bos=False, special=True):
            grammar.accept(token)
        assert grammar.allows(llama.token_eos())  # and the answer may end there
        wrong = GrammarSampler(batcher.vocab, batcher.n_vocab, calls_grammar([WEATHER], dialect))
        bad = text.replace("celsius", "kelvin")
        with pytest.raises(ValueError, match="does not allow"):
            for token in llama.tokenize(bad.encode(), add_bos=False, special=True):
                wrong.accept(token)
        wrong.close()
    finally:
        grammar.close()
    request = GenerationRequest([ChatMessage("user", "?")], max_tokens=64, tools=[WEATHER], tool_choice="required")
    before, parsed = split_answer(text, request, dialect)
    assert before == "" and [(c.name, dict(c.arguments)) for c in parsed] == [(c.name, c.arguments) for c in calls]
    assert len({c.id for c in parsed}) == len(parsed)


def test_a_schema_the_grammar_cannot_express_is_a_request_error() -> None:
    bad = ToolSpec("t", "", {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}})
    with pytest.raises(RequestError, match=r"params.tools\[0\].inputSchema"):
        calls_grammar([bad], GENERIC)


def test_two_tools_with_same_named_definitions_get_their_own_rules() -> None:
    def item_tool(name: str, field: str) -> ToolSpec:
        item = {"type": "object", "properties": {field: {"type": "integer"}}, "required": [field]}
        return ToolSpec(
            name, "", {"type": "object", "$defs": {"Item": item}, "properties": {"i": {"$ref": "#/$defs/Item"}}}
        )

    grammar = calls_grammar([item_tool("a", "x"), item_tool("b", "y")], GENERIC)
    assert '"\\"x\\""' in grammar and '"\\"y\\""' in grammar  # both shapes survive


def test_bounds_the_converter_leaves_out_are_in_the_grammar() -> None:
    schema = {
        "type": "object",
        "properties": {
            "day": {"type": "integer", "minimum": 1, "maximum": 31},
            "pick": {"type": "integer", "minimum": 1, "maximum": 3, "enum": [2]},
            "json_char": {"type": "string"},
        },
    }
    grammar = schema_grammar(schema, "x", max_string=20)
    assert '"31"' in grammar and '"32"' not in grammar
    only_two = re.search(r'^(ls-value-\d+) ::= "2"$', grammar, re.M)  # the enum, not its bounds
    assert only_two and f"pick ::= {only_two.group(1)}" in grammar
    assert "ls-json-char{0,20}" in grammar  # a default length, and no clash with a property's rule name


def test_calls_parse_as_each_grammar_may_write_them() -> None:
    request = GenerationRequest([ChatMessage("user", "?")], max_tokens=9, tools=[WEATHER], tool_choice="required")
    arguments = {"city": "Oslo", "unit": "celsius"}
    _, calls = split_answer('{ "name": "get_weather", "parameters": ' + json.dumps(arguments) + "}", request, LLAMA3)
    assert [c.arguments for c in calls] == [arguments]
    cut = '[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(arguments) + '}, {"name": "get_w'
    _, calls = split_answer(cut, request, MISTRAL)  # the complete call of a list cut short stands
    assert [c.arguments for c in calls] == [arguments]
